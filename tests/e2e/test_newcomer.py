"""What a new user meets first: `gcr up --dev --demo`, the CLI's table and errors, the JSON."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import uuid

import httpx
import redis as redis_sync

from gcr.types import Candidate, JobDocument, Round
from service.cli.console import rounds_table
from service.servers import free_port
from tests.e2e.test_crash_safety import ROOT
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule

SCORES = re.compile(r'"(?:overall|delta|score|first_round_overall|best_overall|gain)":\s*(-?\d+\.\d+)')


def test_the_rounds_table_counts_chosen_candidates_from_one_like_rounds() -> None:
    rounds = [
        Round(
            index=i,
            prompt="p",
            candidates=[Candidate(index=c, seed=c) for c in range(2)],
            chosen=chosen,
            overall=0.5,
            started_at=0.0,
            finished_at=1.0,
        )
        for i, chosen in enumerate([0, 1])
    ]
    doc = JobDocument.model_validate(
        {"id": "J" * 22, "status": "succeeded", "spec": {"prompt": "p"}, "created_at": 0.0, "rounds": rounds}
    )
    columns = {column.header: list(column.cells) for column in rounds_table(doc).columns}
    assert columns["round"] == ["1", "2"]
    assert columns["chosen"] == ["1", "2"]


async def test_scores_in_json_answers_have_four_decimals_at_most(stack: Stack) -> None:
    # 1 + 3 * 0.42 = 2.26 per dimension; (2.26 - 1) / 3 is 0.41999999999999993 in floating point.
    await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction="", rounds=[0.42, 0.61])]))
    await stack.start_worker()
    job_id = await stack.submit("a red bicycle", loop={"max_rounds": 2, "threshold": 0.99, "patience": None})
    await stack.wait(job_id)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        document = (await http.get(f"/jobs/{job_id}")).text
        events = (await http.get(f"/jobs/{job_id}/events")).text
    assert '"overall":0.42' in document.replace(" ", "")
    written = SCORES.findall(document) + SCORES.findall(events)
    assert len(written) > 10
    assert [value for value in written if len(value.partition(".")[2]) > 4] == []


async def test_an_unreachable_gateway_is_one_line_on_a_narrow_terminal() -> None:
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "service.cli", "generate", "x", "--url", "http://127.0.0.1:9"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "60"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2
    assert len(lines) == 1, lines
    assert "cannot reach the gateway at http://127.0.0.1:9" in lines[0] and "gcr up --dev" in lines[0]


async def test_the_demo_keeps_serving_its_job_and_prints_the_studio(redis_url: str) -> None:
    prefix = f"gcr-demotest-{uuid.uuid4().hex[:8]}"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "service.cli", "up", "--dev", "--demo", "--port", str(port)],
        *["--generator", "sim:0.05", "--critic-latency", "0.2"],
        cwd=ROOT,
        env={**os.environ, "GCR_REDIS_URL": redis_url, "GCR_REDIS_PREFIX": prefix, "COLUMNS": "80"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not said or "serving until Ctrl-C" not in said[-1]:
                line = await proc.stderr.readline()
                assert line, "".join(said)[-3000:]
                said.append(line.decode())
        text = "".join(said)
        base = f"http://127.0.0.1:{port}"
        assert f"studio: {base}/studio " in text
        job_page = re.search(rf"studio: {re.escape(base)}/studio/jobs/([A-Za-z0-9_-]+)", text)
        assert job_page is not None, text
        # After the demo, its links work: the document, the best image, the studio page.
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            doc = (await http.get(f"/jobs/{job_page.group(1)}")).json()
            assert doc["status"] == "succeeded" and doc["best"]["image_url"]
            assert (await http.get(doc["best"]["image_url"])).status_code == 200
            assert (await http.get(f"/studio/jobs/{job_page.group(1)}")).status_code == 200
        await stops_on(proc, signal.SIGTERM, within_s=30)
    finally:
        await stopped(proc)
    assert_keys_deleted(redis_url, prefix)


async def stops_on(proc: asyncio.subprocess.Process, signum: int, within_s: float) -> None:
    """`gcr up` stops cleanly (exit 0) within `within_s` of `signum`."""
    proc.send_signal(signum)
    await asyncio.wait_for(proc.wait(), timeout=within_s)
    assert proc.returncode == 0


async def stopped(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def assert_keys_deleted(redis_url: str, prefix: str) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{prefix}-dev-*")) == [], "the dev stack deletes its keys"
    finally:
        client.close()


def up_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "up", "--dev", "--port", str(port), "--generator", "sim:0.05", *extra]


async def test_the_demo_once_prints_no_dead_link_and_json_only_when_asked(redis_url: str) -> None:
    env = {**os.environ, "GCR_REDIS_URL": redis_url, "GCR_REDIS_PREFIX": f"gcr-once-{uuid.uuid4().hex[:8]}"}
    outputs = []
    for extra in ((), ("--json",)):
        proc = await asyncio.create_subprocess_exec(
            *up_command(free_port(), "--demo", "--once", "--critic-latency", "0.1", *extra),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        outputs.append((stdout.decode(), stderr.decode()))
    (plain_out, plain_err), (json_out, _) = outputs
    assert plain_out == "", "the job's JSON is opt-in (--json)"
    assert JobDocument.model_validate_json(json_out).status == "succeeded"
    assert "studio:" not in plain_err, "--once exits with the demo: its links die with it"
    # Piped, the table has room: a refined prompt's row keeps its start and its end (the
    # stand-in's tag, which rich once took for markup and dropped) on one line.
    assert re.search(r"a red bicycle .*\[refined r\d c\d\]", plain_err), plain_err


async def test_gcr_up_started_in_the_background_of_a_script_stops_on_sigint(redis_url: str) -> None:
    # A non-interactive shell starts background jobs with SIGINT ignored.
    prefix = f"gcr-bg-{uuid.uuid4().hex[:8]}"
    proc = await asyncio.create_subprocess_exec(
        *up_command(free_port(), "--edit-generator", "none"),
        cwd=ROOT,
        env={**os.environ, "GCR_REDIS_URL": redis_url, "GCR_REDIS_PREFIX": prefix},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            while b"serving until Ctrl-C" not in (line := await proc.stderr.readline()):
                assert line, "gcr up ended before it served"
        await stops_on(proc, signal.SIGINT, within_s=15)
    finally:
        await stopped(proc)
    assert_keys_deleted(redis_url, prefix)
