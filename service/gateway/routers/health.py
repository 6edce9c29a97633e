"""Liveness, readiness and metrics: no key needed."""

from __future__ import annotations

import contextlib
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import GcrError
from service.gateway import http_metrics
from service.gateway.deps import State, Workers

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(state: State, fleet: Workers) -> JSONResponse:
    """Readiness: Redis answers, a worker heartbeat is recent, the critic is up, and this
    replica's event listener reads (streams and waits need it); per mode and model too."""
    report = await fleet.readiness()
    report["listener"] = "ok" if state.listener.healthy else "down"
    report["streams"] = {"open": state.streams.open, "limit": state.streams.limit}
    if report["ready"] and not state.listener.healthy:
        report["ready"] = False
        report["reason"] = "this gateway's event listener cannot read Redis: streams and waits would hang"
    report["checked_at"] = time.time()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics", response_class=Response)
async def metrics(fleet: Workers) -> Response:
    """Prometheus metrics of this gateway replica, and the queue per model."""
    with contextlib.suppress(GcrError):  # Redis away: the request metrics still answer
        http_metrics.record_queue(await fleet.queue_stats())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
