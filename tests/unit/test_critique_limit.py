"""The adaptive limit on critiques in flight: slow start, cuts from the critic's queue, round trips."""

from __future__ import annotations

import asyncio
import random
import statistics

import pytest

from service.critic.client import CriticLoad
from service.errors import CriticUnavailable
from workers.critique_limit import DECREASE, PROBE_AFTER, SMOOTHING, CritiqueLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def hold(limit: CritiqueLimit, count: int, release: asyncio.Event) -> list[asyncio.Task[None]]:
    """`count` critiques asking for slots; those past the limit wait. Returns once all asked."""

    async def one() -> None:
        async with limit.slot():
            await release.wait()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    while limit.inflight + limit.waiting < count:
        await asyncio.sleep(0)
    return tasks


async def test_slow_start_doubles_while_critiques_wait_up_to_the_ceiling() -> None:
    limit = CritiqueLimit(ceiling=20, initial=4)
    release = asyncio.Event()
    tasks = await hold(limit, 30, release)
    seen = [limit.limit]
    for _ in range(4):
        await limit.adjust(CriticLoad(running=limit.inflight, waiting=0))
        await asyncio.sleep(0)  # the freed slots are taken
        seen.append(limit.limit)
    assert seen == [4, 8, 16, 20, 20]
    assert limit.inflight == 20 and limit.waiting == 10
    assert limit.saturated, "at the ceiling with critiques waiting: more jobs would only wait"
    release.set()
    await asyncio.gather(*tasks)


async def test_it_does_not_grow_when_nothing_waits_for_it() -> None:
    limit = CritiqueLimit(ceiling=64, initial=4)
    for _ in range(3 * PROBE_AFTER):
        await limit.adjust(CriticLoad(running=0, waiting=0))
    assert limit.limit == 4


async def test_a_lone_worker_cuts_to_what_the_critic_decodes_and_probes_later() -> None:
    clock = Clock()
    limit = CritiqueLimit(ceiling=64, initial=8, clock=clock)
    release = asyncio.Event()
    tasks = await hold(limit, 12, release)
    assert limit.inflight == 8

    # The critic decodes 4 and keeps 4 waiting: exactly 4 too many.
    await limit.adjust(CriticLoad(running=4, waiting=4))
    assert limit.limit == 4 and limit.threshold == 4
    assert limit.saturated
    assert limit.admits == 4, "past a cut, claims count on the limit, not its double"

    # The queue it sent before the cut is still there: no second cut within a round trip.
    limit.latency_s = 1.0
    clock.now += 0.5
    await limit.adjust(CriticLoad(running=4, waiting=4))
    assert limit.limit == 4

    # A reading taken before its critiques reached the critic says nothing: no growth.
    for _ in range(2 * PROBE_AFTER):
        await limit.adjust(CriticLoad(running=2, waiting=0))
    assert limit.limit == 4

    # Quiet: it probes one more after PROBE_AFTER steps, not before.
    for step in range(PROBE_AFTER):
        assert limit.limit == 4, f"grew after {step} quiet steps"
        await limit.adjust(CriticLoad(running=limit.inflight, waiting=0))
    assert limit.limit == 5
    release.set()
    await asyncio.gather(*tasks)


async def test_a_fleet_sharing_a_critic_cuts_its_queue_once_not_once_per_worker() -> None:
    # Four workers at 4 critiques and one probing at 5 (21 in flight); the critic decodes 20
    # and keeps 1 waiting. Each worker sees the same queue: cutting its whole share rounded
    # down, or its limit to its share, would cut 5 or more together.
    rng = random.Random(7)
    totals = []
    for _ in range(2000):
        limits = [CritiqueLimit(ceiling=64, initial=n, rng=rng) for n in (4, 4, 4, 4, 5)]
        for each in limits:
            each.inflight = each.limit
        for each in limits:
            await each.adjust(CriticLoad(running=20, waiting=1))
        totals.append(sum(each.limit for each in limits))
    assert abs(statistics.mean(totals) - 20) < 0.1, "on average the fleet cuts exactly the one waiting"
    assert statistics.mode(totals) == 20, "most often, one worker cuts one"


async def test_without_the_critics_load_a_slower_critique_cuts_the_limit() -> None:
    clock = Clock()
    limit = CritiqueLimit(ceiling=64, initial=10, clock=clock)
    for seconds in [1.0] * SMOOTHING + [1.0 * 2] * SMOOTHING:
        async with limit.slot():
            clock.now += seconds
    await limit.adjust(None)
    assert limit.limit == int(10 * DECREASE)


async def test_a_steady_latency_keeps_the_limit() -> None:
    clock = Clock()
    limit = CritiqueLimit(ceiling=64, initial=10, clock=clock)
    for _ in range(2 * SMOOTHING):
        async with limit.slot():
            clock.now += 1.0
    await limit.adjust(None)
    assert limit.limit == 10


async def test_slow_start_lets_claims_run_one_doubling_ahead() -> None:
    limit = CritiqueLimit(ceiling=64, initial=4)
    assert limit.admits == 8, "the limit grows only once critiques wait: claims must get there first"
    limit = CritiqueLimit(ceiling=6, initial=4)
    assert limit.admits == 6


async def test_a_refused_critique_is_no_latency_sample() -> None:
    """A critique refused before the critic saw it (connection refused, breaker open) comes back
    in milliseconds: as a sample it would pass for the critic's latency through an outage."""
    clock = Clock()
    limit = CritiqueLimit(ceiling=8, initial=4, clock=clock)
    async with limit.slot():
        clock.now += 5.0
    for _ in range(3):
        with pytest.raises(CriticUnavailable):
            async with limit.slot():
                clock.now += 0.002
                raise CriticUnavailable("the critic is unreachable")
    assert limit.latency_s == 5.0 and limit.inflight == 0
