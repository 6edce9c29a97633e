"""What one gateway replica holds: connections, never job state."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import TYPE_CHECKING, Any

from gcr.types import DEFAULT_WEBHOOK_EVENTS, MODES, Critique, CritiqueRequest, GenerateRequest, JobDocument
from service.errors import Conflict, GcrError, InvalidInput, NotFound, NoWorker, Unauthorized, UnknownModel
from service.gateway import fleet
from service.gateway.auth import Principal
from service.gateway.ratelimit import RateLimiter
from service.gateway.streams import StreamSlots
from service.gateway.uploads import check_image, check_mode_images, decode_base64_image
from service.jobs.artifacts import ArtifactStore
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.listener import EventListener
from service.jobs.queue import JobQueue
from service.jobs.store import JobStore
from service.settings import GatewaySettings

if TYPE_CHECKING:
    from service.critic.client import OpenAICritic


def _fingerprint(spec: GenerateRequest) -> str:
    # A request that names no model fingerprints as before `model` existed: a retry with the
    # same Idempotency-Key across the upgrade still finds its job.
    # The same for fields added later, at their defaults (the webhook event filter).
    unset = set()
    if spec.model is None:
        unset.add("model")
    if tuple(spec.webhook_events_filter) == DEFAULT_WEBHOOK_EVENTS:
        unset.add("webhook_events_filter")
    return hashlib.sha256(spec.model_dump_json(exclude=unset or None).encode()).hexdigest()


class GatewayState:
    """Redis pool, store, queue stats and the critic client of one gateway process."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_s)
        self.keys = Keys(settings.redis_prefix)
        self.artifacts = ArtifactStore(settings.artifact_url)
        # Waits (SSE, Prefer: wait, /v1) share one reader instead of each holding a pooled connection.
        self.listener = EventListener(settings.redis_url, self.keys, self.redis)
        self.streams = StreamSlots(settings.max_open_streams, settings.max_open_streams_per_key)
        self.store = JobStore(self.redis, self.keys, settings.result_ttl_s, self.artifacts, self.listener)
        self.queue = JobQueue(self.redis, self.keys)
        self.rate_limiter = RateLimiter(self.redis, self.keys, settings.rate_limit_per_s, settings.rate_limit_burst)
        self._critic: OpenAICritic | None = None
        self._fleet: list[fleet.Heartbeat] = []
        self._fleet_until = 0.0

    async def aclose(self) -> None:
        if self._critic is not None:
            await self._critic.aclose()
        await self.listener.aclose()
        await self.redis.aclose()

    # --- tenants ------------------------------------------------------------------------
    async def check_owner(self, job_id: str, caller: Principal) -> None:
        """Another tenant's job answers 404, like an unknown id, so ids leak nothing."""
        owner = await self.store.owner(job_id)
        if not caller.admin and owner != caller.tenant:
            raise NotFound.job(job_id)

    async def owned_job(self, job_id: str, caller: Principal) -> JobDocument:
        doc = await self.store.get(job_id)
        if not caller.admin and doc.owner != caller.tenant:
            raise NotFound.job(job_id)
        return doc

    async def wait_for_end(self, job_id: str, timeout_s: float) -> JobDocument:
        """The job's document once it ended, or as it is after `timeout_s` (follows its events)."""
        deadline = time.monotonic() + timeout_s
        after = "0-0"
        while (left := deadline - time.monotonic()) > 0:
            events = await self.store.read_events(job_id, after=after, block_ms=max(1, int(min(left, 10.0) * 1000)))
            for entry_id, event in events:
                after = entry_id
                if event.type == "end":
                    return await self.store.get(job_id)
        return await self.store.get(job_id)

    def require_admin(self, caller: Principal) -> None:
        if not caller.admin:
            raise Unauthorized("this route needs an admin key (GCR_ADMIN_KEYS)")

    async def recent_jobs(self, limit: int, before: float | None, tenant: str | None = None) -> list[JobDocument]:
        """Newest first: every tenant's (admin listing), or one tenant's."""
        ids = await (
            self.store.recent_ids(limit, before) if tenant is None else self.store.tenant_ids(tenant, limit, before)
        )
        docs = []
        for job_id in ids:
            try:
                docs.append(await self.store.get(job_id))
            except NotFound:  # expired between the two reads
                continue
        return docs

    async def queue_stats(self) -> dict[str, Any]:
        """The queue per model: jobs waiting for a worker, jobs claimed, ready workers; then
        each stream (`mode:priority`) of each model, and the live workers."""
        workers = await self.queue.live_workers(self.settings.worker_stale_s)
        streams = await self.queue.stream_stats(w["model"] for w in workers if "model" in w)
        served = fleet.served_models(workers)
        models = {
            model: {
                "waiting": sum(s["entries"] - s["pending"] for s in by_stream.values()),
                "claimed": sum(s["pending"] for s in by_stream.values()),
                "workers": served.get(model, 0),
            }
            for model, by_stream in streams.items()
        }
        return {
            "queued": await self.queue.queued_count(),
            "models": models,
            "streams": streams,
            "workers": workers,
        }

    # --- idempotency (keys are per tenant) ----------------------------------------------------
    async def replay(self, caller: Principal, key: str, spec: GenerateRequest) -> JobDocument | None:
        """The job an earlier request with this key created, if any.

        `InvalidInput` when the key was used with another body; `Conflict` while the first
        request is still storing its job (the client retries and gets it)."""
        found = await self.store.idempotent_job(caller.tenant, key)
        if found is None:
            return None
        job_id, fingerprint = found
        if fingerprint != _fingerprint(spec):
            raise InvalidInput(
                "Idempotency-Key was already used with a different request body", field="Idempotency-Key"
            )
        try:
            return await self.store.get(job_id)
        except NotFound:
            raise Conflict(
                "a request with this Idempotency-Key is still being processed; retry", field="Idempotency-Key"
            ) from None

    async def create_once(
        self, caller: Principal, key: str, spec: GenerateRequest, doc: JobDocument, source_png: bytes | None
    ) -> JobDocument | None:
        """Create `doc` unless another request took `key` first (then replay that one's job)."""
        if not await self.store.claim_idempotency(caller.tenant, key, doc.id, _fingerprint(spec)):
            return await self.replay(caller, key, spec)
        try:
            await self.store.create(doc, source_png, self.settings.queue_max)
        except GcrError:
            # The job was not stored: free the key so the client's retry creates it.
            with contextlib.suppress(GcrError):
                await self.store.release_idempotency(caller.tenant, key)
            raise
        return None

    # --- critique as a service --------------------------------------------------------------
    def critic(self) -> OpenAICritic:
        if self._critic is None:
            from service.critic.client import OpenAICritic  # no torch: the critic is HTTP only

            self._critic = OpenAICritic(self.settings)
        return self._critic

    async def critique(self, body: CritiqueRequest) -> Critique:
        if len(body.instruction) > self.settings.max_prompt_chars:
            raise InvalidInput(
                f"instruction has {len(body.instruction)} characters; the limit is {self.settings.max_prompt_chars}",
                field="instruction",
            )
        limits = {"max_bytes": self.settings.max_image_bytes, "max_pixels": self.settings.max_image_pixels}
        image = await asyncio.to_thread(
            check_image,
            decode_base64_image(body.image, field="image", max_bytes=limits["max_bytes"]),
            field="image",
            **limits,
        )
        source = None
        if body.source_image is not None:
            source = await asyncio.to_thread(
                check_image,
                decode_base64_image(body.source_image, field="source_image", max_bytes=limits["max_bytes"]),
                field="source_image",
                **limits,
            )
        mode = body.mode or ("edit" if source is not None else "t2i")
        check_mode_images(mode, source is not None)
        return await self.critic().critique(body.instruction, image, source_image=source, mode=mode)

    # --- which models live workers serve ---------------------------------------------------------
    async def fleet(self, fresh: bool = False) -> list[fleet.Heartbeat]:
        """The live workers' heartbeats. A busy gateway reads them at most once per
        `FLEET_CACHE_S`; `fresh` reads them now."""
        now = time.monotonic()
        if fresh or self._fleet_until <= now:
            self._fleet = await self.queue.live_workers(self.settings.worker_stale_s)
            self._fleet_until = now + FLEET_CACHE_S
        return self._fleet

    async def route(self, mode: str, model: str | None) -> str:
        """The model a job goes to (see `service.gateway.fleet.route`). A refusal is decided on a
        fresh read of the heartbeats, so a worker that just started is seen at once."""
        defaults, stale_s = self.settings.default_models, self.settings.worker_stale_s
        try:
            return fleet.route(await self.fleet(), mode, model, defaults, stale_s)
        except (NoWorker, UnknownModel):
            # A model some worker served for this mode before is known: while none serves
            # it (a restart, a rollout) its jobs get a retryable 503, not a 422.
            known = model is not None and await self.queue.has_served(model, mode)
            return fleet.route(await self.fleet(fresh=True), mode, model, defaults, stale_s, known=known)

    async def pixel_cap(self, model: str, mode: str, width: int | None, height: int | None) -> int | None:
        """The cap a job's size exceeds on every ready worker of `model` (`service.gateway.fleet.pixel_cap`)."""
        return fleet.pixel_cap(await self.fleet(), model, mode, width, height)

    # --- readiness ----------------------------------------------------------------------------
    async def readiness(self) -> dict[str, Any]:
        report: dict[str, Any] = {"ready": False, "redis": "down", "workers": [], "queued": None}
        try:
            await self.queue.ping()
            report["redis"] = "ok"
            report["workers"] = await self.queue.live_workers(self.settings.worker_stale_s)
            report["queued"] = await self.queue.queued_count()
        except GcrError as exc:
            report["reason"] = exc.message
            return report
        workers = report["workers"]
        stale_s = self.settings.worker_stale_s
        ready_workers = [w for w in workers if fleet.is_ready(w)]
        # Workers see the critic; its breaker state rides on their heartbeats.
        down = ready_workers and all(w.get("critic") == "down" for w in ready_workers)
        report["critic"] = "down" if down else "ok"
        report["modes"] = {mode: fleet.mode_readiness(mode, workers, stale_s) for mode in MODES}
        report["models"] = fleet.model_readiness(workers)
        # Streams and waits of this replica: its listener must read for them to end.
        report["listener"] = "ok" if self.listener.healthy else "down"
        report["streams"] = {"open": self.streams.open, "limit": self.streams.limit}
        report["ready"] = bool(ready_workers) and report["critic"] == "ok" and report["listener"] == "ok"
        if not ready_workers:
            report["reason"] = fleet.no_worker_message(None, workers, stale_s)
        elif report["critic"] == "down":
            report["reason"] = "every worker reports the critic down (circuit breaker open)"
        elif report["listener"] == "down":
            report["reason"] = "this gateway's event listener cannot read Redis: streams and waits would hang"
        report["checked_at"] = time.time()
        return report


FLEET_CACHE_S = 1.0
