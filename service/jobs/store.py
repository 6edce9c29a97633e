"""Job state in Redis: documents, rounds (the checkpoint), events and images.

A job is a hash of JSON-encoded fields plus a list of finished rounds. State
changes that race (a client cancelling while a worker claims; a worker that was
presumed dead writing after another took over) go through small Lua scripts, so
each is one atomic step: the worker that owns a job is fenced by its id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis
from pydantic import BaseModel

from gcr.types import PRIORITIES, JobDocument, JobError, JobEvent, Round
from service.errors import NotFound, QueueFull
from service.jobs.artifacts import ArtifactStore
from service.jobs.connection import idempotent_read, translate_errors
from service.jobs.keys import CONSUMER_GROUP, Keys

if TYPE_CHECKING:
    from service.jobs.listener import EventListener
    from service.jobs.queue import Claim

EVENTS_MAXLEN = 5000
# Queue position orders by priority first, then by submit time.
PRIORITY_RANK = {priority: rank for rank, priority in enumerate(PRIORITIES)}
ORDER_SPAN = 10**13  # above any creation time in ms: a score is rank * ORDER_SPAN + created ms

# Fields are JSON; statuses compare as JSON strings ('"queued"').
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == '"queued"' then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'stop_reason', '"cancelled"',
             'finished_at', ARGV[2], 'cancel_requested', 'true', 'stage', 'null')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 'cancelled'
elseif status == '"running"' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
  return 'requested'
end
return 'terminal'
"""

# Admission and enqueue in one step, so concurrent submits cannot overshoot the queue cap.
# KEYS: job, queued index, all jobs, queue stream, the tenant's jobs.
# ARGV: cap (0: none), ttl, queue order, created_at, id, oldest kept, field pairs...
_CREATE = """
if tonumber(ARGV[1]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[6])
redis.call('EXPIRE', KEYS[5], ARGV[2])
redis.call('XADD', KEYS[4], '*', 'job', ARGV[5])
return 1
"""

# A job still queued ends as expired (nobody claimed it in time); any other status is left alone.
# One that already has a best image (it waits to hop to another model) ends as succeeded with it.
_EXPIRE_QUEUED = """
local status = redis.call('HGET', KEYS[1], 'status')
redis.call('ZREM', KEYS[2], ARGV[1])
if status ~= '"queued"' then return 0 end
local best = redis.call('HGET', KEYS[1], 'best')
local ending = 1
if best and best ~= 'null' then ending = 2 end
redis.call('HSET', KEYS[1], 'status', ending == 2 and '"succeeded"' or '"expired"', 'stop_reason', '"unclaimed"',
           'stage', 'null', 'finished_at', ARGV[2], 'error', ARGV[3])
return ending
"""

# Hand a running job owned by ARGV[1] to another model's stream, and acknowledge the entry
# this worker held, in one step: the job is queued on exactly one stream whatever crashes.
# A hop is progress, not a failed attempt: the next start's count is taken back here.
# KEYS: job, queued index, target stream, held stream. ARGV: worker, id, queue order, held entry, group.
_HAND_OFF = """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', '"queued"', 'stage', '"queued"', 'worker', 'null')
if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') > 0 then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[2])
redis.call('XACK', KEYS[4], ARGV[5], ARGV[4])
return 1
"""

