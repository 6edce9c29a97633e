"""How many critiques one worker keeps in flight: a limit that finds the critic's knee by itself.

The critic (vLLM) decodes a batch of requests at once: up to its knee, more requests in
flight cost each one nothing; past it they queue in the engine, and every critique, and so
every job, only gets longer. A fixed number cannot be right (it moves with the model, the
image size, the answer length, and how many workers share the critic), so the limit adapts,
additive increase and multiplicative decrease as TCP does:

- increase: while critiques wait here for a slot (and the critic's reading counts the ones
  in flight: it is not one taken before they arrived), the limit doubles each step up to
  where it last had to shrink (slow start), and past that grows by one after `PROBE_AFTER`
  quiet steps, probing for room;
- decrease, at most once per critique round trip (a cut shows at the critic only once the
  critiques sent before it came back, as TCP cuts once per RTT): the signal is one of two:
  - the critic's own load, where it publishes it: vLLM's `vllm:num_requests_running` and
    `vllm:num_requests_waiting` on its `/metrics`, read every `WATCH_S` (`Critic.load`).
    Requests waiting there mean the workers together send more than the critic decodes,
    by exactly `waiting`. Each worker cuts its share of that excess: its critiques in
    flight x waiting / (running + waiting), rounded up or down at random in proportion to
    the fraction, so that the cuts of a fleet add up to the excess on average. (Each one
    cutting its whole share rounded down, or the limit to its share, cuts the fleet
    several times over: each worker sees the same queue.)
  - else, the latency of the critiques themselves (Vegas): against the lowest latency seen
    lately, a critique `LATENCY_TOLERANCE` times slower says the critic queues; the limit
    shrinks by `DECREASE`.

`max_inflight_critiques` stays as a fixed ceiling (memory, connections); the limit starts
at `INITIAL` and never leaves [1, ceiling].
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable

from service.critic.client import CriticLoad
from service.errors import CriticUnavailable

INITIAL = 4
WATCH_S = 0.25
PROBE_AFTER = 8  # steps without a critic queue before the limit probes past where it last shrank
DECREASE = 0.9
LATENCY_TOLERANCE = 1.5
LATENCY_WINDOW = 64  # critiques whose lowest latency is the baseline
SMOOTHING = 8  # critiques whose median latency is compared with it


class CritiqueLimit:
    def __init__(
        self,
        ceiling: int,
        initial: int = INITIAL,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling = ceiling
        self._clock = clock
        self._rng = rng or random.Random()
        self._cut_at: float | None = None
        """When the limit was last cut (by `clock`)."""
        self.limit = max(1, min(initial, ceiling))
        self.threshold = ceiling
        """Below it the limit grows fast; set where the limit last had to shrink."""
        self._quiet = 0
        self.inflight = 0
        self.critic_waiting = 0
        """Requests the critic kept waiting when last asked."""
        self.waiting = 0
        """Critiques held back here, waiting for a slot: this worker's backlog."""
        self._freed = asyncio.Condition()
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.latency_s: float | None = None
        """Smoothed latency of a critique at the critic (its median over the last few)."""

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the limit's slots for a critique (waiting, first come first served, for one)."""
        async with self._freed:
            self.waiting += 1
            try:
                await self._freed.wait_for(lambda: self.inflight < self.limit)
            finally:
                self.waiting -= 1
            self.inflight += 1
        started = self._clock()
        answered = True
        try:
            yield
        except CriticUnavailable:
            # Refused before the critic saw it (connection refused, breaker open): milliseconds
            # that say nothing of its latency, and that would pass for the fastest critiques.
            answered = False
            raise
        finally:
            if answered:
                self._record(self._clock() - started)
            async with self._freed:
                self.inflight -= 1
                self._freed.notify_all()

    def _record(self, seconds: float) -> None:
        self._latencies.append(seconds)
        recent = sorted(list(self._latencies)[-SMOOTHING:])
        self.latency_s = recent[len(recent) // 2]

    @property
    def admits(self) -> int:
        """Critiques this limit may run by the time a job claimed now reaches it: twice the
        limit while it still doubles (slow start, below where it last shrank), else the limit.
        Bounding claims by the limit alone would starve the generator while the limit grows:
        it grows only once critiques wait for it, and they wait only once jobs were claimed."""
        if self.limit < min(self.threshold, self.ceiling):
            return min(self.ceiling, self.threshold, 2 * self.limit)
        return self.limit

    @property
    def saturated(self) -> bool:
        """The critic is the bottleneck, and more jobs would only wait longer: it keeps requests
        waiting, or critiques wait here with the limit where the critic last queued (or at
        the ceiling). Not while the limit is still growing towards a knee it has not met."""
        return self.critic_waiting > 0 or (self.waiting > 0 and self.limit >= self.threshold)

    async def adjust(self, critic: CriticLoad | None) -> None:
        """One step, from the critic's engine load or, without one, from latency."""
        self.critic_waiting = critic.waiting if critic is not None else 0
        if critic is not None and critic.waiting > 0:
            if self._may_cut():
                share = self.inflight * critic.waiting / (critic.running + critic.waiting)
                cut = math.floor(share) + (1 if self._rng.random() < share % 1 else 0)
                self._cut(self.limit - cut)
        elif critic is None and self._queueing_by_latency():
            if self._may_cut():
                self._cut(math.floor(self.limit * DECREASE))
        elif critic is None or critic.running + critic.waiting >= self.inflight:
            # Room, on a reading that counts this worker's critiques (one taken while they were
            # still on their way to the critic says nothing about its room).
            self._quiet += 1
            if self.waiting and self.inflight >= self.limit:
                if self.limit < self.threshold:  # slow start: double, up to where it last shrank
                    self.limit = min(self.ceiling, self.threshold, 2 * self.limit)
                elif self._quiet >= PROBE_AFTER:  # past it: probe for room by one, now and then
                    self.limit = min(self.ceiling, self.limit + 1)
                    self._quiet = 0
        async with self._freed:
            self._freed.notify_all()

    def _may_cut(self) -> bool:
        """Once per round trip: not again before the critiques sent before the last cut came back."""
        round_trip = self.latency_s or 0.0
        return self._cut_at is None or self._clock() - self._cut_at >= round_trip

    def _cut(self, limit: int) -> None:
        self.threshold = self.limit = max(1, min(self.limit, limit))
        self._quiet = 0
        self._cut_at = self._clock()

    def _queueing_by_latency(self) -> bool:
        if self.latency_s is None or len(self._latencies) < SMOOTHING:
            return False
        return self.latency_s > LATENCY_TOLERANCE * min(self._latencies)
