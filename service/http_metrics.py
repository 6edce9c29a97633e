"""Prometheus metrics of the gateway: requests by route and status, and their latency."""

from __future__ import annotations

import time

from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("gcr_http_requests_total", "HTTP requests answered.", ["method", "route", "status"])
ERRORS = Counter("gcr_http_errors_total", "Error answers by error code.", ["code"])
LATENCY = Histogram(
    "gcr_http_request_seconds",
    "Time to answer (to the first byte for streams).",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOBS_SUBMITTED = Counter("gcr_jobs_submitted_total", "Jobs queued.", ["mode", "priority"])


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): counts and times every HTTP request.

    The route label is the matched route's template, read from the scope the router
    filled in, so job ids never become label values and no route is matched twice."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_measured(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = getattr(scope.get("route"), "path", "unmatched")
                LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_measured)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()


def install(app: FastAPI) -> None:
    app.add_middleware(MetricsMiddleware)
