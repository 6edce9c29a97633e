"""What the live workers serve, read from their heartbeats: placement, readiness, the model list.

Every worker heartbeats a `WorkerHeartbeat` (service.jobs.registry): its `model` (the
name requests use), its `modes` and its `state` (`ready`, or `unfit` with a `reason`).
The gateway places a job on the model it names, or on the fleet's default for its mode:
the model `GCR_DEFAULT_MODELS` sets, else the one most live workers serve (ties: the first
name in sort order). The module's functions are the rules, over a list of heartbeats;
`Fleet` reads that list from Redis (at most once per `FLEET_CACHE_S`) and makes each
job's placement one decision: its model, its edit model and its size.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from gcr.types import MODES, GenerateRequest
from service.errors import GcrError, InvalidInput, NoWorker, StoreFull, UnknownModel
from service.jobs.queue import JobQueue
from service.jobs.registry import WorkerHeartbeat, WorkerRegistry
from service.settings import GatewaySettings

FLEET_CACHE_S = 1.0


def served_models(workers: list[WorkerHeartbeat], mode: str | None = None) -> Counter[str]:
    """Ready workers per model, for `mode` (any when None)."""
    return Counter(w.model for w in workers if w.model is not None and w.serves(mode=mode))


def default_model(workers: list[WorkerHeartbeat], mode: str, defaults: dict[str, str]) -> str | None:
    """The configured default for `mode`, else the model most ready workers serve for it."""
    if mode in defaults:
        return defaults[mode]
    counts = served_models(workers, mode)
    return min(counts, key=lambda name: (-counts[name], name), default=None)


def route(
    workers: list[WorkerHeartbeat],
    mode: str,
    requested: str | None,
    defaults: dict[str, str],
    stale_s: float,
    known: bool = False,
    field: str = "model",
    because: str = "",
) -> str:
    """The model a job of `mode` goes to: `requested`, else the fleet's default for `mode`.

    `UnknownModel` (422) for a requested model that no ready worker serves for `mode` and
    nothing vouches for: no worker of it is live but unready (unfit), it is not the
    configured default, and (`known`) no worker of it ever served `mode`. `NoWorker` (503,
    retryable) when the fleet is empty, or the model is vouched for but none of its
    workers is ready now (starting, restarting, unfit). `field` names the request field the
    model came from, and `because` why it is needed, in the error."""
    # Nothing serves the mode: the request's `mode` is what cannot run (or, for an edit model,
    # the field that asked for one).
    mode_field = "mode" if field == "model" else field
    if not workers:
        raise NoWorker(because + no_worker_message(mode, workers, stale_s, model=requested), field=mode_field)
    model = requested or default_model(workers, mode, defaults)
    if model is None:
        raise NoWorker(because + no_worker_message(mode, workers, stale_s), field=mode_field)
    if any(w.serves(model, mode) for w in workers):
        return model
    unready = any(w.model == model and not w.ready for w in workers)  # e.g. waiting for memory
    if requested is None or known or unready or defaults.get(mode) == model:
        raise NoWorker(because + no_worker_message(mode, workers, stale_s, model=model), field=field)
    served = sorted(served_models(workers, mode))
    listed = ", ".join(served) or "none"
    raise UnknownModel(
        f"{because}model {model!r} is not served for {mode}; live workers serve: {listed} (GET /v1/models lists them)",
        served=served,
        field=field,
    )


def pixel_cap(
    workers: list[WorkerHeartbeat], model: str, mode: str, width: int | None, height: int | None
) -> int | None:
    """The output size cap (GCR_MAX_OUTPUT_PIXELS) that a job of `width` x `height` exceeds on
    every ready worker of `model`, or None when one of them takes it. A side left unset is
    the worker's default for it (1024 if it advertises none)."""
    caps = []
    for worker in workers:
        if not worker.serves(model, mode):
            continue
        pixels = (width or worker.defaults.get("width") or 1024) * (height or worker.defaults.get("height") or 1024)
        if worker.max_pixels is None or pixels <= worker.max_pixels:
            return None
        caps.append(worker.max_pixels)
    return max(caps, default=None)


