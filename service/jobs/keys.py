"""Every Redis key name gcr uses. Nobody builds a key string anywhere else.

All keys start with the configured prefix (`GCR_REDIS_PREFIX`), so several
deployments, or a test suite, can share one Redis without touching each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

CONSUMER_GROUP = "workers"
WEBHOOK_GROUP = "webhooks"


@dataclass(frozen=True)
class Keys:
    prefix: str

    def queue(self, model: str, mode: str, priority: str) -> str:
        """Stream of job ids for one model, mode and priority, read through the consumer group.

        One stream per model and mode lets a fleet mix models and modes: a worker reads
        only the streams of its own model, so an SDXL worker never claims a FLUX job.
        A model name holds no whitespace or glob characters (`MODEL_NAME`) but may hold
        ':' and '/'; scalers name the stream in full (deploy/k8s/worker/scaledobject.yaml)."""
        return f"{self.prefix}:queue:{model}:{mode}:{priority}"

    def models(self) -> str:
        """Set of every model name a worker ever served: whose streams the queue stats read."""
        return f"{self.prefix}:models"

    def job(self, job_id: str) -> str:
        """Hash: the job's scalar fields (status, spec, best, ...)."""
        return f"{self.prefix}:job:{job_id}"

    def rounds(self, job_id: str) -> str:
        """List: one JSON round per finished round, appended in order (the checkpoint)."""
        return f"{self.prefix}:job:{job_id}:rounds"

    def events(self, job_id: str) -> str:
        """Stream: the job's events, read by SSE clients."""
        return f"{self.prefix}:job:{job_id}:events"

    def listener_wake(self, listener_id: str) -> str:
        """Stream: wakes one gateway's event listener when it has a new job stream to watch
        (its blocking XREAD reads this key beside the jobs' event streams)."""
        return f"{self.prefix}:listener:{listener_id}:wake"

    def image(self, job_id: str, round_index: int, candidate: int) -> str:
        """Artifact store object (not a Redis key): one candidate's PNG."""
        return f"{self.prefix}/jobs/{job_id}/{round_index}-{candidate}.png"

    def source_image(self, job_id: str) -> str:
        """Artifact store object (not a Redis key): an edit job's source PNG."""
        return f"{self.prefix}/jobs/{job_id}/source.png"

    def idempotency(self, tenant: str, key: str) -> str:
        """String: the job an `Idempotency-Key` created, per tenant. Tenant and key are
        length-prefixed, then hashed: no pair of (tenant, key) can name another's entry."""
        digest = hashlib.sha256(f"{len(tenant)}:{tenant}:{key}".encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    def pattern(self) -> str:
        """`SCAN MATCH` pattern of every key under this prefix (clean-up of a dev stack or a test)."""
        return f"{self.prefix}:*"

    def write_probe(self) -> str:
        """String, expiring: what `/readyz` writes to learn whether Redis takes writes."""
        return f"{self.prefix}:write-probe"

    def rate_limit(self, key_id: str) -> str:
        """Hash: one API key's token bucket."""
        return f"{self.prefix}:ratelimit:{key_id}"

    def all_jobs(self) -> str:
        """Sorted set of every job id by creation time, for the admin listing."""
        return f"{self.prefix}:jobs"

    def tenant_jobs(self, tenant: str) -> str:
        """Sorted set of one tenant's job ids by creation time: `GET /jobs` and the studio's list.
        The tenant is hashed into the name, like idempotency keys (names may hold any text)."""
        digest = hashlib.sha256(tenant.encode()).hexdigest()[:32]
        return f"{self.prefix}:tenant:{digest}:jobs"

    def queued_index(self) -> str:
        """Sorted set of queued job ids by enqueue order: queue position and the queue cap."""
        return f"{self.prefix}:queued"

    def queued_since(self) -> str:
        """Sorted set of queued job ids by when they were queued (created, or handed to another
        model): what `expire_unclaimed` scans, so a hop's wait counts from the hop."""
        return f"{self.prefix}:queued-since"

    def webhook_outbox(self) -> str:
        """Stream of jobs whose `completed` webhook no worker sent (cancelled while queued,
        expired unclaimed): any worker's notifier delivers them (consumer group `WEBHOOK_GROUP`)."""
        return f"{self.prefix}:webhook-outbox"

    def heartbeats(self) -> str:
        """Sorted set: worker id -> time of its last heartbeat."""
        return f"{self.prefix}:heartbeats"

    def worker_info(self, worker_id: str) -> str:
        """String (JSON) with a worker's model, capacity and load; expires with the heartbeat."""
        return f"{self.prefix}:worker:{worker_id}"