_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', '0'} end
if status ~= '"queued"' and status ~= '"running"' then return {'terminal', '0'} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if ARGV[5] == '1' then attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('ZREM', KEYS[2], ARGV[1])
if attempts > tonumber(ARGV[4]) then return {'exhausted', tostring(attempts)} end
redis.call('HSET', KEYS[1], 'status', '"running"', 'worker', ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
end
return {'ok', tostring(attempts)}
"""

# Apply field updates only while the job runs and is owned by ARGV[1].
_OWNED_SET = """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# Append round ARGV[2] at index ARGV[1] exactly once, if the job is still ours.
_CHECKPOINT = """
if redis.call('HGET', KEYS[2], 'status') ~= '"running"' then return -1 end
if redis.call('HGET', KEYS[2], 'worker') ~= ARGV[3] then return -1 end
local n = redis.call('LLEN', KEYS[1])
if n ~= tonumber(ARGV[1]) then return -2 end
redis.call('RPUSH', KEYS[1], ARGV[2])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return n + 1
"""


def queue_order(doc: JobDocument) -> int:
    """A job's score in the queued index: priority first, then submit time (a job that hops
    between models keeps its place)."""
    return PRIORITY_RANK[doc.spec.priority] * ORDER_SPAN + int(doc.created_at * 1000)


def _encode(value: Any) -> str:
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value)


def _encoded(fields: Mapping[str, Any]) -> dict[str, str]:
    return {key: _encode(value) for key, value in fields.items()}


def _pairs(fields: Mapping[str, Any]) -> list[str]:
    """Flattened for a Lua script's ARGV: key1, value1, key2, value2, ..."""
    return [item for pair in _encoded(fields).items() for item in pair]


