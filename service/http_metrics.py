"""Prometheus metrics of the gateway: requests by route and status, and their latency."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Histogram
from starlette.routing import Match

REQUESTS = Counter("gcr_http_requests_total", "HTTP requests answered.", ["method", "route", "status"])
ERRORS = Counter("gcr_http_errors_total", "Error answers by error code.", ["code"])
LATENCY = Histogram(
    "gcr_http_request_seconds",
    "Time to answer (to the first byte for streams).",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOBS_SUBMITTED = Counter("gcr_jobs_submitted_total", "Jobs queued.", ["mode", "priority"])


def _route_of(request: Request) -> str:
    # The route template, not the raw path: job ids must not become label values.
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "unmatched"


def install(app: FastAPI) -> None:
    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = _route_of(request)
        REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        LATENCY.labels(request.method, route).observe(time.perf_counter() - started)
        return response
