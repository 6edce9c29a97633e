"""The gateway's event listener on a real Redis: one connection wakes many waiters, a new
stream is picked up at once, and a listener that cannot read says so (readiness)."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.jobs import listener as listener_module
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.listener import EventListener
from service.servers import free_port


async def test_one_listener_wakes_waiters_of_many_streams(redis_url: str, redis_prefix: str) -> None:
    keys = Keys(redis_prefix)
    pool = connect(redis_url, max_connections=4)
    hub = EventListener(redis_url, keys, pool, block_ms=2_000)
    try:
        jobs = [f"job{n:04d}-abcdefghijklmnop" for n in range(300)]
        waits = [asyncio.create_task(hub.wait(job, "0-0", 10)) for job in jobs]
        await asyncio.sleep(0.3)
        assert hub.waiting == 300
        started = time.monotonic()
        # A stream the listener already watches, and the wake of a brand-new one, both prompt.
        await pool.xadd(keys.events(jobs[7]), {"event": "{}"})
        assert await asyncio.wait_for(waits[7], 1.0) is True
        late = asyncio.create_task(hub.wait("late-job-abcdefghijklm", "0-0", 10))
        await asyncio.sleep(0.1)
        await pool.xadd(keys.events("late-job-abcdefghijklm"), {"event": "{}"})
        assert await asyncio.wait_for(late, 1.0) is True
        assert time.monotonic() - started < 1.5  # far below the 2 s block: the wake worked
        assert not any(w.done() for n, w in enumerate(waits) if n != 7)
        # A waiter that times out says so and leaves nothing behind.
        assert await hub.wait("nobody-writes-here-abcd", "0-0", 0.2) is False
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        assert hub.waiting == 0
    finally:
        await hub.aclose()
        await pool.aclose()


async def test_a_listener_that_cannot_read_turns_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener_module, "UNHEALTHY_AFTER_S", 0.3)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    pool = connect(dead, max_connections=2, pool_timeout_s=0.5)
    hub = EventListener(dead, Keys("gcr-test-dead"), pool, block_ms=500)
    try:
        assert hub.healthy
        await hub.wait("some-job-abcdefghijklmn", "0-0", 1.0)
        await asyncio.sleep(0.4)
        assert not hub.healthy
    finally:
        await hub.aclose()
        await pool.aclose()
