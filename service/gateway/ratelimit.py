"""A per-key token bucket in Redis, shared by every gateway replica.

One Lua script refills and takes a token atomically, on Redis's own clock, so
replicas with skewed clocks still agree.
"""

from __future__ import annotations

import logging

import redis.asyncio as redis

from service.errors import RateLimited, StoreFull
from service.jobs.connection import idempotent_read
from service.jobs.keys import Keys

log = logging.getLogger("gcr.gateway")

_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or burst
local ts = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class RateLimiter:
    def __init__(self, client: redis.Redis, keys: Keys, per_s: float, burst: int) -> None:
        self.keys = keys
        self.per_s = per_s
        self.burst = burst
        self.redis = client
        self._take = client.register_script(_TAKE)

    async def take(self, key_id: str) -> None:
        """Take one token for `key_id`, or raise `RateLimited` with how long to wait.

        A Redis that is full (maxmemory) refuses the bucket's write: the request goes through
        unlimited rather than failing (reads still work then; writes fail on their own, saying
        why), and the gateway logs it."""
        if self.per_s <= 0:
            return
        try:
            wait = await self._wait_s(key_id)
        except StoreFull as exc:
            log.warning("rate limit not applied to key %s: %s", key_id, exc.message)
            return
        if wait > 0:
            raise RateLimited(
                f"rate limit of {self.per_s:g} requests/s (burst {self.burst}) exceeded", retry_after_s=wait
            )

    # Run again on a fresh connection after a connection error, as reads are: a take that ran
    # twice costs one token more, while a pooled connection gone stale after a Redis restart
    # failed the request.
    @idempotent_read
    async def _wait_s(self, key_id: str) -> float:
        return float(await self._take(keys=[self.keys.rate_limit(key_id)], args=[self.per_s, self.burst]))
