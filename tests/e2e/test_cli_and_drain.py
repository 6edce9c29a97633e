"""`gcr generate --wait` against a running gateway, SIGTERM draining a worker process, and
stopping `gcr up --dev` with SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from PIL import Image

from service.servers import free_port
from tests.e2e.test_crash_safety import ROOT, worker_process
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule


async def test_gcr_generate_waits_and_saves_the_best_image(stack: Stack, tmp_path: Path) -> None:
    await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction="bridge", rounds=[0.4, 0.9])]))
    await stack.start_worker()
    out = tmp_path / "best.png"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "generate",
        "a stone bridge",
        "--url",
        stack.url,
        "--wait",
        "--size",
        "96x64",
        "--out",
        str(out),
        "--json",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert b'"stop_reason": "accepted"' in stdout
    assert Image.open(io.BytesIO(out.read_bytes())).size == (96, 64)


async def test_gcr_generate_reports_a_refusal_clearly(stack: Stack) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "generate",
        "x",
        "--url",
        stack.url,
        "--max-rounds",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2  # refused by the CLI itself, with what is allowed
    assert b"Invalid value for '--max-rounds'" in stderr and b"1<=x<=20" in stderr and b"Traceback" not in stderr
    # and a refusal by the gateway (no worker serves t2i here) is one line too
    refused = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "service.cli", "generate", "x", "--url", stack.url],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(refused.communicate(), timeout=60)
    assert refused.returncode == 2 and b"no_worker" in stderr and b"Traceback" not in stderr


async def test_sigterm_drains_then_releases_unfinished_jobs(stack: Stack) -> None:
    await stack.register_idle_worker()
    await stack.configure_critic(StandinConfig(latency_s=0.5))
    short = await stack.submit("short job", loop={"max_rounds": 1})
    long = await stack.submit("long job", loop={"max_rounds": 20, "threshold": 1.0, "patience": None})
    proc = worker_process(stack, "draining", GCR_DRAIN_GRACE_S="1.5", GCR_VISIBILITY_TIMEOUT_S="600")
    async with asyncio.timeout(30):
        while (await stack.client.get(long)).status != "running" or (await stack.client.get(short)).status != "running":
            await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        while proc.poll() is None:
            await asyncio.sleep(0.05)
    assert proc.returncode == 0
    assert (await stack.client.get(short)).status == "succeeded"  # finished within the grace period
    # The long job was released: another worker takes it at once, well before the
    # 600 s visibility timeout, and resumes from its checkpoint.
    done_rounds = len((await stack.client.get(long)).rounds)
    await stack.start_worker(visibility_timeout_s=600)
    doc = await stack.wait(long, timeout_s=60)
    assert doc.status == "succeeded", doc
    assert [r.index for r in doc.rounds] == list(range(20)), (doc.stop_reason, doc.spec.loop)
    assert done_rounds >= 1 and doc.attempts == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_dev_stack_stops_cleanly_and_leaves_no_keys(redis_url: str, sig: signal.Signals) -> None:
    prefix = f"gcr-uptest-{uuid.uuid4().hex[:8]}"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "service.cli", "up", "--dev", "--port", str(port), "--generator", "sim:0.05"],
        cwd=ROOT,
        env={**os.environ, "GCR_REDIS_URL": redis_url, "GCR_REDIS_PREFIX": prefix},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    client = redis_sync.Redis.from_url(redis_url)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(60):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
            job = await http.post("/generate", json={"prompt": "a job before the stop", "loop": {"max_rounds": 1}})
            assert job.status_code == 202
        assert list(client.scan_iter(match=f"{prefix}-dev-*"))  # the stack wrote its keys
        proc.send_signal(sig)
        _out, raw = await asyncio.wait_for(proc.communicate(), timeout=30)
        err = raw.decode()
        assert proc.returncode == 0, err[-2000:]
        assert "Aborted" not in err and "Traceback" not in err
        assert "keys are deleted" in err
        assert list(client.scan_iter(match=f"{prefix}-dev-*")) == []
    finally:
        client.close()
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
