"""The critic's circuit breaker: opens, half-opens for one trial, closes; never wedges."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gcr.types import Critique
from service.errors import CriticUnavailable, CritiqueUnparseable
from workers.critics.breaker import CircuitBreaker, GuardedCritic


class Scripted:
    """A critic that plays back outcomes: an exception to raise, "hang", or "ok"."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def critique(self, *args: Any, **kwargs: Any) -> Critique:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if outcome == "hang":
            await asyncio.sleep(3600)
        if isinstance(outcome, BaseException):
            raise outcome
        return Critique(dimensions={}, overall=0.5)

    async def probe(self) -> bool:
        return True

    async def load(self) -> None:
        return None

    async def aclose(self) -> None:
        pass


async def test_opens_after_consecutive_failures_then_fails_fast() -> None:
    inner = Scripted(CriticUnavailable("down"), CriticUnavailable("down"))
    guarded = GuardedCritic(inner, CircuitBreaker(failures=2, cooldown_s=60))
    for _ in range(2):
        with pytest.raises(CriticUnavailable):
            await guarded.critique("x", b"")
    with pytest.raises(CriticUnavailable, match="circuit open"):
        await guarded.critique("x", b"")
    assert inner.calls == 2 and guarded.breaker.state == "open"


async def _cooled_down(*then: Any) -> GuardedCritic:
    """A guarded critic whose breaker opened on one failure and whose cooldown has passed;
    the inner critic plays `then` next."""
    guarded = GuardedCritic(Scripted(CriticUnavailable("down"), *then), CircuitBreaker(failures=1, cooldown_s=0.01))
    with pytest.raises(CriticUnavailable):
        await guarded.critique("x", b"")
    await asyncio.sleep(0.02)
    return guarded


async def test_half_open_lets_one_trial_through_and_closes_on_success() -> None:
    guarded = await _cooled_down("ok", "ok")
    assert guarded.breaker.state == "half_open"
    await guarded.critique("x", b"")
    assert guarded.breaker.state == "closed"
    await guarded.critique("x", b"")


async def test_an_unparseable_answer_counts_as_the_critic_being_up() -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=60)
    guarded = GuardedCritic(Scripted(CritiqueUnparseable("garbage")), breaker)
    with pytest.raises(CritiqueUnparseable):
        await guarded.critique("x", b"")
    assert breaker.state == "closed"


async def test_a_cancelled_trial_does_not_wedge_the_breaker() -> None:
    guarded = await _cooled_down("hang", "ok")
    trial = asyncio.create_task(guarded.critique("x", b""))
    await asyncio.sleep(0.01)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    await guarded.critique("x", b"")  # the next call is a trial again, and it succeeds
    assert guarded.breaker.state == "closed"
