"""Ownership of a running job: a stalled worker whose job was taken over must neither take
the queue entry back nor acknowledge it; a Redis blip resumes the job instead of failing it."""

from __future__ import annotations

import time

from gcr.types import GenerateRequest, GenerationParams, JobDocument
from service.errors import StoreUnavailable
from service.jobs.connection import connect
from service.jobs.keys import CONSUMER_GROUP, Keys
from service.jobs.queue import JobQueue
from service.jobs.store import JobStore
from tests.stack import Stack


async def test_a_stale_worker_cannot_take_back_a_job_another_worker_took_over(
    redis_url: str, redis_prefix: str
) -> None:
    client = connect(redis_url)
    keys = Keys(redis_prefix)
    store, queue = JobStore(client, keys, 600), JobQueue(client, keys, "sim")
    await queue.ensure_groups()
    spec = GenerateRequest(prompt="contested", model="sim", generation=GenerationParams(seed=1))
    doc = JobDocument(id="contested-job-0001", status="queued", spec=spec, created_at=time.time(), owner="t")
    await store.create(doc)

    [held_by_a] = await queue.claim("A", 1)
    assert (await store.start(doc.id, "A", 5))[0] == "ok"
    [held_by_b] = await queue.reclaim("B", min_idle_s=0, count=1)  # A stalled; B takes over
    assert held_by_b.entry_id == held_by_a.entry_id
    assert (await store.start(doc.id, "B", 5))[0] == "ok"

    assert await queue.keep_alive("A", [held_by_a]) == [held_by_a]  # reported lost, not taken back
    pending = await client.xpending_range(held_by_a.stream, CONSUMER_GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [b"B"]
    assert not await store.update(doc.id, "A", stage="generating")  # A's writes are fenced off
    assert await store.update(doc.id, "B", stage="generating")
    await client.aclose()


async def test_a_redis_blip_mid_round_resumes_the_job(stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    original = JobStore.put_image
    blips = {"left": 1}

    async def blip(self, job_id, round_index, candidate, png):  # type: ignore[no-untyped-def]
        if blips["left"]:
            blips["left"] -= 1
            raise StoreUnavailable("Redis is unavailable: injected blip")
        return await original(self, job_id, round_index, candidate, png)

    monkeypatch.setattr(JobStore, "put_image", blip)
    await stack.start_worker()
    doc = await stack.wait(await stack.submit("through a blip", loop={"max_rounds": 2, "threshold": 1.0}))
    assert doc.status == "succeeded" and [r.index for r in doc.rounds] == [0, 1]
    assert doc.attempts == 1 and blips["left"] == 0
