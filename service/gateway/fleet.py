"""What the live workers serve, read from their heartbeats: routing, readiness, the model list.

Every worker heartbeats its `model` (the name requests use), its `modes` and its
`state` (`ready`, or `unfit` with a `reason`). The gateway routes a job to the
stream of the model it names, or of the fleet's default for its mode: the model
`GCR_DEFAULT_MODELS` sets, else the one most live workers serve (ties: the first
name in sort order). These functions only read a list of heartbeats; the gateway
reads it from Redis.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from gcr.types import MODES
from service.errors import NoWorker, UnknownModel

Heartbeat = dict[str, Any]
"""What one live worker reported: id, state, model, modes, ..."""


def is_ready(worker: Heartbeat) -> bool:
    """A worker that loaded its model and claims jobs (not one that refused to load)."""
    return bool(worker.get("state", "ready") == "ready")


def serves(worker: Heartbeat, model: str | None = None, mode: str | None = None) -> bool:
    """A ready worker serving `model` (any when None) in `mode` (any when None)."""
    return (
        is_ready(worker)
        and "model" in worker
        and (model is None or worker["model"] == model)
        and (mode is None or mode in worker.get("modes", ()))
    )


def served_models(workers: list[Heartbeat], mode: str | None = None) -> Counter[str]:
    """Ready workers per model, for `mode` (any when None)."""
    return Counter(w["model"] for w in workers if serves(w, mode=mode))


def default_model(workers: list[Heartbeat], mode: str, defaults: dict[str, str]) -> str | None:
    """The configured default for `mode`, else the model most ready workers serve for it."""
    if mode in defaults:
        return defaults[mode]
    counts = served_models(workers, mode)
    return min(counts, key=lambda name: (-counts[name], name), default=None)


def route(
    workers: list[Heartbeat],
    mode: str,
    requested: str | None,
    defaults: dict[str, str],
    stale_s: float,
    known: bool = False,
) -> str:
    """The model a job of `mode` goes to: `requested`, else the fleet's default for `mode`.

    `UnknownModel` (422) for a requested model that no ready worker serves for `mode` and
    nothing vouches for: no worker of it is live but unready (unfit), it is not the
    configured default, and (`known`) no worker of it ever served `mode`. `NoWorker` (503,
    retryable) when the fleet is empty, or the model is vouched for but none of its
    workers is ready now (starting, restarting, unfit)."""
    if not workers:
        raise NoWorker(no_worker_message(mode, workers, stale_s, model=requested), field="mode")
    model = requested or default_model(workers, mode, defaults)
    if model is None:
        raise NoWorker(no_worker_message(mode, workers, stale_s), field="mode")
    if any(serves(w, model, mode) for w in workers):
        return model
    unready = any(w.get("model") == model and not is_ready(w) for w in workers)  # e.g. waiting for memory
    if requested is None or known or unready or defaults.get(mode) == model:
        raise NoWorker(no_worker_message(mode, workers, stale_s, model=model), field="model")
    served = sorted(served_models(workers, mode))
    listed = ", ".join(served) or "none"
    raise UnknownModel(
        f"model {model!r} is not served for {mode}; live workers serve: {listed} (GET /v1/models lists them)",
        served=served,
    )


def pixel_cap(workers: list[Heartbeat], model: str, mode: str, width: int | None, height: int | None) -> int | None:
    """The output size cap (GCR_MAX_OUTPUT_PIXELS) that a job of `width` x `height` exceeds on
    every ready worker of `model`, or None when one of them takes it. A side left unset is
    the worker's default for it (1024 if it advertises none)."""
    caps = []
    for worker in workers:
        if not serves(worker, model, mode):
            continue
        cap = worker.get("max_pixels")
        defaults = worker.get("defaults", {})
        pixels = (width or defaults.get("width") or 1024) * (height or defaults.get("height") or 1024)
        if cap is None or pixels <= cap:
            return None
        caps.append(int(cap))
    return max(caps, default=None)


def no_worker_message(mode: str | None, workers: list[Heartbeat], stale_s: float, model: str | None = None) -> str:
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
    unfit = [w for w in workers if not is_ready(w)]
    parts = [f"no live worker serves {wanted}"]
    if model is not None:
        served = sorted(served_models(workers, mode))
        parts.append(f"live workers serve {', '.join(served) or 'no model'} for it")
    else:
        served = sorted({m for w in workers if is_ready(w) for m in w.get("modes", ())})
        if served:
            parts.append(f"live workers serve {', '.join(served)}")
    for w in unfit:
        parts.append(f"worker {w.get('id', '?')} is not serving: {w.get('reason', w.get('state'))}")
    if not unfit:
        parts.append(_what_to_start(mode, model))
    return "; ".join(parts)


def _what_to_start(mode: str | None, model: str | None) -> str:
    if model is not None:
        return f"its workers may be starting; else start one with GCR_GENERATOR (or GCR_MODEL_NAME) set to {model!r}"
    if mode == "edit":
        return "start a worker on an edit model (e.g. GCR_GENERATOR=Qwen/Qwen-Image-Edit-2509; deploy/compose.edit.yml)"
    return "start a worker on a text-to-image model (e.g. GCR_GENERATOR=black-forest-labs/FLUX.1-schnell)"


def mode_readiness(mode: str, workers: list[Heartbeat], stale_s: float) -> dict[str, Any]:
    """Ready when a ready worker serves `mode`; its workers, or why none."""
    serving = [w.get("id", "?") for w in workers if serves(w, mode=mode)]
    entry: dict[str, Any] = {"ready": bool(serving), "workers": serving}
    if not serving:
        entry["reason"] = no_worker_message(mode, workers, stale_s)
    return entry


def model_readiness(workers: list[Heartbeat]) -> dict[str, dict[str, Any]]:
    """Per announced model: ready when a ready worker serves it; its modes, workers and, if
    not ready, why (the reasons its workers give)."""
    report: dict[str, dict[str, Any]] = {}
    for worker in workers:
        if "model" not in worker:
            continue
        entry = report.setdefault(worker["model"], {"ready": False, "modes": [], "workers": []})
        entry["workers"].append(worker.get("id", "?"))
        if is_ready(worker):
            entry["ready"] = True
            entry["modes"] = sorted(set(entry["modes"]) | set(worker.get("modes", ())))
        else:
            entry.setdefault("reasons", []).append(str(worker.get("reason", worker.get("state"))))
    return dict(sorted(report.items()))


def model_list(workers: list[Heartbeat], defaults: dict[str, str], created: int) -> list[dict[str, Any]]:
    """`GET /v1/models` entries: OpenAI's `{id, object, created, owned_by}` plus gcr's details
    (modes, ready workers, the modes it is the default for, the generator it runs and
    what a request that sets nothing gets)."""
    entries: dict[str, dict[str, Any]] = {}
    for worker in workers:
        if not serves(worker):
            continue
        entry = entries.setdefault(
            worker["model"],
            {
                "id": worker["model"],
                "object": "model",
                "created": created,
                "owned_by": "gcr",
                "gcr": {"modes": [], "workers": 0, "generator": worker.get("generator"), "default_for": []},
            },
        )
        details = entry["gcr"]
        details["modes"] = sorted(set(details["modes"]) | set(worker.get("modes", ())))
        details["workers"] += 1
        details.setdefault("defaults", worker.get("defaults", {}))
    for mode in MODES:
        default = default_model(workers, mode, defaults)
        if default in entries:
            entries[default]["gcr"]["default_for"].append(mode)
    return sorted(entries.values(), key=lambda m: str(m["id"]))
