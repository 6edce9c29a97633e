"""Connecting to Redis, and turning redis-py's exceptions into ours at this boundary."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as redis
from redis import exceptions as redis_exceptions

from service.errors import StoreUnavailable

P = ParamSpec("P")
T = TypeVar("T")

_UNAVAILABLE = (
    redis_exceptions.ConnectionError,
    redis_exceptions.TimeoutError,
    redis_exceptions.BusyLoadingError,
    OSError,
)


# Every reply must arrive within this, blocking reads included: so the longest
# XREAD BLOCK anyone issues (SSE: 10 s) stays well below it. redis-py's own default
# (5 s) would cut a 10 s block short and report Redis as down.
SOCKET_TIMEOUT_S = 30.0


def connect(url: str) -> redis.Redis:
    """One pooled client per process; binary replies, since images are bytes."""
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=2.0,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=10,
        retry_on_timeout=False,
    )


def translate_errors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate a store method: Redis being unreachable becomes `StoreUnavailable`."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        except redis_exceptions.ResponseError as exc:
            # OOM under noeviction, READONLY after a failover, ...: Redis answered but
            # refused. Retryable for the caller; never a crash or a bare 500.
            raise StoreUnavailable(f"Redis refused the command: {exc}") from exc

    return wrapper
