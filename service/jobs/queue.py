"""The job queue: one Redis Stream per model, mode and priority, read through one consumer group.

A worker reads the streams of its own model and modes only (an SDXL worker never
claims a FLUX job); the gateway picks the stream when it admits the job.

Several workers share the group, so each entry goes to exactly one of them. An
entry stays pending until the worker acknowledges it at the job's end; a worker
that dies leaves its entries pending, and another claims them with XAUTOCLAIM
once they have been idle for the visibility timeout. A live worker keeps its
entries from going idle by re-claiming them for itself on every heartbeat.

Claiming is driven by free capacity (the worker asks for as many entries as it
can start now) and is fair across priorities: most claims look at `high` first,
but a fixed share looks at `normal` or `low` first, so no priority starves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as redis
from redis import exceptions as redis_exceptions

from gcr.types import MODES, PRIORITIES
from service.jobs.connection import idempotent_read, translate_errors
from service.jobs.keys import CONSUMER_GROUP, Keys

# Which priority each claim slot tries first (then the others, highest first):
# out of 8 claims under full load, high gets 5, normal 2 and low 1.
FAIRNESS = ("high", "normal", "high", "high", "low", "high", "normal", "high")


# Re-claim entry ARGV[3] only if ARGV[2] still holds it: with no idle (ARGV[4] == '') for
# itself (keep-alive), or handed to ARGV[5] looking idle for ARGV[4] ms (release).
# 0: another consumer holds it now; -1: nobody does (its job ended: the entry is gone).
_TOUCH = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #held == 0 then
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1) == 0 then return -1 end
  return 0
end
if ARGV[4] == '' then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
else
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[5], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
end
return 1
"""


@dataclass(frozen=True)
class Claim:
    """One queue entry this worker holds."""

    stream: str
    priority: str
    entry_id: str
    job_id: str


