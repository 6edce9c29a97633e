"""Webhooks owed for jobs no worker held when they ended (cancelled while queued, expired
unclaimed): the lifecycle queues them here, and any worker's notifier sends them.

A stream read through one consumer group, so each is taken by one worker; an entry is
acknowledged once its delivery is under way (the delivery retries on its own, and a
Standard Webhooks `webhook-id` lets a receiver drop a duplicate).
"""

from __future__ import annotations

import redis.asyncio as redis
from redis import exceptions as redis_exceptions

from service.jobs.connection import translate_errors
from service.jobs.keys import WEBHOOK_GROUP, Keys


class WebhookOutbox:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.key = keys.webhook_outbox()

    @translate_errors
    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.key, WEBHOOK_GROUP, id="0", mkstream=True)
        except redis_exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @translate_errors
    async def take(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, str]]:
        """Up to `count` (entry id, job id) pairs, waiting up to `block_ms` for the first."""
        try:
            reply = await self.redis.xreadgroup(WEBHOOK_GROUP, consumer, {self.key: ">"}, count=count, block=block_ms)
        except redis_exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # Redis lost its data: the group is made again
            return []
        entries = [entry for _stream, stream_entries in reply or [] for entry in stream_entries]
        return [(entry_id.decode(), fields[b"job"].decode()) for entry_id, fields in entries]

    @translate_errors
    async def ack(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, WEBHOOK_GROUP, entry_id)
            pipe.xdel(self.key, entry_id)
            await pipe.execute()
