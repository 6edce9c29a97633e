"""The live workers: each heartbeats what it serves, and the gateway reads the fleet from it.

One typed heartbeat (`WorkerHeartbeat`) for both sides: the worker writes it, the
gateway's fleet (routing, readiness, the model list) reads it; a misspelt field is a
validation error, never a silent change of routing.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict, Field

from service.jobs.connection import idempotent_read, translate_errors
from service.jobs.keys import Keys


class WorkerHeartbeat(BaseModel):
    """What one worker reports, every GCR_HEARTBEAT_S."""

    model_config = ConfigDict(extra="ignore")

    id: str
    state: Literal["ready", "unfit"] = Field("ready", description="`unfit`: it will not load its model (`reason`).")
    reason: str | None = None
    model: str | None = Field(None, description="The name requests route by.")
    generator: str | None = None
    modes: list[str] = Field(default_factory=list)
    runtime: dict[str, Any] = Field(default_factory=dict, description="Device, dtype, torch and CUDA versions.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="What a request that sets nothing gets.")
    max_pixels: int | None = Field(None, description="GCR_MAX_OUTPUT_PIXELS: the largest size it generates.")
    max_inflight_jobs: int | None = None
    inflight_jobs: int = 0
    jobs_needed: int | None = Field(None, description="The jobs its measured stage times say keep it busy.")
    critique_limit: int | None = Field(None, description="The critiques it keeps in flight now (adaptive).")
    generator_busy_s: float = 0.0
    critic: Literal["ok", "down"] = "ok"
    at: float = 0.0

    @property
    def ready(self) -> bool:
        """It loaded its model and claims jobs (not one that refused to load)."""
        return self.state == "ready"

    def serves(self, model: str | None = None, mode: str | None = None) -> bool:
        """A ready worker serving `model` (any when None) in `mode` (any when None)."""
        return (
            self.ready
            and self.model is not None
            and (model is None or self.model == model)
            and (mode is None or mode in self.modes)
        )


class WorkerRegistry:
    """Heartbeats in Redis: a sorted set of last beats and one expiring record a worker."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    @translate_errors
    async def heartbeat(self, beat: WorkerHeartbeat, ttl_s: float) -> None:
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.heartbeats(), {beat.id: now})
            pipe.zremrangebyscore(self.keys.heartbeats(), "-inf", now - 3600)
            pipe.set(self.keys.worker_info(beat.id), beat.model_dump_json(), ex=max(1, int(ttl_s)))
            await pipe.execute()

    @translate_errors
    async def forget(self, worker_id: str) -> None:
        await self.redis.zrem(self.keys.heartbeats(), worker_id)
        await self.redis.delete(self.keys.worker_info(worker_id))

    @idempotent_read
    async def live(self, stale_s: float) -> list[WorkerHeartbeat]:
        """Workers whose last heartbeat is within `stale_s`, with what they reported."""
        ids = await self.redis.zrangebyscore(self.keys.heartbeats(), time.time() - stale_s, "+inf")
        if not ids:
            return []
        records = await self.redis.mget([self.keys.worker_info(i.decode()) for i in ids])
        return [
            WorkerHeartbeat.model_validate_json(raw) if raw else WorkerHeartbeat(id=i.decode())
            for i, raw in zip(ids, records, strict=True)
        ]
