"""Liveness, readiness and metrics: no key needed."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import GcrError
from service.gateway import http_metrics
from service.gateway.deps import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(state: State) -> JSONResponse:
    """Readiness: Redis answers, a worker heartbeat is recent and the critic is up; per mode too."""
    report = await state.readiness()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus metrics of this gateway replica, and the queue per model."""
    with contextlib.suppress(GcrError):  # Redis away: the request metrics still answer
        http_metrics.record_queue(await state.queue_stats())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
