"""Liveness, readiness and metrics: no key needed."""

from __future__ import annotations

import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import GcrError
from service.gateway import http_metrics
from service.gateway.auth import authenticate
from service.gateway.deps import State, Workers

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


# What anyone may read of the readiness report (a probe needs only the status code); the
# rest (workers with their ids, devices and versions, models, queue depths, reasons that
# name them) is for admin keys.
PUBLIC_READINESS = ("ready", "redis", "critic", "listener", "checked_at")


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(
    state: State, fleet: Workers, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> JSONResponse:
    """Readiness: Redis answers, a worker heartbeat is recent, the critic is up, and this
    replica's event listener reads (streams and waits need it); per mode and model too, with
    each worker's heartbeat, for an admin key (without one: only whether, and which part is down)."""
    report = await fleet.readiness()
    report["listener"] = "ok" if state.listener.healthy else "down"
    report["streams"] = {"open": state.streams.open, "limit": state.streams.limit}
    if report["ready"] and not state.listener.healthy:
        report["ready"] = False
        report["reason"] = "this gateway's event listener cannot read Redis: streams and waits would hang"
    report["checked_at"] = time.time()
    if not _is_admin(state, authorization):
        report = {key: report[key] for key in PUBLIC_READINESS if key in report}
        report["details"] = "workers, models, queue and reasons: send an admin key"
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


def _is_admin(state: State, authorization: str | None) -> bool:
    try:
        return authenticate(state.settings, authorization).admin
    except GcrError:
        return False


@router.get("/metrics", response_class=Response)
async def metrics(fleet: Workers) -> Response:
    """Prometheus metrics of this gateway replica, and the queue per model."""
    with contextlib.suppress(GcrError):  # Redis away: the request metrics still answer
        http_metrics.record_queue(await fleet.queue_stats())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
