"""Ownership of a running job: a stalled worker whose job was taken over must neither take
the queue entry back nor acknowledge it, nor start again a job it still holds; a Redis blip
resumes the job instead of failing it."""

from __future__ import annotations

import dataclasses
import time

from gcr.types import GenerateRequest, GenerationParams
from service.jobs.connection import connect
from service.jobs.keys import CONSUMER_GROUP, Keys
from service.jobs.lifecycle import JobLifecycle
from service.jobs.queue import Claim, JobQueue
from service.jobs.records import StoredJob
from tests.failing_redis import failing_writes
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig
from workers.worker import WorkerConnections


async def test_a_stale_worker_cannot_take_back_a_job_another_worker_took_over(
    redis_url: str, redis_prefix: str
) -> None:
    client = connect(redis_url)
    keys = Keys(redis_prefix)
    lifecycle, queue = JobLifecycle(client, keys, 600), JobQueue(client, keys, "sim")
    await queue.ensure_groups()
    spec = GenerateRequest(prompt="contested", model="sim", generation=GenerationParams(seed=1))
    job = StoredJob(id="contested-job-0001", status="queued", spec=spec, created_at=time.time(), owner="t")
    await lifecycle.create(job)

    [held_by_a] = await queue.claim("A", 1)
    assert (await lifecycle.start(job.id, "A", 5))[0] == "ok"
    [held_by_b] = await queue.reclaim("B", min_idle_s=0, count=1)  # A stalled; B takes over
    assert held_by_b.entry_id == held_by_a.entry_id
    assert (await lifecycle.start(job.id, "B", 5))[0] == "ok"

    assert await queue.keep_alive("A", [held_by_a]) == [held_by_a]  # reported lost, not taken back
    pending = await client.xpending_range(held_by_a.stream, CONSUMER_GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [b"B"]
    assert not await lifecycle.update(job.id, "A", stage="generating")  # A's writes are fenced off
    assert await lifecycle.update(job.id, "B", stage="generating")
    await client.aclose()


async def test_a_redis_blip_mid_round_resumes_the_job(stack: Stack) -> None:
    # The worker's Redis loses its 4th write of the job (round 1's `generating` stage): a blip.
    client = failing_writes(stack.settings.redis_url, fail_at=4, lose="request")
    await stack.start_worker(redis_client=client)
    doc = await stack.wait(await stack.submit("through a blip", loop={"max_rounds": 2, "threshold": 1.0}))
    assert client.counter.failed
    assert doc.status == "succeeded" and [r.index for r in doc.rounds] == [0, 1]
    assert doc.attempts == 1  # a resume after a blip is not the job's fault


class _LateKeepAlives(JobQueue):
    """Keep-alives that never arrive: the worker's entries look idle past the visibility
    timeout, as when its event loop stalls (seen on a loaded 2-core machine while vLLM
    restarted: a heartbeat took 2 s against the tests' 3 s timeout)."""

    async def keep_alive(self, consumer: str, claims: list[Claim]) -> list[Claim]:
        return []


def _late_keep_alives(connections: WorkerConnections) -> WorkerConnections:
    queue = connections.queue
    return dataclasses.replace(connections, queue=_LateKeepAlives(queue.redis, queue.keys, queue.model, queue.modes))


async def test_a_worker_whose_keep_alives_come_late_runs_its_job_once(stack: Stack) -> None:
    # Each critique holds the job past the visibility timeout: its own entry looks idle to the
    # worker's re-claim, which must refresh it, not start the job a second time.
    await stack.configure_critic(StandinConfig(latency_s=1.5))
    await stack.start_worker(visibility_timeout_s=0.5, adapt=_late_keep_alives)
    doc = await stack.wait(
        await stack.submit("held past its visibility timeout", loop={"max_rounds": 2, "threshold": 1.0})
    )
    assert doc.status == "succeeded", doc.error
    assert [r.index for r in doc.rounds] == [0, 1] and doc.attempts == 1