class JobQueue:
    """The worker's view of the queue (and the gateway's read-only stats)."""

    def __init__(self, client: redis.Redis, keys: Keys, model: str | None = None, modes: Iterable[str] = MODES) -> None:
        """`model`: the model whose streams a worker claims from; the gateway's queue (stats,
        heartbeats) has none and claims nothing."""
        self.redis = client
        self.keys = keys
        self.model = model
        self.modes = tuple(m for m in MODES if m in set(modes))
        self._slot = 0
        self._touch = client.register_script(_TOUCH)

    def _streams(self, priority: str) -> list[str]:
        if self.model is None:
            raise ValueError("this JobQueue has no model: only a worker's queue (with its model) claims")
        return [self.keys.queue(self.model, mode, priority) for mode in self.modes]

    @translate_errors
    async def ensure_groups(self) -> None:
        if self.model is not None:
            await self.redis.sadd(self.keys.models(), self.model)
        for priority in PRIORITIES:
            for stream in self._streams(priority):
                try:
                    await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
                except redis_exceptions.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    def _order(self) -> list[str]:
        first = FAIRNESS[self._slot % len(FAIRNESS)]
        self._slot += 1
        return [first, *(p for p in PRIORITIES if p != first)]

    @translate_errors
    async def claim(self, consumer: str, count: int) -> list[Claim]:
        """Take up to `count` new entries, one slot at a time in fair priority order."""
        claims: list[Claim] = []
        while len(claims) < count:
            claim = None
            for priority in self._order():
                streams = {stream: ">" for stream in self._streams(priority)}
                try:
                    reply = await self.redis.xreadgroup(CONSUMER_GROUP, consumer, streams, count=1)
                except redis_exceptions.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # The stream or group is gone (a Redis restart without persistence):
                    # recreate them; anything that was queued there is lost with them.
                    await self.ensure_groups()
                    reply = await self.redis.xreadgroup(CONSUMER_GROUP, consumer, streams, count=1)
                for stream, entries in reply or []:
                    for entry_id, payload in entries:
                        if claim is None:
                            claim = Claim(stream.decode(), priority, entry_id.decode(), payload[b"job"].decode())
                        else:  # a second mode's stream answered too: hand it straight back
                            await self.release(consumer, [Claim(stream.decode(), priority, entry_id.decode(), "")])
                if claim is not None:
                    break
            if claim is None:
                break
            claims.append(claim)
        return claims

    @translate_errors
    async def wait_for_entries(self, timeout_s: float) -> None:
        """Block until any priority holds an entry the group has not delivered yet, or the timeout passes.

        It reads from each stream's last-delivered id rather than `$` (only what arrives
        after the call): an entry added between a `claim` that found nothing and this
        wait is then seen at once, not after the timeout.
        """
        streams = [stream for p in PRIORITIES for stream in self._streams(p)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        start = dict.fromkeys(streams, "$")  # no group (yet): fall back to new entries only
        for stream, groups in zip(streams, replies, strict=True):
            for group in groups if isinstance(groups, list) else []:
                if group.get("name") == CONSUMER_GROUP.encode():
                    start[stream] = group["last-delivered-id"]
        await self.redis.xread(start, count=1, block=max(1, int(timeout_s * 1000)))

    @translate_errors
    async def reclaim(self, consumer: str, min_idle_s: float, count: int) -> list[Claim]:
        """Take over entries whose worker stopped heartbeating (idle longer than `min_idle_s`)."""
        claims: list[Claim] = []
        for priority, key in ((p, k) for p in PRIORITIES for k in self._streams(p)):
            if len(claims) >= count:
                break
            try:
                reply = await self.redis.xautoclaim(
                    key,
                    CONSUMER_GROUP,
                    consumer,
                    int(min_idle_s * 1000),
                    start_id="0-0",
                    count=count - len(claims),
                )
            except redis_exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis restarted without its data: nothing is pending; make the groups again,
                # or every later claim would fail the same way.
                await self.ensure_groups()
                continue
            entries = reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            for entry_id, payload in entries:
                if payload is None:
                    continue
                claims.append(Claim(key, priority, entry_id.decode(), payload[b"job"].decode()))
            if deleted:
                await self.redis.xack(key, CONSUMER_GROUP, *deleted)
        return claims

    @translate_errors
    async def keep_alive(self, consumer: str, claims: list[Claim]) -> list[Claim]:
        """Reset the idle time of entries this worker still holds; returns those another worker
        holds now (it took them over after a stall: they must not be taken back). An entry nobody
        holds any more (its job just ended) is not lost."""
        lost = []
        for claim in claims:
            touched = await self._touch(keys=[claim.stream], args=[CONSUMER_GROUP, consumer, claim.entry_id, "", ""])
            if touched == 0:
                lost.append(claim)
        return lost

    @translate_errors
    async def release(self, consumer: str, claims: list[Claim]) -> None:
        """Make entries this worker holds claimable by any worker at once (they look idle for a day)."""
        for claim in claims:
            await self._touch(
                keys=[claim.stream], args=[CONSUMER_GROUP, consumer, claim.entry_id, "86400000", "released"]
            )

    @translate_errors
    async def ack(self, claim: Claim) -> None:
        key = claim.stream
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(key, CONSUMER_GROUP, claim.entry_id)
            pipe.xdel(key, claim.entry_id)
            await pipe.execute()

    @idempotent_read
    async def queued_count(self) -> int:
        return int(await self.redis.zcard(self.keys.queued_index()))

    @idempotent_read
    async def has_served(self, model: str, mode: str) -> bool:
        """Whether a worker of `model` ever served `mode` here (it created the stream)."""
        return bool(await self.redis.exists(self.keys.queue(model, mode, "normal")))

    @idempotent_read
    async def stream_stats(self, models: Iterable[str] = ()) -> dict[str, dict[str, dict[str, int]]]:
        """Per model, then per `mode:priority` stream: its entries and how many of them are
        pending (claimed, not yet acknowledged). Acknowledged entries are deleted, so
        `entries - pending` wait for a worker. Covers `models` (those live workers serve) and
        any other model a worker once served whose streams still hold entries."""
        live = set(models)
        known = {m.decode() for m in await self.redis.smembers(self.keys.models())} | live
        names = [(model, mode, priority) for model in sorted(known) for mode in MODES for priority in PRIORITIES]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xlen(self.keys.queue(*name))
                pipe.xpending(self.keys.queue(*name), CONSUMER_GROUP)
            # A stream no worker ever read has no group: its XPENDING fails, nothing is pending.
            replies = await pipe.execute(raise_on_error=False)
        stats: dict[str, dict[str, dict[str, int]]] = {}
        for (model, mode, priority), length, pending in zip(names, replies[::2], replies[1::2], strict=True):
            count = pending["pending"] if isinstance(pending, dict) else 0
            stats.setdefault(model, {})[f"{mode}:{priority}"] = {"entries": int(length), "pending": int(count)}
        return {
            model: streams
            for model, streams in stats.items()
            if model in live or any(stream["entries"] for stream in streams.values())
        }

    @idempotent_read
    async def groupless(self, queues: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Of these (model, mode) queues, those where a priority's stream has no consumer group:
        nothing claims from them until a worker makes it again (Redis lost its data)."""
        names = sorted({(model, mode, priority) for model, mode in queues for priority in PRIORITIES})
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xinfo_groups(self.keys.queue(*name))
            replies = await pipe.execute(raise_on_error=False)  # no stream: an error, no group either
        missing = set()
        for (model, mode, _priority), groups in zip(names, replies, strict=True):
            names_of = {g.get("name") for g in groups} if isinstance(groups, list) else set()
            if CONSUMER_GROUP.encode() not in names_of:
                missing.add((model, mode))
        return missing

    @idempotent_read
    async def ping(self) -> None:
        await self.redis.ping()

    @idempotent_read
    async def probe_write(self) -> None:
        """A tiny expiring write: `StoreFull` when Redis refuses writes (maxmemory reached), as
        every submit and every job's progress would then be refused."""
        await self.redis.set(self.keys.write_probe(), b"1", ex=60)
