"""A circuit breaker in front of the critic.

When the reward model is down, every job's critique would spend its full retry
budget (and minutes of timeouts) before failing. After `failures` consecutive
unavailable/timeout errors the breaker opens: calls fail at once for `cooldown_s`,
then one trial call is let through (half-open); its success closes the breaker.
Unparseable answers do not count: the server answered. While it is open the
worker stops claiming jobs, and its heartbeat tells /readyz the critic is down.
"""

from __future__ import annotations

import time
from typing import Any

from gcr.types import Critique, Mode
from service.critic.client import CriticLoad
from service.errors import CriticError, CriticTimeout, CriticUnavailable
from workers.critics.protocol import Critic


class CircuitBreaker:
    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.consecutive = 0
        self.opened_at: float | None = None
        self._trial_running = False
        self.last_error = ""

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if time.monotonic() - self.opened_at >= self.cooldown_s else "open"

    def before_call(self) -> None:
        state = self.state
        if state == "closed":
            return
        if state == "half_open" and not self._trial_running:
            self._trial_running = True
            return
        assert self.opened_at is not None
        wait = max(0.0, self.cooldown_s - (time.monotonic() - self.opened_at))
        raise CriticUnavailable(
            f"critic circuit open after {self.consecutive} consecutive failures ({self.last_error}); "
            f"next trial in {wait:.0f}s"
        )

    def success(self) -> None:
        self.consecutive, self.opened_at, self._trial_running = 0, None, False

    def abandon(self) -> None:
        """A call ended without telling whether the critic is up: free the trial slot."""
        self._trial_running = False

    def failure(self, message: str) -> None:
        self.consecutive += 1
        self.last_error = message
        self._trial_running = False
        if self.consecutive >= self.threshold:
            self.opened_at = time.monotonic()


class GuardedCritic:
    """A `Critic` whose calls go through a `CircuitBreaker`."""

    def __init__(self, inner: Critic, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker

    async def critique(
        self, instruction: str, image: bytes, source_image: bytes | None = None, mode: Mode | None = None
    ) -> Critique:
        self.breaker.before_call()
        try:
            result = await self.inner.critique(instruction, image, source_image=source_image, mode=mode)
        except (CriticUnavailable, CriticTimeout) as exc:
            self.breaker.failure(exc.message)
            raise
        except CriticError:
            self.breaker.success()  # it answered, however badly: the server is up
            raise
        except BaseException:
            self.breaker.abandon()  # cancelled or broken before an answer: says nothing either way
            raise
        self.breaker.success()
        return result

    async def probe(self) -> dict[str, Any] | bool:
        return await self.inner.probe()

    async def load(self) -> CriticLoad | None:
        return await self.inner.load()
