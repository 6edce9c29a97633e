"""Prometheus metrics of the gateway: requests by route and status, their latency, and the
queue per model (read from Redis at each scrape; every replica reports the same queue,
so aggregate those with `max`, not `sum`)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("gcr_http_requests_total", "HTTP requests answered.", ["method", "route", "status"])
ERRORS = Counter("gcr_http_errors_total", "Error answers by error code.", ["code"])
LATENCY = Histogram(
    "gcr_http_request_seconds",
    "Time to answer (to the first byte for streams).",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOBS_SUBMITTED = Counter("gcr_jobs_submitted_total", "Jobs queued.", ["model", "mode", "priority"])
QUEUE_WAITING = Gauge(
    "gcr_queue_waiting", "Jobs in a model's stream that no worker claimed yet.", ["model", "mode", "priority"]
)
QUEUE_CLAIMED = Gauge("gcr_queue_claimed", "Jobs a worker claimed and has not finished.", ["model", "mode", "priority"])
MODEL_WORKERS = Gauge("gcr_model_workers", "Live, ready workers serving the model.", ["model"])


def record_queue(stats: dict[str, Any]) -> None:
    """Set the queue gauges from `GatewayState.queue_stats()`: a model with no live worker and
    nothing queued any more drops out of them."""
    for gauge in (QUEUE_WAITING, QUEUE_CLAIMED, MODEL_WORKERS):
        gauge.clear()
    for model, streams in stats["streams"].items():
        MODEL_WORKERS.labels(model).set(stats["models"][model]["workers"])
        for name, stream in streams.items():
            mode, priority = name.split(":")
            QUEUE_WAITING.labels(model, mode, priority).set(stream["entries"] - stream["pending"])
            QUEUE_CLAIMED.labels(model, mode, priority).set(stream["pending"])


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
