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
from typing import Any

from service.errors import GcrError
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.queue import JobQueue
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
    queue = JobQueue(redis, Keys(settings.redis_prefix))
    try:
        while not verdict.fits:
            log.error("not loading %s: %s; checking again in %.0fs", model, verdict.message, settings.memory_retry_s)
            info = unfit_info(settings, model, device, verdict.message)
            until = time.monotonic() + settings.memory_retry_s
            while time.monotonic() < until:
                with contextlib.suppress(GcrError):
                    await queue.heartbeat(
                        settings.worker_id, {**info, "at": time.time()}, ttl_s=settings.heartbeat_s * 3
                    )
                await asyncio.sleep(min(settings.heartbeat_s, max(0.0, until - time.monotonic())))
            verdict = await asyncio.to_thread(check, settings, model, device, megapixels, probe)
        log.info("memory check for %s: %s", model, verdict.message)
        with contextlib.suppress(GcrError):
            await queue.forget_worker(settings.worker_id)
        return verdict
    finally:
        await redis.aclose()


def unfit_info(settings: WorkerSettings, model: str, device: str, reason: str) -> dict[str, Any]:
    return {
        "id": settings.worker_id,
        "state": "unfit",
        "reason": f"{model} does not fit on {device}: {reason}",
        "model": settings.model_name or model,
        "generator": model,
        "modes": [],
        "device": device,
    }
