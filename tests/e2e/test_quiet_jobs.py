"""Clients at real speed: jobs that stay quiet for longer than every keep-alive, read
timeout and visibility interval of the stack, followed by every client that waits.

A real critique (RationalRewards writing its rationale) takes 10-60 s, longer than the
gateway's 10 s keep-alive. Here the intervals are shortened instead of waited for:
keep-alives every 0.2 s, a critic that answers in 1.5 s, a worker visibility timeout
of 1.2 s (its heartbeats keep the job), the sync SDK's read slice at 0.5 s, and the
gateway's blocking reads (a stream's 0.4 s, the event listener's 0.3 s). Each client
must ride out the keep-alives and return the finished job.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import gcr
from gcr import _base as sdk_core
from service.evaluation.cli import eval_command
from service.evaluation.records import read_jsonl
from service.gateway import follow as follow_module
from service.jobs import listener as listener_module
from tests.e2e.test_crash_safety import ROOT
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule

KEEPALIVE_S = 0.2
CRITIC_LATENCY_S = 1.5
QUIET = {
    "sse_keepalive_s": KEEPALIVE_S,
    "visibility_timeout_s": 1.2,
    "heartbeat_s": 0.1,
    "worker_stale_s": 1.2,
    "critic_timeout_s": 10,
}
LOOP = {"max_rounds": 2, "threshold": 0.8}


@pytest.fixture
async def quiet(
    redis_url: str, redis_prefix: str, standin_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stack]:
    # The gateway's own waits, shorter than a critique too: a stream's blocking read
    # (10 s) and the event listener's (5 s). They are constants, not settings.
    monkeypatch.setattr(follow_module, "BLOCK_MS", 400)
    monkeypatch.setattr(listener_module, "LISTEN_BLOCK_MS", 300)
    async with Stack(redis_url, redis_prefix, standin_url, **QUIET) as running:
        await running.configure_critic(
            StandinConfig(latency_s=CRITIC_LATENCY_S, rules=[StandinRule(instruction="", rounds=[0.5, 0.9])])
        )
        await running.start_worker()
        yield running


async def count_keepalives(url: str, job_id: str) -> int:
    """Keep-alive comments on the raw stream until `end`: proof that the job was quiet for
    longer than the keep-alive, so a client that survived did so while being pinged."""
    pings = 0
    async with httpx.AsyncClient(timeout=30) as http, http.stream("GET", f"{url}/jobs/{job_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith(":"):
                pings += 1
            if line == "event: end":
                return pings
    return pings


async def test_async_sdk_waits_through_keepalives(quiet: Stack) -> None:
    seen: list[str] = []
    async with gcr.AsyncClient(quiet.url) as client:
        job = await client.submit({"prompt": "a quiet harbour", "loop": LOOP})
        pings, done = await asyncio.gather(
            count_keepalives(quiet.url, job.id), client.wait(job.id, on_event=lambda e: seen.append(e.type))
        )
        again = await client.generate("a quiet harbour again", loop=LOOP, wait=True)
    assert done.status == "succeeded" and len(done.rounds) == 2
    assert again.status == "succeeded"
    assert pings >= 2 * CRITIC_LATENCY_S / KEEPALIVE_S * 0.5  # several per critique, on a loaded machine too
    assert seen[-1] == "end" and seen.count("round") == 2


async def test_sync_sdk_waits_through_keepalives(quiet: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sync client's read timeout per slice: shorter than a critique, longer than a keep-alive.
    monkeypatch.setattr(sdk_core, "READ_SLICE_S", 0.5)

    def run() -> tuple[gcr.JobDocument, gcr.JobDocument]:
        with gcr.Client(quiet.url) as client:
            generated = client.generate("a quiet lighthouse", loop=LOOP, wait=True)
            job = client.submit({"prompt": "a quiet lighthouse, waited for", "loop": LOOP})
            return generated, client.wait(job.id, timeout=60)

    generated, waited = await asyncio.to_thread(run)
    assert generated.status == "succeeded" and len(generated.rounds) == 2
    assert waited.status == "succeeded" and len(waited.rounds) == 2


async def test_cli_generate_wait_through_keepalives(quiet: Stack, tmp_path: Path) -> None:
    out = tmp_path / "best.png"
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "service.cli", "generate", "a quiet bridge", "--url", quiet.url, "--wait"],
        *["--max-rounds", "2", "--threshold", "0.8", "--out", str(out), "--json"],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    assert json.loads(stdout)["status"] == "succeeded" and out.read_bytes().startswith(b"\x89PNG")


async def test_eval_through_keepalives(quiet: Stack, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{n}", "prompt": f"quiet scene {n}"}) + "\n" for n in range(2)))
    policy = 'slow={"max_rounds": 2, "threshold": 0.8}'
    args = [str(prompts), "--out", str(tmp_path / "out"), "--url", quiet.url, "--policy", policy, "--no-plot"]

    outcome = await asyncio.wait_for(asyncio.to_thread(CliRunner().invoke, eval_command, args), timeout=120)

    assert outcome.exit_code == 0, outcome.output
    lines = read_jsonl(tmp_path / "out" / "slow" / "results.jsonl")
    assert sorted(line["id"] for line in lines) == ["q0", "q1"]
    assert all(line["status"] == "succeeded" and len(line["job"]["rounds"]) == 2 for line in lines)
