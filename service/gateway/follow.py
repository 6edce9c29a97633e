"""Following one job's events: the one loop behind SSE, `Prefer: wait` and the OpenAI API.

`follow` yields the job's events after a stream position, up to and including its `end`.
What can go wrong while a client waits is handled here, the same way for every route:
- Redis away: reads resume from the last event yielded, with backoff, for up to
  `BLIP_S`; past that `StoreUnavailable` leaves the loop (each route says so its own way);
- the job expired (its events and record gone): a last `end` with status `expired`;
- a deadline (`until`, monotonic): the loop just ends, without an `end`.

The reads wait on the gateway's event listener, never on a pooled connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from gcr.types import JobEvent
from service.errors import StoreUnavailable
from service.jobs.store import JobStore

BLOCK_MS = 10_000  # below service.jobs.connection.SOCKET_TIMEOUT_S
BLIP_S = 30.0  # how long a follower waits for Redis to come back before it gives up
FIRST_RETRY_S = 0.1
RETRY_CAP_S = 2.0


async def follow(
    store: JobStore, job_id: str, after: str = "0-0", *, until: float | None = None
) -> AsyncIterator[tuple[str | None, JobEvent]]:
    """(entry id, event) after `after` until the job's `end` (yielded last); see the module."""
    lost_since: float | None = None
    delay = FIRST_RETRY_S
    while until is None or (left := until - time.monotonic()) > 0:
        block_ms = BLOCK_MS if until is None else max(1, int(min(left, BLOCK_MS / 1000) * 1000))
        try:
            events = await store.read_events(job_id, after=after, block_ms=block_ms)
            exists = bool(events) or await store.exists(job_id)
        except StoreUnavailable:
            now = time.monotonic()
            lost_since = lost_since or now
            if now - lost_since > BLIP_S:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP_S)
            continue
        lost_since, delay = None, FIRST_RETRY_S
        for entry_id, event in events:
            after = entry_id
            yield entry_id, event
            if event.type == "end":
                return
        if not exists:
            yield None, JobEvent(type="end", job_id=job_id, at=time.time(), data={"status": "expired"})
            return
