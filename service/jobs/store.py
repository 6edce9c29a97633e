"""Reading job state from Redis: records, rounds (the checkpoint), events and images.

A job is a hash of JSON-encoded fields plus a list of finished rounds and a stream of
events; its images are in the artifact store. Every change of a job's state goes through
`service.jobs.lifecycle`; this module reads, and writes only what is not the job's state:
progress events, images, idempotency keys, a terminal job's webhook outcome.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis
from redis import exceptions as redis_exceptions

from gcr.types import JobEvent, WebhookStatus
from service.errors import NotFound
from service.jobs.artifacts import ArtifactStore
from service.jobs.connection import idempotent_read, translate_errors
from service.jobs.keys import Keys
from service.jobs.listener import stream_position
from service.jobs.records import StoredJob, StoredRound

if TYPE_CHECKING:
    from service.jobs.listener import EventListener

EVENTS_MAXLEN = 5000


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

    # --- reading -------------------------------------------------------------------
    @idempotent_read
    async def get(self, job_id: str) -> StoredJob:
        """The whole record, rounds included; `NotFound` for unknown or expired ids."""
        try:
            fields, rounds, rank = await self._read_record(job_id, at_once=True)
        except redis_exceptions.OutOfMemoryError:
            # A full Redis refuses a MULTI even of reads (it would queue them): read the keys one
            # after the other. No write can fall between them: a full Redis refuses those too.
            fields, rounds, rank = await self._read_record(job_id, at_once=False)
        if not fields:
            raise NotFound.job(job_id)
        doc = {k.decode(): json.loads(v) for k, v in fields.items()}
        doc["rounds"] = [json.loads(r) for r in rounds]
        if doc.get("status") == "queued" and rank is not None:
            doc["queue_position"] = rank
        return StoredJob.model_validate(doc)

    async def _read_record(self, job_id: str, *, at_once: bool) -> list[Any]:
        async with self.redis.pipeline(transaction=at_once) as pipe:
            pipe.hgetall(self.keys.job(job_id))
            pipe.lrange(self.keys.rounds(job_id), 0, -1)
            pipe.zrank(self.keys.queued_index(), job_id)
            return list(await pipe.execute())

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
        rounds = [StoredRound.model_validate(r) for r in await self.rounds_json(job_id)]
        listed = any(
            r.index == round_index and any(c.index == candidate and c.has_image for c in r.candidates) for r in rounds
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
    async def sent_event(self, job_id: str, entry_id: str) -> bool:
        """Whether the job's stream could have sent `entry_id`: it holds that entry, or the id is
        older than the oldest it keeps (trimmed since)."""
        key = self.keys.events(job_id)
        if await self.redis.xrange(key, entry_id, entry_id, count=1):
            return True
        oldest = await self.redis.xrange(key, "-", "+", count=1)
        return bool(oldest) and stream_position(entry_id) < stream_position(oldest[0][0].decode())

    @idempotent_read
    async def _read_events(self, job_id: str, after: str, block_ms: int | None) -> list[tuple[str, JobEvent]]:
        reply = await self.redis.xread({self.keys.events(job_id): after}, count=100, block=block_ms)
        out: list[tuple[str, JobEvent]] = []
        for _stream, entries in reply or []:
            for entry_id, payload in entries:
                out.append((entry_id.decode(), JobEvent.model_validate_json(payload[b"event"])))
        return out

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

    # --- writing what is not the job's state --------------------------------------------------
    async def put_image(self, job_id: str, round_index: int, candidate: int, png: bytes) -> None:
        await self.artifacts.put(self.keys.image(job_id, round_index, candidate), png)

    @translate_errors
    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.get_field(job_id, "cancel_requested"))

    @translate_errors
    async def record_webhook(self, job_id: str, status: WebhookStatus) -> None:
        """The outcome of a job's `completed` webhook (it is sent after the job ended)."""
        await self.redis.hset(self.keys.job(job_id), "webhook", status.model_dump_json())

    @translate_errors
    async def publish(self, event: JobEvent) -> str:
        """An event that changes no state (stage, progress, preview); state changes append
        their own (`service.jobs.lifecycle`)."""
        key = self.keys.events(event.job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"event": event.model_dump_json()}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(key, self.ttl_s)
            pipe.expire(self.keys.job(event.job_id), self.ttl_s)
            entry_id, *_ = await pipe.execute()
        return str(entry_id.decode())
