"""One reader of job event streams per gateway, so that waiting holds no pooled connection.

Every open `GET /jobs/{id}/events`, every `Prefer: wait` and every /v1 call waits for
new events of a job. Done as one blocking XREAD each, every waiter held a connection of
the request pool for up to 10 s at a time: about 200 of them exhausted the pool, and
`POST /generate` and `GET /jobs/{id}` queued behind them until they answered 503.

Here one task per gateway runs a single blocking XREAD, on a connection of its own,
over the event streams of every job somebody waits for, and wakes the waiters of a
stream that got entries. A woken waiter reads its events with a non-blocking XREAD
through the request pool (a connection held for one round trip, like any request).
When a waiter asks for a job the listener does not watch yet, an entry on the
listener's own wake stream ends the blocking read, and the next one includes the job.

Wakes are hints, never data: a waiter always re-reads from its own last id, so a
spurious wake costs one short read and a lost one at most `block_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as redis

from service.jobs.connection import SOCKET_TIMEOUT_S, connect
from service.jobs.keys import Keys

log = logging.getLogger("gcr.listener")

LISTEN_BLOCK_MS = 5_000  # below redis_client.SOCKET_TIMEOUT_S
WAKE_MAXLEN = 16
RETRY_FIRST_S = 0.1
RETRY_CAP_S = 2.0
UNHEALTHY_AFTER_S = 10.0  # failing this long, the gateway reports itself unready
WATCH_GRACE_S = 2.0  # a watch without waiters is read this long before it is dropped


def stream_position(entry_id: str) -> tuple[int, int]:
    """A stream entry id (`1700000000000-0`) as (ms, seq), which compare in stream order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class _Waiter:
    after: tuple[int, int]
    woken: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Watch:
    """One job's event stream: where the listener reads from, and who waits on it."""

    cursor: str
    waiters: set[_Waiter] = field(default_factory=set)
    idle_since: float = 0.0


class EventListener:
    """Wakes the waiters of job event streams; one per gateway process."""

    def __init__(self, redis_url: str, keys: Keys, pool: redis.Redis, *, block_ms: int | None = None) -> None:
        block_ms = block_ms or LISTEN_BLOCK_MS
        assert block_ms / 1000 < SOCKET_TIMEOUT_S
        self._keys = keys
        self._pool = pool  # the request pool: only for the short wake XADD
        # Its own connection: the blocking read never takes one from the request pool.
        self._redis = connect(redis_url, max_connections=1, pool_timeout_s=SOCKET_TIMEOUT_S)
        self._block_ms = block_ms
        self._wake_key = keys.listener_wake(uuid.uuid4().hex[:16])
        self._wake_cursor = "0-0"
        self._wake_pending = False
        self._watches: dict[str, _Watch] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._stopping = False

    # --- what the gateway asks -----------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Waiters right now, over all jobs."""
        return sum(len(w.waiters) for w in self._watches.values())

    @property
    def healthy(self) -> bool:
        """False once the listener has failed to read for UNHEALTHY_AFTER_S."""
        since = self._failing_since
        return since is None or time.monotonic() - since < UNHEALTHY_AFTER_S

    async def wait(self, job_id: str, after: str, timeout_s: float) -> bool:
        """Until the job's event stream may hold an entry after `after`, or `timeout_s`.

        True when woken (re-read to see what came), False on timeout."""
        self._ensure_running()
        waiter = _Waiter(stream_position(after))
        key = self._keys.events(job_id)
        watch = self._watches.get(key)
        new = watch is None
        if watch is None:
            watch = self._watches[key] = _Watch(cursor=after)
        elif stream_position(watch.cursor) > waiter.after:
            # The listener already passed entries this waiter has not read.
            waiter.woken.set()
        watch.waiters.add(waiter)  # before any await: a watch without waiters may be pruned
        try:
            if new:
                await self._wake()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await waiter.woken.wait()
            return waiter.woken.is_set()
        finally:
            watch.waiters.discard(waiter)
            if not watch.waiters:
                # Kept for WATCH_GRACE_S: a stream's next wait follows at once, and finding
                # its watch in place spares a wake and a rebuilt read of every stream.
                watch.idle_since = time.monotonic()

    async def aclose(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self._pool.delete(self._wake_key)
        await self._redis.aclose()

    # --- the reader ----------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="gcr-event-listener")

    async def _wake(self) -> None:
        """End the listener's blocking read, so that the next one includes a new stream."""
        if self._wake_pending:
            return  # a wake since the listener last built its key list is unread: it suffices
        self._wake_pending = True
        try:
            async with self._pool.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=WAKE_MAXLEN, approximate=True)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            # The new waiter is then seen within one block_ms; its own read reports Redis down.
            self._wake_pending = False
            log.debug("could not wake the event listener: %s", exc)

    async def _run(self) -> None:
        delay = RETRY_FIRST_S
        while not self._stopping:
            self._wake_pending = False
            self._prune()
            streams = {key: watch.cursor for key, watch in self._watches.items()}
            streams[self._wake_key] = self._wake_cursor
            try:
                reply = await self._redis.xread(streams, count=100, block=self._block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis, OSError: keep the waiters re-reading, retry
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("event listener: reading Redis failed (%s); retrying", exc)
                self._wake_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)
                continue
            if self._failing_since is not None:
                log.info("event listener: reading Redis again")
            self._failing_since, delay = None, RETRY_FIRST_S
            for raw_key, entries in reply or []:
                key = raw_key.decode()
                if not entries:
                    continue
                last = entries[-1][0].decode()
                if key == self._wake_key:
                    self._wake_cursor = last
                    continue
                watch = self._watches.get(key)
                if watch is None:
                    continue
                watch.cursor = last
                newest = stream_position(last)
                for waiter in watch.waiters:
                    if waiter.after < newest:
                        waiter.woken.set()

    def _prune(self) -> None:
        stale = time.monotonic() - WATCH_GRACE_S
        for key in [k for k, w in self._watches.items() if not w.waiters and w.idle_since < stale]:
            del self._watches[key]

    def _wake_all(self) -> None:
        for watch in self._watches.values():
            for waiter in watch.waiters:
                waiter.woken.set()