def no_worker_message(
    mode: str | None, workers: list[WorkerHeartbeat], stale_s: float, model: str | None = None
) -> str:
    """Why nothing would run a job of `mode` (any mode when None; of `model` when given),
    and what to do about it."""
    wanted = f"mode {mode!r}" if mode else "jobs"
    if model is not None:
        wanted = f"model {model!r} in {wanted}"
    if not workers:
        return (
            f"no worker serves {wanted}: no worker has sent a heartbeat in the last {stale_s:.0f}s. "
            "Start one (`gcr worker`, or check `docker compose logs worker`)."
        )
    unfit = [w for w in workers if not w.ready]
    parts = [f"no live worker serves {wanted}"]
    if model is not None:
        served = sorted(served_models(workers, mode))
        parts.append(f"live workers serve {', '.join(served) or 'no model'} for it")
    else:
        modes = sorted({m for w in workers if w.ready for m in w.modes})
        if modes:
            parts.append(f"live workers serve {', '.join(modes)}")
    for w in unfit:
        parts.append(f"worker {w.id} is not serving: {w.reason or w.state}")
    if not unfit:
        parts.append(_what_to_start(mode, model))
    return "; ".join(parts)


def _what_to_start(mode: str | None, model: str | None) -> str:
    if model is not None:
        return f"its workers may be starting; else start one with GCR_GENERATOR (or GCR_MODEL_NAME) set to {model!r}"
    if mode == "edit":
        return "start a worker on an edit model (e.g. GCR_GENERATOR=Qwen/Qwen-Image-Edit-2509; deploy/compose.edit.yml)"
    return "start a worker on a text-to-image model (e.g. GCR_GENERATOR=black-forest-labs/FLUX.1-schnell)"


def mode_readiness(mode: str, workers: list[WorkerHeartbeat], stale_s: float) -> dict[str, Any]:
    """Ready when a ready worker serves `mode`; its workers, or why none."""
    serving = [w.id for w in workers if w.serves(mode=mode)]
    entry: dict[str, Any] = {"ready": bool(serving), "workers": serving}
    if not serving:
        entry["reason"] = no_worker_message(mode, workers, stale_s)
    return entry


def model_readiness(workers: list[WorkerHeartbeat]) -> dict[str, dict[str, Any]]:
    """Per announced model: ready when a ready worker serves it; its modes, workers and, if
    not ready, why (the reasons its workers give)."""
    report: dict[str, dict[str, Any]] = {}
    for worker in workers:
        if worker.model is None:
            continue
        entry = report.setdefault(worker.model, {"ready": False, "modes": [], "workers": []})
        entry["workers"].append(worker.id)
        if worker.ready:
            entry["ready"] = True
            entry["modes"] = sorted(set(entry["modes"]) | set(worker.modes))
        else:
            entry.setdefault("reasons", []).append(str(worker.reason or worker.state))
    return dict(sorted(report.items()))


def model_list(workers: list[WorkerHeartbeat], defaults: dict[str, str], created: int) -> list[dict[str, Any]]:
    """`GET /v1/models` entries: OpenAI's `{id, object, created, owned_by}` plus gcr's details
    (modes, ready workers, the modes it is the default for, the generator it runs and
    what a request that sets nothing gets)."""
    entries: dict[str, dict[str, Any]] = {}
    for worker in workers:
        if worker.model is None or not worker.serves():
            continue
        entry = entries.setdefault(
            worker.model,
            {
                "id": worker.model,
                "object": "model",
                "created": created,
                "owned_by": "gcr",
                "gcr": {"modes": [], "workers": 0, "generator": worker.generator, "default_for": []},
            },
        )
        details = entry["gcr"]
        details["modes"] = sorted(set(details["modes"]) | set(worker.modes))
        details["workers"] += 1
        details.setdefault("defaults", worker.defaults)
    for mode in MODES:
        default = default_model(workers, mode, defaults)
        if default in entries:
            entries[default]["gcr"]["default_for"].append(mode)
    return sorted(entries.values(), key=lambda m: str(m["id"]))


@dataclass(frozen=True)
class Placement:
    """Where a job runs: its model, and the model its edit rounds run on (if its strategy edits)."""

    model: str
    edit_model: str | None