class JobStore:
    """Reads and writes job state; shared by the gateway and the worker."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        ttl_s: int,
        artifacts: ArtifactStore | None = None,
        listener: EventListener | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._artifacts = artifacts
        self.listener = listener
        """The gateway's: blocking event reads wait on it instead of on a pooled connection."""
        self._cancel = client.register_script(_CANCEL)
        self._start = client.register_script(_START)
        self._owned_set = client.register_script(_OWNED_SET)
        self._checkpoint = client.register_script(_CHECKPOINT)
        self._expire_queued = client.register_script(_EXPIRE_QUEUED)
        self._create = client.register_script(_CREATE)
        self._hand_off = client.register_script(_HAND_OFF)

    # --- reading -------------------------------------------------------------------
    @idempotent_read
    async def get(self, job_id: str) -> JobDocument:
        """The whole document, rounds included; `NotFound` for unknown or expired ids."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.job(job_id))
            pipe.lrange(self.keys.rounds(job_id), 0, -1)
            pipe.zrank(self.keys.queued_index(), job_id)
            fields, rounds, rank = await pipe.execute()
        if not fields:
            raise NotFound.job(job_id)
        doc = {k.decode(): json.loads(v) for k, v in fields.items()}
        doc["rounds"] = [json.loads(r) for r in rounds]
        if doc.get("status") == "queued" and rank is not None:
            doc["queue_position"] = rank
        return JobDocument.model_validate(doc)

    @idempotent_read
    async def get_field(self, job_id: str, name: str) -> Any:
        raw = await self.redis.hget(self.keys.job(job_id), name)
        return None if raw is None else json.loads(raw)

    @idempotent_read
    async def owner(self, job_id: str) -> str | None:
        """The job's tenant; `NotFound` for unknown or expired ids."""
        fields = await self.redis.hmget(self.keys.job(job_id), ["status", "owner"])
        if fields[0] is None:
            raise NotFound.job(job_id)
        return None if fields[1] is None else json.loads(fields[1])

    @idempotent_read
    async def exists(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.job(job_id)))

    @idempotent_read
    async def recent_ids(self, limit: int, before: float | None = None) -> list[str]:
        """Job ids, newest first, created before `before` (a timestamp)."""
        top = "+inf" if before is None else f"({before}"
        ids = await self.redis.zrevrangebyscore(self.keys.all_jobs(), top, "-inf", start=0, num=limit)
        return [i.decode() for i in ids]

    @idempotent_read
    async def tenant_ids(self, tenant: str, limit: int, before: float | None = None) -> list[str]:
        """One tenant's job ids, newest first, created before `before`."""
        top = "+inf" if before is None else f"({before}"
        ids = await self.redis.zrevrangebyscore(self.keys.tenant_jobs(tenant), top, "-inf", start=0, num=limit)
        return [i.decode() for i in ids]

    # --- images: in the artifact store, referenced by the job ------------------------------
    @property
    def artifacts(self) -> ArtifactStore:
        if self._artifacts is None:
            raise RuntimeError("this JobStore was made without an artifact store")
        return self._artifacts

    async def image_key(self, job_id: str, round_index: int, candidate: int) -> str:
        """The object key of a candidate the job lists as having an image; `NotFound` otherwise."""
        raw = await self.rounds_json(job_id)
        listed = any(
            r.get("index") == round_index
            and any(c.get("index") == candidate and (c.get("has_image") or c.get("image_url")) for c in r["candidates"])
            for r in raw
        )
        if not listed:
            raise NotFound(f"job {job_id!r} has no image for round {round_index}, candidate {candidate}")
        return self.keys.image(job_id, round_index, candidate)

    @idempotent_read
    async def rounds_json(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(r) for r in await self.redis.lrange(self.keys.rounds(job_id), 0, -1)]

    async def get_image(self, job_id: str, round_index: int, candidate: int) -> bytes:
        """PNG bytes; `NotFound` for a candidate without an image, `ArtifactGone` when it is gone."""
        return await self.artifacts.get(await self.image_key(job_id, round_index, candidate))

    async def get_source_image(self, job_id: str) -> bytes:
        if (await self.get_field(job_id, "spec") or {}).get("mode") != "edit":
            raise NotFound(f"job {job_id!r} has no source image")
        return await self.artifacts.get(self.keys.source_image(job_id))

    async def read_events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None
    ) -> list[tuple[str, JobEvent]]:
        """Events after the stream id `after`, waiting up to `block_ms` for the first one.

        With a listener (the gateway's), the wait holds no pooled connection: the events
        are read without blocking, and when there are none yet, the listener says when to
        read again. Without one (the worker, tools), the read blocks on its connection."""
        if not block_ms or self.listener is None:
            return await self._read_events(job_id, after, block_ms)
        events = await self._read_events(job_id, after, None)
        if events:
            return events
        if await self.listener.wait(job_id, after, block_ms / 1000):
            return await self._read_events(job_id, after, None)
        return []

    @idempotent_read
    async def last_event(self, job_id: str) -> tuple[str, JobEvent] | None:
        """The newest event of the job's stream, with its id; None when it has none."""
        entries = await self.redis.xrevrange(self.keys.events(job_id), "+", "-", count=1)
        if not entries:
            return None
        entry_id, payload = entries[0]
        return entry_id.decode(), JobEvent.model_validate_json(payload[b"event"])

    @idempotent_read
    async def _read_events(self, job_id: str, after: str, block_ms: int | None) -> list[tuple[str, JobEvent]]:
        reply = await self.redis.xread({self.keys.events(job_id): after}, count=100, block=block_ms)
        out: list[tuple[str, JobEvent]] = []
        for _stream, entries in reply or []:
            for entry_id, payload in entries:
                out.append((entry_id.decode(), JobEvent.model_validate_json(payload[b"event"])))
        return out

    # --- writing: the gateway ---------------------------------------------------------------
    @translate_errors
    async def create(self, doc: JobDocument, source_png: bytes | None = None, queue_max: int = 0) -> None:
        """Store a new job and queue it in one atomic step: a job is never stored but not queued,
        and with `queue_max` the cap holds however many submits race (`QueueFull` beyond it).
        An edit's source image goes to the artifact store first (swept with the rest if the
        job is then refused)."""
        if doc.spec.model is None:
            raise ValueError("a job is routed to a model (GatewayState.route) before it is stored")
        if source_png is not None:
            await self.artifacts.put(self.keys.source_image(doc.id), source_png)
        # Drop unset top-level fields only: a nested null (e.g. loop.patience) is a choice.
        dumped = doc.model_dump(exclude={"rounds", "queue_position", "links"})
        fields = {key: value for key, value in dumped.items() if value is not None}
        fields["owner"] = doc.owner
        if doc.base_url is not None:
            fields["base_url"] = doc.base_url
        priority = doc.spec.priority
        order = queue_order(doc)
        keys = [
            self.keys.job(doc.id),
            self.keys.queued_index(),
            self.keys.all_jobs(),
            self.keys.queue(doc.spec.model, doc.spec.mode, priority),
            self.keys.tenant_jobs(doc.owner or ""),
        ]
        args: list[Any] = [queue_max, self.ttl_s, order, doc.created_at, doc.id, doc.created_at - self.ttl_s]
        if not await self._create(keys=keys, args=[*args, *_pairs(fields)]):
            raise QueueFull(f"the queue holds {queue_max} jobs; retry later")

    # --- idempotency (keys are per tenant) ---------------------------------------------------
    @idempotent_read
    async def idempotent_job(self, tenant: str, key: str) -> tuple[str, str] | None:
        """(job id, request fingerprint) stored under the tenant's `Idempotency-Key`, if any."""
        raw = await self.redis.get(self.keys.idempotency(tenant, key))
        if raw is None:
            return None
        job_id, _, fingerprint = raw.decode().partition(":")
        return job_id, fingerprint

    @translate_errors
    async def claim_idempotency(self, tenant: str, key: str, job_id: str, fingerprint: str) -> bool:
        """Take the key for `job_id` unless an earlier request holds it."""
        scoped = self.keys.idempotency(tenant, key)
        return bool(await self.redis.set(scoped, f"{job_id}:{fingerprint}", nx=True, ex=self.ttl_s))

    @translate_errors
    async def release_idempotency(self, tenant: str, key: str) -> None:
        await self.redis.delete(self.keys.idempotency(tenant, key))

    @translate_errors
    async def cancel(self, job_id: str) -> str:
        """`cancelled` (was queued: it will never run), `requested` (running: stops at the next
        stage boundary), `terminal` (already over) or `missing`."""
        result = await self._cancel(
            keys=[self.keys.job(job_id), self.keys.queued_index()], args=[job_id, _encode(time.time())]
        )
        outcome = result.decode()
        if outcome == "cancelled":
            await self.publish_end(job_id, "cancelled", "cancelled")
        return str(outcome)

    @translate_errors
    async def expire_unclaimed(self, max_wait_s: float, batch: int = 100) -> list[str]:
        """End as `expired` (stop reason `unclaimed`) the queued jobs no worker claimed within
        `max_wait_s`: workers may vanish after a job was accepted, and nobody should wait forever.

        Safe to run from every gateway replica at once: each job ends once."""
        now = time.time()
        expired: list[str] = []
        for priority, rank in PRIORITY_RANK.items():
            low = rank * ORDER_SPAN
            ids = await self.redis.zrangebyscore(
                self.keys.queued_index(), low, low + int((now - max_wait_s) * 1000), start=0, num=batch
            )
            for raw in ids:
                job_id = raw.decode()
                spec = await self.get_field(job_id, "spec") or {}
                error = JobError(
                    code="unclaimed",
                    message=f"no worker claimed this job within {max_wait_s:.0f}s (GCR_QUEUE_TIMEOUT_S); "
                    f"check that a worker serving model {spec.get('model', '?')!r} in mode "
                    f"{spec.get('mode', '?')!r} ({priority} priority) runs",
                    retryable=True,
                )
                ended = await self._expire_queued(
                    keys=[self.keys.job(job_id), self.keys.queued_index()],
                    args=[job_id, _encode(now), _encode(error)],
                )
                if ended:
                    await self.publish_end(job_id, "succeeded" if ended == 2 else "expired", "unclaimed", error)
                    expired.append(job_id)
        return expired

    # --- writing: the worker ------------------------------------------------------------------
    @translate_errors
    async def start(
        self, job_id: str, worker_id: str, max_attempts: int, *, count_attempt: bool = True
    ) -> tuple[str, int]:
        """Mark a claimed job running and owned by `worker_id`.

        `count_attempt=False` when the same worker resumes a job after losing Redis for
        a moment: that is not the job's fault. Returns
        (`ok` | `terminal` | `missing` | `exhausted`, attempts)."""
        outcome, attempts = await self._start(
            keys=[self.keys.job(job_id), self.keys.queued_index()],
            args=[job_id, _encode(worker_id), _encode(time.time()), max_attempts, "1" if count_attempt else "0"],
        )
        return outcome.decode(), int(attempts)

    @translate_errors
    async def hand_off(self, doc: JobDocument, worker_id: str, held: Claim, model: str, mode: str) -> bool:
        """Queue a running job this worker owns on `model`'s `mode` stream and acknowledge the
        entry it holds (`held`), atomically; False when the job is no longer this worker's."""
        handed = await self._hand_off(
            keys=[
                self.keys.job(doc.id),
                self.keys.queued_index(),
                self.keys.queue(model, mode, doc.spec.priority),
                held.stream,
            ],
            args=[_encode(worker_id), doc.id, queue_order(doc), held.entry_id, CONSUMER_GROUP],
        )
        return bool(handed)

    @translate_errors
    async def update(self, job_id: str, worker_id: str, **fields: Any) -> bool:
        """Set fields of a running job this worker owns; False when it no longer does."""
        applied = await self._owned_set(keys=[self.keys.job(job_id)], args=[_encode(worker_id), *_pairs(fields)])
        return bool(applied)

    @translate_errors
    async def force_update(self, job_id: str, **fields: Any) -> None:
        """Set fields regardless of owner: for a terminal job's webhook status, and dead letters."""
        await self.redis.hset(self.keys.job(job_id), mapping=_encoded(fields))

    async def fail(self, job_id: str, error: JobError, owner: str | None = None) -> bool:
        """End a job as failed with `error`. With `owner`, only while that worker holds it
        (returns False otherwise); without, unconditionally (a dead letter nobody holds)."""
        fields = {
            "status": "failed",
            "stop_reason": "failed",
            "stage": None,
            "finished_at": time.time(),
            "error": error,
        }
        if owner is None:
            await self.force_update(job_id, **fields)
        elif not await self.update(job_id, owner, **fields):
            return False
        await self.publish_end(job_id, "failed", "failed", error)
        return True

    async def publish_end(
        self, job_id: str, status: str, stop_reason: str | None, error: JobError | None = None
    ) -> None:
        """The two events every ending sends: the final `status`, then `end` (SSE streams close on it)."""
        data: dict[str, Any] = {"status": status, "stop_reason": stop_reason}
        if error is not None:
            data["error"] = error.model_dump()
        await self.publish(JobEvent(type="status", job_id=job_id, at=time.time(), data=data))
        await self.publish(JobEvent(type="end", job_id=job_id, at=time.time(), data=data))

    @translate_errors
    async def checkpoint(self, job_id: str, worker_id: str, round_: Round, **fields: Any) -> bool:
        """Append a finished round (exactly once) and set `fields`, atomically.

        False when the job is no longer this worker's, or the round was already written."""
        result = await self._checkpoint(
            keys=[self.keys.rounds(job_id), self.keys.job(job_id)],
            args=[round_.index, round_.model_dump_json(), _encode(worker_id), self.ttl_s, *_pairs(fields)],
        )
        return int(result) > 0

    async def put_image(self, job_id: str, round_index: int, candidate: int, png: bytes) -> None:
        await self.artifacts.put(self.keys.image(job_id, round_index, candidate), png)

    @translate_errors
    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.get_field(job_id, "cancel_requested"))

    @translate_errors
    async def publish(self, event: JobEvent) -> str:
        key = self.keys.events(event.job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"event": event.model_dump_json()}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(key, self.ttl_s)
            pipe.expire(self.keys.job(event.job_id), self.ttl_s)
            entry_id, *_ = await pipe.execute()
        return str(entry_id.decode())
