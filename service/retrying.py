"""The one way gcr retries: exponential backoff with jitter, on tenacity.

    async for attempt in retrying(on=StoreUnavailable, first_s=0.2, cap_s=10, until=stopping.is_set):
        with attempt:
            await queue.ensure_groups()

Every retry loop (the critic client, webhook delivery, the worker's reconnects and
resumes, the evaluation harness waiting out a full queue) uses this instead of a
hand-written loop. tenacity (a well-kept, widely used library) does the
bookkeeping; this module fixes the policy: which errors, how many attempts or until
what, and "equal jitter" backoff (half the delay fixed, half random, so retries
spread out but never come at once). With `reraise`, the last error leaves the loop
as itself once no attempt is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
)
from tenacity.stop import stop_base

from gcr.backoff import equal_jitter_s

Sleep = Callable[[float], Awaitable[None]]
Wait = Callable[[RetryCallState], float]


def equal_jitter(first_s: float, cap_s: float) -> Wait:
    """Delay before retry n (n = 1, 2, ...): uniform in [d/2, d], d = min(cap, first * 2**(n-1))."""

    def wait(state: RetryCallState) -> float:
        return equal_jitter_s(state.attempt_number - 1, first_s, cap_s)

    return wait


class _Until(stop_base):
    def __init__(self, done: Callable[[], bool]) -> None:
        self.done = done

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.done()


def retrying(
    *,
    on: type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool],
    first_s: float,
    cap_s: float,
    attempts: int | None = None,
    until: Callable[[], bool] | None = None,
    wait: Wait | None = None,
    sleep: Sleep = asyncio.sleep,
    log: logging.Logger | None = None,
    what: str = "call",
) -> AsyncRetrying:
    """Retry errors matched by `on`: at most `attempts` times in all (None: no limit), and no
    more once `until()` is true. `wait` replaces the backoff (e.g. to honour Retry-After)."""
    stop: stop_base = stop_after_attempt(attempts) if attempts else stop_never
    if until is not None:
        stop = stop | _Until(until)
    predicate = retry_if_exception_type(on) if isinstance(on, type | tuple) else retry_if_exception(on)

    def before_sleep(state: RetryCallState) -> None:
        if log is not None and state.outcome is not None and state.next_action is not None:
            log.warning("%s failed (%s); retrying in %.1fs", what, state.outcome.exception(), state.next_action.sleep)

    return AsyncRetrying(
        retry=predicate,
        stop=stop,
        wait=wait or equal_jitter(first_s, cap_s),
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep,
    )
