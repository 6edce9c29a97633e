"""A real Redis client that loses one chosen write of a job, as a dropped connection would.

Passed to a worker in place of its client (`Stack.start_worker(redis_client=...)`): every
command reaches the real Redis, but the Nth command that writes a job's keys fails with
`ConnectionError`, before it is sent (`lose="request"`: nothing was written) or after
(`lose="reply"`: it was written, and the worker cannot know). Commands sent in a pipeline
count as one write.
"""

from __future__ import annotations

from typing import Any, Literal

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from service.jobs.connection import SOCKET_TIMEOUT_S

Loss = Literal["request", "reply"]
WRITES = frozenset(
    {"EVALSHA", "EVAL", "HSET", "XADD", "XACK", "XDEL", "DEL", "SET", "ZADD", "ZREM", "EXPIRE", "RPUSH", "HINCRBY"}
)


def _touches_a_job(args: tuple[Any, ...]) -> bool:
    name = str(args[0]).upper()
    return name in WRITES and any(":job:" in (a.decode() if isinstance(a, bytes) else str(a)) for a in args[1:])


class WriteCounter:
    def __init__(self, fail_at: int, lose: Loss) -> None:
        self.fail_at = fail_at
        self.lose = lose
        self.writes = 0
        self.failed = False

    def count(self) -> bool:
        """Count a job write; True when it is the one to lose."""
        self.writes += 1
        if self.writes == self.fail_at:
            self.failed = True
            return True
        return False


def _lost(counter: WriteCounter) -> RedisConnectionError:
    return RedisConnectionError(f"injected: job write {counter.writes} lost its {counter.lose}")


class FailingWrites(redis.Redis):  # type: ignore[misc]  # redis-py is untyped here (pyproject)
    counter: WriteCounter

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if not _touches_a_job(args) or not self.counter.count():
            return await super().execute_command(*args, **options)
        if self.counter.lose == "request":
            raise _lost(self.counter)
        await super().execute_command(*args, **options)
        raise _lost(self.counter)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipe = _FailingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.counter = self.counter
        return pipe


class _FailingPipeline(Pipeline):  # type: ignore[misc]
    counter: WriteCounter

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not any(_touches_a_job(args) for args, _options in self.command_stack) or not self.counter.count():
            return list(await super().execute(raise_on_error))
        if self.counter.lose == "request":
            self.command_stack.clear()
            raise _lost(self.counter)
        await super().execute(raise_on_error)
        raise _lost(self.counter)


def failing_writes(url: str, fail_at: int, lose: Loss) -> FailingWrites:
    """A client of `url` (pooled as the service's own) that loses job write number `fail_at` (0: none)."""
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=50, socket_timeout=SOCKET_TIMEOUT_S)
    client: FailingWrites = FailingWrites.from_pool(pool)
    client.counter = WriteCounter(fail_at, lose)
    return client
