"""Jobs as the gateway offers them: submit, replay an idempotent submit, get, list, cancel,
wait; each for the caller's tenant only (another tenant's job answers 404, like an unknown
id, so ids leak nothing).

`submit` reads top to bottom: a replay of the same `Idempotency-Key`? Else validate what
the schema cannot (lengths, images, the callback address), place the job on the fleet
(`Fleet.place`: its model, its edit model, its size), and create it, once per key.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time

from gcr.types import DEFAULT_WEBHOOK_EVENTS, MAX_SEED, GenerateRequest, source_image_problem
from service.errors import Conflict, GcrError, InvalidInput, NotFound
from service.gateway import http_metrics
from service.gateway.auth import Principal, require_admin
from service.gateway.fleet import Fleet
from service.gateway.follow import follow
from service.gateway.uploads import check_text, checked_png
from service.jobs.lifecycle import JobLifecycle
from service.jobs.records import StoredJob
from service.jobs.store import JobStore
from service.netguard import check_public_url
from service.settings import GatewaySettings


def fingerprint(spec: GenerateRequest, source: bytes | None) -> str:
    """What an `Idempotency-Key` is bound to: the request, and an uploaded image's bytes.

    A request that names no model fingerprints as before `model` existed, and so do fields
    added later at their defaults (the webhook event filter): a retry with the same key across
    an upgrade still finds its job. An image sent as a file (multipart) is part of the request
    too: the same key with another image is another request."""
    unset = set()
    if spec.model is None:
        unset.add("model")
    if tuple(spec.webhook_events_filter) == DEFAULT_WEBHOOK_EVENTS:
        unset.add("webhook_events_filter")
    digest = hashlib.sha256(spec.model_dump_json(exclude=unset or None).encode())
    if source is not None and spec.source_image is None:
        digest.update(b"\x00source:" + hashlib.sha256(source).digest())
    return digest.hexdigest()


class JobService:
    def __init__(self, settings: GatewaySettings, store: JobStore, lifecycle: JobLifecycle, fleet: Fleet) -> None:
        self.settings = settings
        self.store = store
        self.lifecycle = lifecycle
        self.fleet = fleet

    async def submit(
        self,
        caller: Principal,
        spec: GenerateRequest,
        source: bytes | None,
        *,
        base_url: str,
        idempotency_key: str | None = None,
    ) -> tuple[StoredJob, bool]:
        """Store and queue the job (or find the one an earlier request with this key made).
        Returns the job and whether it was created now (False: an idempotent replay)."""
        # Only a keyed request is fingerprinted: hashing a base64 image costs ~0.1 s per 20 MB.
        key_print = fingerprint(spec, source) if idempotency_key is not None else ""
        if idempotency_key is not None and (replay := await self._replay(caller, idempotency_key, key_print)):
            return replay, False
        # Validate first, place second: a bad request is the client's 4xx whether or not a worker
        # serves its mode (placing first answered a missing edit image with a retryable 503).
        source_png = await self._validate(spec, source)
        placement = await self.fleet.place(spec)
        job = self._new_job(spec, caller, base_url, placement.model, placement.edit_model)
        if idempotency_key is None:
            await self.lifecycle.create(job, source_png, self.settings.queue_max)
        elif (replay := await self._create_once(caller, idempotency_key, key_print, job, source_png)) is not None:
            return replay, False
        http_metrics.JOBS_SUBMITTED.labels(job.spec.model, job.spec.mode, job.spec.priority).inc()
        return job, True

    async def _validate(self, spec: GenerateRequest, source: bytes | None) -> bytes | None:
        """What the schema cannot check; the source image as PNG."""
        check_text(spec.prompt, field="prompt", limit=self.settings.max_prompt_chars)
        problem = source_image_problem(spec.mode, source is not None)
        if problem is not None:
            raise InvalidInput(problem, field="source_image")
        if spec.callback_url is not None:
            allow_private = self.settings.webhook_allow_private
            await check_public_url(spec.callback_url, field="callback_url", allow_private=allow_private)
        if source is None:
            return None
        return await checked_png(source, field="source_image", settings=self.settings)

    @staticmethod
    def _new_job(
        spec: GenerateRequest, caller: Principal, base_url: str, model: str, edit_model: str | None
    ) -> StoredJob:
        """The queued job: the seed drawn, the model and edit model placed, the image bytes in their own key."""
        generation = spec.generation
        if generation.seed is None:
            generation = generation.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
        loop = spec.loop.model_copy(update={"edit_model": edit_model})
        effective = spec.model_copy(
            update={"generation": generation, "source_image": None, "model": model, "loop": loop}
        )
        return StoredJob(
            id=secrets.token_urlsafe(16),
            status="queued",
            spec=effective,
            stage="queued",
            created_at=time.time(),
            owner=caller.tenant,
            base_url=base_url,
        )

    async def _replay(self, caller: Principal, key: str, key_print: str) -> StoredJob | None:
        """The job an earlier request with this key created, if any.

        `InvalidInput` when the key was used with another request; `Conflict` while the first
        request is still storing its job (the client retries and gets it)."""
        found = await self.store.idempotent_job(caller.tenant, key)
        if found is None:
            return None
        job_id, stored_print = found
        if stored_print != key_print:
            raise InvalidInput(
                "Idempotency-Key was already used with a different request (its body or its image)",
                field="Idempotency-Key",
            )
        try:
            return await self.store.get(job_id)
        except NotFound:
            raise Conflict(
                "a request with this Idempotency-Key is still being processed; retry", field="Idempotency-Key"
            ) from None

    async def _create_once(
        self, caller: Principal, key: str, key_print: str, job: StoredJob, source_png: bytes | None
    ) -> StoredJob | None:
        """Create `job` unless another request took `key` first (then replay that one's job)."""
        if not await self.store.claim_idempotency(caller.tenant, key, job.id, key_print):
            replay = await self._replay(caller, key, key_print)
            if replay is None:  # the first request failed and freed the key meanwhile
                raise Conflict("a request with this Idempotency-Key just failed; retry", field="Idempotency-Key")
            return replay
        try:
            await self.lifecycle.create(job, source_png, self.settings.queue_max)
        except GcrError:
            # The job was not stored: free the key so the client's retry creates it.
            with contextlib.suppress(GcrError):
                await self.store.release_idempotency(caller.tenant, key)
            raise
        return None

    # --- reading and cancelling, tenant by tenant -------------------------------------------------
    async def check_owner(self, job_id: str, caller: Principal) -> None:
        """`NotFound` unless the caller's tenant owns the job (or the caller is an admin)."""
        owner = await self.store.owner(job_id)
        if not caller.admin and owner != caller.tenant:
            raise NotFound.job(job_id)

    async def get(self, job_id: str, caller: Principal) -> StoredJob:
        job = await self.store.get(job_id)
        if not caller.admin and job.owner != caller.tenant:
            raise NotFound.job(job_id)
        return job

    async def recent(
        self, caller: Principal, limit: int, before: float | None, everyone: bool = False
    ) -> list[StoredJob]:
        """Newest first: the caller's tenant's jobs, or (`everyone`, admins) every tenant's."""
        if everyone:
            require_admin(caller)
        ids = await (
            self.store.recent_ids(limit, before) if everyone else self.store.tenant_ids(caller.tenant, limit, before)
        )
        jobs = []
        for job_id in ids:
            with contextlib.suppress(NotFound):  # expired between the two reads
                jobs.append(await self.store.get(job_id))
        return jobs

    async def cancel(self, job_id: str, caller: Principal) -> StoredJob:
        """A queued job ends now and never runs; a running one stops at its next stage boundary."""
        await self.check_owner(job_id, caller)
        if await self.lifecycle.cancel(job_id) == "missing":
            raise NotFound.job(job_id)
        return await self.store.get(job_id)

    async def wait_for_end(self, job_id: str, timeout_s: float) -> StoredJob:
        """The job once it ended, or as it is after `timeout_s` (following its events)."""
        async for _entry, event in follow(self.store, job_id, until=time.monotonic() + timeout_s):
            if event.type == "end":
                break
        return await self.store.get(job_id)
