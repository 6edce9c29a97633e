"""One owner of every job state change (service.jobs.lifecycle): each ending is one step that
writes the status, leaves the queue and sends `end`; a repeated ending re-sends a missing
`end`; and however a job's writes are lost, it ends with its `end` and its rounds once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from gcr.types import GenerateRequest, GenerationParams, JobEvent
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.lifecycle import JobLifecycle
from service.jobs.queue import JobQueue
from service.jobs.records import StoredJob
from service.jobs.store import JobStore
from tests.failing_redis import Loss, failing_writes
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule


class Parts:
    def __init__(self, redis_url: str, prefix: str) -> None:
        self.client = connect(redis_url)
        self.keys = Keys(prefix)
        self.lifecycle = JobLifecycle(self.client, self.keys, 600)
        self.store = JobStore(self.client, self.keys, 600)
        self.queue = JobQueue(self.client, self.keys, "sim")

    async def job(self, job_id: str, callback_url: str | None = None) -> StoredJob:
        spec = GenerateRequest(prompt="p", model="sim", generation=GenerationParams(seed=1), callback_url=callback_url)
        job = StoredJob(id=job_id, status="queued", spec=spec, created_at=time.time(), owner="t")
        await self.lifecycle.create(job)
        return job

    async def events(self, job_id: str) -> list[JobEvent]:
        return [event for _id, event in await self.store.read_events(job_id)]

    async def entries(self) -> int:
        return int(await self.client.xlen(self.keys.queue("sim", "t2i", "normal")))


@pytest.fixture
async def parts(redis_url: str, redis_prefix: str) -> AsyncIterator[Parts]:
    made = Parts(redis_url, redis_prefix)
    await made.queue.ensure_groups()
    yield made
    await made.client.aclose()


async def test_cancel_while_queued_ends_the_job_in_one_step(parts: Parts) -> None:
    await parts.job("cancel-me-000000001", callback_url="https://example.com/hook")
    assert await parts.entries() == 1
    assert await parts.lifecycle.cancel("cancel-me-000000001") == "cancelled"
    job = await parts.store.get("cancel-me-000000001")
    assert (job.status, job.stop_reason, job.queue) == ("cancelled", "cancelled", None)
    assert [(e.type, e.data["status"]) for e in await parts.events(job.id)] == [
        ("status", "cancelled"),
        ("end", "cancelled"),
    ]
    # No entry left for a worker to claim; the webhook is owed to the outbox, for any worker.
    assert await parts.entries() == 0
    assert not await parts.client.zscore(parts.keys.queued_index(), job.id)
    outbox = await parts.client.xrange(parts.keys.webhook_outbox())
    assert [fields[b"job"].decode() for _id, fields in outbox] == [job.id]
    assert await parts.lifecycle.cancel(job.id) == "terminal"
    assert len(await parts.events(job.id)) == 2  # ending again sends nothing twice


async def test_a_job_queued_too_long_expires_in_one_step_naming_the_model_it_waits_for(parts: Parts) -> None:
    await parts.job("expire-me-00000001")
    assert await parts.lifecycle.expire_unclaimed(max_wait_s=3600) == []
    await asyncio.sleep(0.05)
    assert await parts.lifecycle.expire_unclaimed(max_wait_s=0.01) == ["expire-me-00000001"]
    job = await parts.store.get("expire-me-00000001")
    assert job.status == "expired" and job.error is not None and "model 'sim' in mode 't2i'" in job.error.message
    assert [e.type for e in await parts.events(job.id)] == ["status", "end"]
    assert await parts.entries() == 0


async def test_a_hop_counts_the_queue_wait_from_the_hop(parts: Parts) -> None:
    """A job queued long ago that just hopped to another model is not expired at once."""
    job = await parts.job("hop-late-00000001")
    [claim] = await parts.queue.claim("A", 1)
    assert (await parts.lifecycle.start(job.id, "A", 3))[0] == "ok"
    await parts.client.zadd(parts.keys.queued_since(), {job.id: 0})  # as if created at the epoch
    assert await parts.lifecycle.hop(job, "A", claim, "edit-model", "edit", 1)
    assert await parts.lifecycle.expire_unclaimed(max_wait_s=60) == []
    hopped = await parts.store.get(job.id)
    assert hopped.status == "queued" and hopped.queue is not None and hopped.queue.model == "edit-model"
    assert await parts.entries() == 0  # the entry it held is gone; its new one is on the edit stream
    await asyncio.sleep(0.05)
    assert await parts.lifecycle.expire_unclaimed(max_wait_s=0.01) == [job.id]
    expired = await parts.store.get(job.id)
    assert expired.error is not None and "model 'edit-model' in mode 'edit'" in expired.error.message


async def test_a_repeated_ending_resends_a_missing_end(parts: Parts) -> None:
    job = await parts.job("lost-end-00000001")
    [claim] = await parts.queue.claim("A", 1)
    assert (await parts.lifecycle.start(job.id, "A", 3))[0] == "ok"
    # The ending as an older version wrote it: the status, then a write that never came.
    await parts.client.hset(parts.keys.job(job.id), mapping={"status": '"succeeded"', "stop_reason": '"accepted"'})
    assert [e.type for e in await parts.events(job.id)] == ["status"]  # the `running` one
    assert await parts.lifecycle.settle(job.id) == "resent"
    events = await parts.events(job.id)
    assert [(e.type, e.data.get("status")) for e in events[-2:]] == [("status", "succeeded"), ("end", "succeeded")]
    assert await parts.lifecycle.settle(job.id) == "already"
    assert await parts.lifecycle.finish(job.id, "A", status="failed") == "already"  # never overwritten
    assert (await parts.store.get(job.id)).status == "succeeded"
    pending = await parts.client.xpending(claim.stream, "workers")
    assert pending["pending"] == 0 and await parts.entries() == 0


async def test_a_settled_jobs_new_event_stream_expires_with_it(parts: Parts) -> None:
    """A job ended by an older version (no events at all): the stream the re-sent `end` makes
    expires, as every stream an ending writes does."""
    job = await parts.job("no-events-0000001")
    await parts.client.delete(parts.keys.events(job.id))
    await parts.client.hset(parts.keys.job(job.id), mapping={"status": '"succeeded"', "stop_reason": '"accepted"'})
    assert await parts.lifecycle.settle(job.id) == "resent"
    assert [e.type for e in await parts.events(job.id)] == ["status", "end"]
    assert 0 < await parts.client.ttl(parts.keys.events(job.id)) <= 600


async def test_a_queued_job_whose_record_expired_leaves_the_queue_and_its_cap(parts: Parts) -> None:
    """GCR_RESULT_TTL_S shorter than GCR_QUEUE_TIMEOUT_S: the record of a queued job expires
    first. Its id must not stay in the queued index, where it would fill the queue cap for good."""
    job = await parts.job("vanished-00000001")
    await parts.client.delete(parts.keys.job(job.id))
    await asyncio.sleep(0.05)
    assert await parts.lifecycle.expire_unclaimed(max_wait_s=0.01) == []
    assert await parts.client.zcard(parts.keys.queued_index()) == 0
    assert await parts.client.zcard(parts.keys.queued_since()) == 0
    spec = GenerateRequest(prompt="p", model="sim", generation=GenerationParams(seed=1))
    await parts.lifecycle.create(
        StoredJob(id="after-it-0000001", status="queued", spec=spec, created_at=time.time(), owner="t"), queue_max=1
    )


async def test_a_worker_that_claims_a_job_whose_record_expired_takes_it_out_of_the_queue(parts: Parts) -> None:
    job = await parts.job("vanished-00000002")
    await parts.client.delete(parts.keys.job(job.id))
    assert (await parts.lifecycle.start(job.id, "A", 3))[0] == "missing"
    assert await parts.client.zcard(parts.keys.queued_index()) == 0


async def test_a_running_job_cannot_be_settled(parts: Parts) -> None:
    job = await parts.job("running-000000001")
    await parts.queue.claim("A", 1)
    assert (await parts.lifecycle.start(job.id, "A", 3))[0] == "ok"
    assert await parts.lifecycle.settle(job.id) == "open"
    assert await parts.lifecycle.finish(job.id, "B", status="succeeded") == "not_owner"
    assert (await parts.store.get(job.id)).status == "running"


async def _run_losing_write(stack: Stack, fail_at: int, lose: Loss) -> tuple[int, bool]:
    """A 2-round job on a worker that loses job write number `fail_at`; how many job writes
    it made, and whether the one was lost. The job must end succeeded, every round once."""
    client = failing_writes(stack.settings.redis_url, fail_at, lose)
    worker = await stack.start_worker(redis_client=client)
    job_id = await stack.submit("through lost writes", loop={"max_rounds": 2, "threshold": 1.0, "patience": None})
    doc = await stack.wait(job_id, timeout_s=30)
    assert doc.status == "succeeded" and doc.stop_reason == "max_rounds", (fail_at, lose, doc.error)
    assert [r.index for r in doc.rounds] == [0, 1], (fail_at, lose)
    keys = Keys(stack.settings.redis_prefix)
    reader = connect(stack.settings.redis_url)
    try:
        # Its stream ends: the last event is the `end`, as every follower needs.
        ending = await JobStore(reader, keys, 600).last_event(job_id)
        assert ending is not None and ending[1].type == "end", (fail_at, lose)
        assert ending[1].data["status"] == "succeeded", (fail_at, lose)
        assert not await reader.zscore(keys.queued_index(), job_id)
        assert json.loads(await reader.hget(keys.job(job_id), "queue")) is None
    finally:
        await reader.aclose()
    counter = client.counter
    await stack.stop_workers()
    del worker
    return counter.writes, counter.failed


@pytest.mark.timeout(300)
@pytest.mark.parametrize("lose", ["request", "reply"])
async def test_losing_any_one_write_of_a_job_still_ends_it_with_its_end_event(stack: Stack, lose: Loss) -> None:
    await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction="lost writes", rounds=[0.4, 0.6])]))
    total, _ = await _run_losing_write(stack, 0, lose)
    assert total >= 10  # start, stages, checkpoints, the ending...
    for fail_at in range(1, total + 1):
        _, failed = await _run_losing_write(stack, fail_at, lose)
        assert failed, f"write {fail_at} of {total} was never made"
