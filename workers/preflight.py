"""Before a worker loads its model: is the device usable, and will the model fit?

A worker told to use a GPU that it cannot use exits with the reason (`DeviceUnavailable`,
raised by `resolve_device`). A model that does not fit in the GPU's free memory is
not loaded into an out-of-memory crash and a restart loop: the worker says why in
one log line, heartbeats with `state: "unfit"` and that reason (so `/readyz`, `GET
/admin/queue` and refused submits show it), and checks again every
`GCR_MEMORY_RETRY_S` until it fits, for example once another process frees memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from service.errors import GcrError
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.registry import WorkerHeartbeat, WorkerRegistry
from service.settings import WorkerSettings
from workers.generators.memory import MemoryProbe, Verdict, check, cuda_probe, is_edit_model, megapixels_for

log = logging.getLogger("gcr.worker")


def checked_model(settings: WorkerSettings) -> str | None:
    """The model the memory check applies to: a diffusers model id or folder (not sim: or tiny:)."""
    spec = settings.generator
    if not spec or not settings.memory_check or spec.startswith(("sim:", "tiny:")):
        return None
    return spec


async def hold_until_it_fits(
    settings: WorkerSettings, model: str, device: str, probe: MemoryProbe = cuda_probe
) -> Verdict:
    """Return once `model` fits on `device`; until then, heartbeat as unfit with the reason."""
    megapixels = megapixels_for(model, settings, edit=await asyncio.to_thread(is_edit_model, model))
    verdict = await asyncio.to_thread(check, settings, model, device, megapixels, probe)
    if verdict.fits:
        log.info("memory check for %s: %s", model, verdict.message)
        return verdict
    redis = connect(settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_s)
    registry = WorkerRegistry(redis, Keys(settings.redis_prefix))
    try:
        while not verdict.fits:
            log.error("not loading %s: %s; checking again in %.0fs", model, verdict.message, settings.memory_retry_s)
            beat = unfit_heartbeat(settings, model, device, verdict.message)
            until = time.monotonic() + settings.memory_retry_s
            while time.monotonic() < until:
                with contextlib.suppress(GcrError):
                    await registry.heartbeat(beat.model_copy(update={"at": time.time()}), settings.heartbeat_s * 3)
                await asyncio.sleep(min(settings.heartbeat_s, max(0.0, until - time.monotonic())))
            verdict = await asyncio.to_thread(check, settings, model, device, megapixels, probe)
        log.info("memory check for %s: %s", model, verdict.message)
        with contextlib.suppress(GcrError):
            await registry.forget(settings.worker_id)
        return verdict
    finally:
        await redis.aclose()


def unfit_heartbeat(settings: WorkerSettings, model: str, device: str, reason: str) -> WorkerHeartbeat:
    return WorkerHeartbeat(
        id=settings.worker_id,
        state="unfit",
        reason=f"{model} does not fit on {device}: {reason}",
        model=settings.model_name or model,
        generator=model,
        runtime={"device": device},
    )
