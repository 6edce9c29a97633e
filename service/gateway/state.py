"""What one gateway replica holds: connections, never job state. The services the routes call
(`JobService`, `Fleet`) are made of them in `service.gateway.app` and reach routes as
dependencies (`service.gateway.deps`)."""

from __future__ import annotations

from service.critic.client import OpenAICritic
from service.gateway.ratelimit import RateLimiter
from service.gateway.streams import StreamSlots
from service.jobs.artifacts import ArtifactStore
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.lifecycle import JobLifecycle
from service.jobs.listener import EventListener
from service.jobs.queue import JobQueue
from service.jobs.registry import WorkerRegistry
from service.jobs.store import JobStore
from service.settings import GatewaySettings


class GatewayState:
    """Redis (its job store, lifecycle, queue and worker registry), the artifact store, the
    event listener, the stream slots, the rate limiter and the critic client of one process."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_s)
        keys = Keys(settings.redis_prefix)
        self.artifacts = ArtifactStore(settings.artifact_url)
        # Waits (SSE, Prefer: wait, /v1) share one reader instead of each holding a pooled connection.
        self.listener = EventListener(settings.redis_url, keys, self.redis)
        self.streams = StreamSlots(settings.max_open_streams, settings.max_open_streams_per_key)
        self.store = JobStore(self.redis, keys, settings.result_ttl_s, self.artifacts, self.listener)
        self.lifecycle = JobLifecycle(self.redis, keys, settings.result_ttl_s, self.artifacts)
        self.queue = JobQueue(self.redis, keys)
        self.registry = WorkerRegistry(self.redis, keys)
        self.rate_limiter = RateLimiter(self.redis, keys, settings.rate_limit_per_s, settings.rate_limit_burst)
        # Built now: critic settings that cannot work (GCR_CRITIC_MAX_TOKENS) fail at start-up.
        self.critic = OpenAICritic(settings)

    async def aclose(self) -> None:
        await self.critic.aclose()
        await self.listener.aclose()
        await self.redis.aclose()
