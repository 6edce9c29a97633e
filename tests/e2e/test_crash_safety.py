"""No lost jobs: workers killed with SIGKILL mid-round, and Redis restarted with AOF.

Real processes: worker subprocesses (`python -m service.cli worker`) and, for the
restart test, a redis-server of the test's own on a free port.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from gcr.types import JobDocument
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig

ROOT = Path(__file__).resolve().parents[2]


def worker_process(stack: Stack, worker_id: str, **env: str) -> subprocess.Popen[bytes]:
    s = stack.settings
    variables = {
        **os.environ,
        "GCR_REDIS_URL": s.redis_url,
        "GCR_REDIS_PREFIX": s.redis_prefix,
        "GCR_ARTIFACT_URL": s.artifact_url,  # the gateway's images: the same shared folder
        "GCR_CRITIC_BASE_URL": s.critic_base_url,
        "GCR_CRITIC_MODEL": s.critic_model,
        "GCR_GENERATOR": "sim:0.1",
        # Slower than the stack's own workers, but under the stack's model name: the jobs
        # the gateway routes reach it, and workers started in-process later share them.
        "GCR_MODEL_NAME": s.model_name or s.generator or "",
        "GCR_WORKER_ID": worker_id,
        "GCR_HEARTBEAT_S": "0.2",
        "GCR_VISIBILITY_TIMEOUT_S": "1.0",
        "GCR_MAX_INFLIGHT_JOBS": "4",
        "GCR_MAX_ATTEMPTS": "20",
        "GCR_LOG_FORMAT": "text",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        cwd=ROOT,
        env=variables,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_sigkilled_workers_lose_no_job_and_repeat_no_round(stack: Stack) -> None:
    await stack.register_idle_worker()
    await stack.configure_critic(StandinConfig(latency_s=0.05))
    rounds = 3
    ids = [
        await stack.submit(f"job {i}", loop={"max_rounds": rounds, "threshold": 1.0, "patience": None})
        for i in range(20)
    ]
    rng = random.Random(7)
    for kill in range(4):
        worker_id = f"doomed-{kill}"
        proc = worker_process(stack, worker_id)
        async with asyncio.timeout(30):  # until it runs jobs (start-up time varies with load)
            while worker_id not in [(await stack.client.get(i)).worker for i in ids]:
                await asyncio.sleep(0.05)
        await asyncio.sleep(rng.uniform(0.1, 0.8))  # then cut it at a random point of a round
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    await survived_with_each_round_once(stack, ids, rounds, worker_process(stack, "survivor"))


async def survived_with_each_round_once(
    stack: Stack, ids: list[str], rounds: int, survivor: subprocess.Popen[bytes]
) -> list[JobDocument]:
    """Let `survivor` finish the jobs; each succeeds with every round once, and some job was
    interrupted (else the test tested nothing)."""
    try:
        docs = [await stack.wait(job_id, timeout_s=60) for job_id in ids]
    finally:
        stop(survivor)
    assert all(d.status == "succeeded" for d in docs), [(d.id, d.status, d.error) for d in docs]
    for doc in docs:
        assert [r.index for r in doc.rounds] == list(range(rounds)), doc.id
    assert any(d.attempts > 1 for d in docs), "no job was interrupted: the test did not test anything"
    return docs


async def test_a_job_that_keeps_crashing_workers_is_dead_lettered(stack: Stack) -> None:
    await stack.register_idle_worker()
    await stack.configure_critic(StandinConfig(latency_s=2.0))
    job_id = await stack.submit("a poison job", loop={"max_rounds": 3})
    for attempt in range(2):
        proc = worker_process(stack, f"crash-{attempt}", GCR_MAX_ATTEMPTS="2")
        async with asyncio.timeout(20):
            while (await stack.client.get(job_id)).attempts <= attempt:
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = worker_process(stack, "last", GCR_MAX_ATTEMPTS="2")
    try:
        doc = await stack.wait(job_id, timeout_s=20)
    finally:
        stop(last)
    assert doc.status == "failed" and doc.error is not None and doc.error.code == "dead_letter"


async def test_redis_restart_with_aof_loses_nothing(own_redis, standin_url: str) -> None:  # type: ignore[no-untyped-def]
    url, (start, kill) = own_redis
    async with Stack(url, "gcr-aof", standin_url) as stack:
        await stack.start_worker()
        await stack.register_idle_worker()
        finished = [await stack.submit(f"done {i}", loop={"max_rounds": 1}) for i in range(2)]
        for job_id in finished:
            await stack.wait(job_id)
        await stack.stop_workers()
        queued = [await stack.submit(f"waiting {i}", loop={"max_rounds": 1}) for i in range(2)]

        kill()
        async with httpx.AsyncClient(base_url=stack.url) as http:
            down = await http.get(f"/jobs/{finished[0]}")
            assert down.status_code == 503 and down.headers["Retry-After"]
            assert down.json()["error"]["code"] == "store_unavailable"
            worker = await stack.start_worker(wait=False)  # starts while Redis is down: reconnects with backoff
            await asyncio.sleep(0.5)
            start()
            # the gateway recovers by itself
            async with asyncio.timeout(10):
                while (await http.get(f"/jobs/{finished[0]}")).status_code != 200:
                    await asyncio.sleep(0.1)

        for job_id in finished:
            doc = await stack.client.get(job_id)
            assert doc.status == "succeeded" and len(doc.rounds) == 1
            assert doc.best is not None and await stack.client.download(doc.best.image_url or "")
        for job_id in queued:  # the queue survived too: the worker picks them up
            assert (await stack.wait(job_id, timeout_s=20)).status == "succeeded"
        assert worker.active == {}


async def test_a_job_hopping_to_a_killed_edit_worker_finishes_with_each_round_once(stack: Stack) -> None:
    """Strategy `edit` hops each job from the text-to-image worker (in process) to the edit
    model's worker (a subprocess), which is SIGKILLed while it edits: a second edit worker
    takes the jobs over from their checkpoints."""
    await stack.start_worker(model_name="painter")
    await stack.register_idle_worker(modes=("edit",), model="editor", worker_id="editor-announced")
    await stack.configure_critic(StandinConfig(latency_s=0.05))
    rounds = 3
    loop = {"max_rounds": rounds, "threshold": 1.0, "patience": None, "strategy": "edit", "edit_model": "editor"}
    ids = [await stack.submit(f"hop {i}", model="painter", loop=loop) for i in range(6)]
    doomed = worker_process(stack, "doomed-editor", GCR_MODEL_NAME="editor", GCR_GENERATOR="sim:0.3")
    async with asyncio.timeout(60):  # until it edits: a job of its is generating round 2 or 3
        while not any(
            d.worker == "doomed-editor" and d.stage == "generating" and d.rounds
            for d in [await stack.client.get(i) for i in ids]
        ):
            await asyncio.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    survivor = worker_process(stack, "survivor-editor", GCR_MODEL_NAME="editor", GCR_GENERATOR="sim:0.05")
    docs = await survived_with_each_round_once(stack, ids, rounds, survivor)
    for doc in docs:
        assert [(r.action, r.model) for r in doc.rounds] == [
            ("generate", "painter"),
            ("edit", "editor"),
            ("edit", "editor"),
        ]
    assert all(d.worker == "survivor-editor" for d in docs if d.attempts > 1)


async def test_a_running_job_whose_only_worker_died_ends_with_its_rounds(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    # The worker of the job's model is SIGKILLed mid-job and none comes back: after the
    # queue timeout the job ends, as an unclaimed one does, with the rounds it finished.
    async with Stack(redis_url, redis_prefix, standin_url, queue_timeout_s=3.0) as stack:
        await stack.register_idle_worker()  # admits the jobs; claims nothing
        await stack.configure_critic(StandinConfig(latency_s=0.3))
        job_id = await stack.submit("orphaned", loop={"max_rounds": 20, "threshold": 1.0, "patience": None})
        proc = worker_process(stack, "only-one")
        try:
            async with asyncio.timeout(30):
                while len((await stack.client.get(job_id)).rounds) < 2:
                    await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        doc = await stack.wait(job_id, timeout_s=20)
    assert doc.status == "succeeded" and doc.stop_reason == "unclaimed", (doc.status, doc.stop_reason)
    assert doc.error is not None and "its worker only-one stopped" in doc.error.message
    assert len(doc.rounds) >= 2 and doc.best is not None
