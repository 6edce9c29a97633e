"""Connecting to Redis, and turning redis-py's exceptions into ours at this boundary.

- One pooled client per process, from a *blocking* pool of `GCR_REDIS_MAX_CONNECTIONS`:
  under load a request waits up to `GCR_REDIS_POOL_TIMEOUT_S` for a free connection
  instead of failing (redis-py's default pool raises "Too many connections" at 100).
- Reads retry once on a fresh connection (`idempotent_read`): after a Redis restart
  every pooled connection is dead, and the first request on each would otherwise fail
  although Redis is back. Writes are never retried here: a write whose reply was lost
  may have been applied, and its caller decides (jobs resume from their checkpoint).
- What clients see says that the store is unavailable, never its address; the cause,
  with the host, stays in the exception chain and the logs.
- An error reply is not unavailability: Redis full, read-only or loading is
  (`StoreUnavailable`, retried); WRONGTYPE or a Lua error is not (`StoreError`: the same
  command fails again, and a worker dead-letters the job that keeps hitting it).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import redis as redis_sync
import redis.asyncio as redis
from redis import exceptions as redis_exceptions

from service.errors import StoreError, StoreFull, StoreUnavailable
from service.jobs.keys import Keys

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("gcr.redis")

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
# A connection idle longer than this is PINGed before use (a busy one never is).
HEALTH_CHECK_S = 2


def connect(url: str, max_connections: int = 200, pool_timeout_s: float = 10.0) -> redis.Redis:
    """One pooled client per process; binary replies, since images are bytes."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        decode_responses=False,
        socket_connect_timeout=2.0,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_S,
    )
    return redis.Redis.from_pool(pool)


# Refusals that pass: Redis is full, a replica during a failover, a script or a load that
# will end. Any other error reply (WRONGTYPE, a Lua error) says the same command will fail
# again: `StoreError`, never retried as if Redis were away.
_TRANSIENT_REFUSALS = {
    "OOM": "the job store is full (Redis reached its maxmemory); retry once it frees memory",
    "READONLY": "the job store is read-only (a Redis failover in progress); retry shortly",
    "BUSY": "the job store is busy running a script; retry shortly",
    "LOADING": "the job store is loading its data; retry shortly",
    "MASTERDOWN": "the job store's primary is down; retry shortly",
    "TRYAGAIN": "the job store asked to try again; retry shortly",
    "CLUSTERDOWN": "the job store's cluster is down; retry shortly",
    "NOREPLICAS": "the job store has too few replicas to write; retry shortly",
}


# redis-py strips the code of these replies and raises a class of its own instead (a script's
# refusal too: "OOM command not allowed when used memory > 'maxmemory'" arrives as an
# OutOfMemoryError saying "command not allowed ...").
_REFUSAL_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (redis_exceptions.OutOfMemoryError, "OOM"),
    (redis_exceptions.ReadOnlyError, "READONLY"),
    (redis_exceptions.TryAgainError, "TRYAGAIN"),
    (redis_exceptions.MasterDownError, "MASTERDOWN"),
    (redis_exceptions.ClusterDownError, "CLUSTERDOWN"),
)


def refusal_kind(exc: redis_exceptions.ResponseError) -> str:
    """The error reply's code (`WRONGTYPE`, `OOM`, `ERR`, ...): from redis-py's class for the
    codes it strips, else the reply's first word, also when redis-py wraps it in a pipeline's
    message ("Command # 2 (...) of pipeline caused error: ...")."""
    for cls, kind in _REFUSAL_CLASSES:
        if isinstance(exc, cls):
            return kind
    message = str(exc)
    wrapped = re.search(r"of pipeline caused error: (\S+)", message)
    return wrapped[1] if wrapped else (message.split(" ", 1)[0] or "ERR")


def unavailable(exc: Exception) -> StoreUnavailable | StoreError:
    """Ours, for the client: no address, no credentials (the cause stays chained)."""
    if isinstance(exc, redis_exceptions.ResponseError):
        kind = refusal_kind(exc)
        if kind == "OOM":
            return StoreFull(_TRANSIENT_REFUSALS[kind])
        if kind in _TRANSIENT_REFUSALS:
            return StoreUnavailable(_TRANSIENT_REFUSALS[kind])
        return StoreError(f"the job store refused a command for good ({kind}); see the logs")
    return StoreUnavailable("the job store (Redis) is unavailable; retry shortly")


def translate_errors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate a store method: Redis being unreachable becomes `StoreUnavailable`, a
    permanent error reply `StoreError`."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (*_UNAVAILABLE, redis_exceptions.ResponseError) as exc:
            log.warning("Redis call %s failed: %s", fn.__name__, exc)
            raise unavailable(exc) from exc

    return wrapper


def idempotent_read(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Like `translate_errors`, for methods that only read (`self.redis` is their client):
    a connection error drops the pool's idle connections and the call runs once more."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except _UNAVAILABLE as exc:
            client = getattr(args[0], "redis", None) if args else None
            if client is not None:
                await client.connection_pool.disconnect(inuse_connections=False)
            log.info("Redis call %s failed (%s); retrying once on a fresh connection", fn.__name__, exc)
        except redis_exceptions.ResponseError as exc:
            raise unavailable(exc) from exc
        return await translate_errors(fn)(*args, **kwargs)

    return wrapper


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under `prefix:` (a dev stack's, a benchmark's or a test's own), in
    batches; returns how many. Synchronous: it runs as those end, outside any event loop."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=Keys(prefix).pattern(), count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        return len(keys)
    finally:
        client.close()