class Fleet:
    """The live workers as this gateway sees them, and every decision made from them."""

    def __init__(self, settings: GatewaySettings, registry: WorkerRegistry, queue: JobQueue) -> None:
        self.settings = settings
        self.registry = registry
        self.queue = queue
        self._workers: list[WorkerHeartbeat] = []
        self._until = 0.0

    async def workers(self, fresh: bool = False) -> list[WorkerHeartbeat]:
        """The live workers' heartbeats. A busy gateway reads them at most once per
        `FLEET_CACHE_S`; `fresh` reads them now."""
        now = time.monotonic()
        if fresh or self._until <= now:
            self._workers = await self.registry.live(self.settings.worker_stale_s)
            self._until = now + FLEET_CACHE_S
        return self._workers

    async def place(self, spec: GenerateRequest) -> Placement:
        """The model a job runs on, the model its edit rounds run on, and its size checked
        against what that model's workers generate: one decision, or the error that says why not."""
        model = await self._route(spec.mode, spec.model, "model")
        self._check_size(spec, model, await self.workers())
        edit_model = spec.loop.edit_model
        if spec.loop.strategy != "rewrite":
            requested = spec.loop.edit_model or (model if spec.mode == "edit" else None)
            because = f"loop.strategy {spec.loop.strategy!r} edits its best image: "
            edit_model = await self._route("edit", requested, "loop.edit_model", because)
        return Placement(model, edit_model)

    async def _route(self, mode: str, model: str | None, field: str, because: str = "") -> str:
        """`route` on the cached heartbeats; a refusal is decided on a fresh read, so a worker
        that just started is seen at once."""
        defaults, stale_s = self.settings.default_models, self.settings.worker_stale_s
        try:
            return route(await self.workers(), mode, model, defaults, stale_s, field=field, because=because)
        except (NoWorker, UnknownModel):
            # A model some worker served for this mode before is known: while none serves
            # it (a restart, a rollout) its jobs get a retryable 503, not a 422.
            known = model is not None and await self.queue.has_served(model, mode)
            fresh = await self.workers(fresh=True)
            return route(fresh, mode, model, defaults, stale_s, known=known, field=field, because=because)

    @staticmethod
    def _check_size(spec: GenerateRequest, model: str, workers: list[WorkerHeartbeat]) -> None:
        """A size the model's workers were not sized for (GCR_MAX_OUTPUT_PIXELS) is refused now,
        not run into an out-of-memory error on a GPU it shares. An edit's size follows its
        source, bounded by the workers' GCR_EDIT_MAX_EDGE."""
        width, height = spec.generation.width, spec.generation.height
        if spec.mode != "t2i" or (width is None and height is None):
            return
        cap = pixel_cap(workers, model, spec.mode, width, height)
        if cap is not None:
            side = math.isqrt(cap) // 16 * 16
            raise InvalidInput(
                f"{width or 'default'}x{height or 'default'} is larger than the workers of {model} generate: "
                f"at most {cap} pixels (e.g. {side}x{side})",
                field="width" if width is not None else "height",
            )

    async def model_list(self) -> list[dict[str, Any]]:
        return model_list(await self.workers(fresh=True), self.settings.default_models, int(time.time()))

    async def queue_stats(self) -> dict[str, Any]:
        """The queue per model: jobs waiting for a worker, jobs claimed, ready workers; then
        each stream (`mode:priority`) of each model, and the live workers."""
        workers = await self.workers(fresh=True)
        streams = await self.queue.stream_stats(w.model for w in workers if w.model is not None)
        served = served_models(workers)
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
            "workers": [w.model_dump() for w in workers],
        }

    async def readiness(self) -> dict[str, Any]:
        """Redis answers, a ready worker heartbeats and the critic is up (workers see the
        critic: its breaker state rides on their heartbeats); per mode and model too."""
        report: dict[str, Any] = {"ready": False, "redis": "down", "workers": [], "queued": None}
        try:
            await self.queue.ping()
            report["redis"] = "ok"
            await self.queue.probe_write()
            workers = await self.workers(fresh=True)
            report["queued"] = await self.queue.queued_count()
        except StoreFull as exc:
            report["redis"] = "full"
            report["reason"] = exc.message
            return report
        except GcrError as exc:
            report["reason"] = exc.message
            return report
        stale_s = self.settings.worker_stale_s
        report["workers"] = [w.model_dump() for w in workers]
        ready_workers = [w for w in workers if w.ready]
        try:
            # A queue whose consumer group is gone (Redis lost its data) is claimed by nobody
            # until a worker makes the group again: its workers do not count as ready.
            groupless = await self.queue.groupless((w.model, m) for w in ready_workers if w.model for m in w.modes)
        except GcrError as exc:
            report["reason"] = exc.message
            return report
        claiming = [w for w in ready_workers if not any((w.model, m) in groupless for m in w.modes)]
        down = bool(claiming) and all(w.critic == "down" for w in claiming)
        report["critic"] = "down" if down else "ok"
        report["modes"] = {mode: mode_readiness(mode, workers, stale_s) for mode in MODES}
        report["models"] = model_readiness(workers)
        report["ready"] = bool(claiming) and not down
        if not ready_workers:
            report["reason"] = no_worker_message(None, workers, stale_s)
        elif not claiming:
            report["reason"] = (
                "no worker's queue has its consumer group (Redis lost its data?): workers make them "
                "again at their next claim"
            )
        elif down:
            report["reason"] = "every worker reports the critic down (circuit breaker open)"
        return report
