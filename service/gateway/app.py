"""The HTTP gateway, assembled: lifespan, middleware, one error shape, the routers.

It holds no job state in memory, so any number of replicas can serve the same
Redis. Errors of every kind leave through one handler as one body shape:
`{"error": {"code", "message", "field", "retryable"}}` (OpenAI's
`{"error": {"message", "type", "param", "code"}}` on /v1); an unexpected exception is a
JSON 500 with a request id, never Starlette's plain text. The routes live in
`service/gateway/routers/` (jobs, critique, admin, health, the OpenAI-compatible images API).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from gcr.types import ErrorBody
from service.errors import GcrError, RateLimited, Unauthorized
from service.gateway import http_metrics
from service.gateway.bodies import JSON_OVERHEAD_BYTES
from service.gateway.body_limit import BodyLimitMiddleware
from service.gateway.error_bodies import error_answer
from service.gateway.fleet import Fleet
from service.gateway.job_service import JobService
from service.gateway.routers import admin, critique, health, jobs, openai_compat, studio
from service.gateway.state import GatewayState
from service.settings import GatewaySettings

log = logging.getLogger("gcr.gateway")

HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
}
RETRY_AFTER_S = 5
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def _error_response(
    request: Request, status: int, body: ErrorBody, headers: dict[str, str] | None = None
) -> JSONResponse:
    status, content, shaped = error_answer(request.url.path, status, body)
    return JSONResponse(status_code=status, content=content, headers={**shaped, **(headers or {})})


def _validation_field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts)


def _request_id(request: Request) -> str:
    """The client's `X-Request-Id` when it is a sane token, else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GcrError)
    async def gcr_error(request: Request, exc: GcrError) -> JSONResponse:
        http_metrics.ERRORS.labels(exc.code).inc()
        headers: dict[str, str] = {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        elif exc.status_code in (429, 503):
            headers["Retry-After"] = str(RETRY_AFTER_S)
        elif isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        body = ErrorBody(
            code=exc.code, message=exc.message, field=exc.field, retryable=exc.retryable, choices=exc.choices
        )
        if exc.status_code == 500:  # our failure, not the job's or a dependency's: make it findable
            body.request_id = headers["x-request-id"] = _request_id(request)
            log.error("%s answered 500 %s (request %s): %s", request.url.path, exc.code, body.request_id, exc.message)
        if exc.job_id is not None:
            headers["X-Gcr-Job-Id"] = exc.job_id
            if request.url.path.startswith("/v1/"):
                # One call, one job: once it exists, no OpenAI-API answer invites a retry, which
                # would submit a second job (the native API's clients send an Idempotency-Key).
                body.retryable = False
        return _error_response(request, exc.status_code, body, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (unknown route, wrong method, malformed multipart) get our body too.
        code = HTTP_CODES.get(exc.status_code, "http_error")
        http_metrics.ERRORS.labels(code).inc()
        headers = dict(exc.headers) if exc.headers else None
        body = ErrorBody(code=code, message=str(exc.detail), retryable=exc.status_code == 408)
        return _error_response(request, exc.status_code, body, headers)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        # A body that is not JSON at all names no field (its loc is a character offset).
        field = None if first.get("type") == "json_invalid" else _validation_field(tuple(first.get("loc", ())))
        message = "; ".join(f"{_validation_field(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors)
        return _error_response(request, 422, ErrorBody(code="invalid_input", message=message, field=field or None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this in its outermost middleware, so it also catches what escapes other
        # middlewares; without it an unexpected exception left as a plain-text 500.
        request_id = _request_id(request)
        log.error("unexpected error on %s %s (request %s)", request.method, request.url.path, request_id, exc_info=exc)
        http_metrics.ERRORS.labels("internal").inc()
        body = ErrorBody(
            code="internal",
            message=f"internal error; the gateway's log has it under request id {request_id}",
            request_id=request_id,
        )
        return _error_response(request, 500, body, {"x-request-id": request_id})


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway app; its lifespan opens the Redis pool and the critic client."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = GatewayState(settings)
        app.state.gcr = state
        app.state.fleet = Fleet(settings, state.registry, state.queue)
        app.state.jobs = JobService(settings, state.store, state.lifecycle, app.state.fleet)
        if settings.auth_disabled:
            log.warning("AUTH IS DISABLED (GCR_AUTH_DISABLED=true): anyone who reaches this port can use it")
        elif not settings.api_keys and not settings.admin_keys:
            log.warning("no API keys configured (GCR_API_KEYS): every request will answer 401")
        sweepers = {
            asyncio.create_task(_expire_unclaimed(state), name="gcr-expire-unclaimed"),
            asyncio.create_task(_sweep_artifacts(state), name="gcr-sweep-artifacts"),
        }
        try:
            yield
        finally:
            for sweeper in sweepers:
                sweeper.cancel()
            await asyncio.wait(sweepers, timeout=5)
            await state.aclose()

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from files in the package,
    # not from a CDN, so they work offline and behind strict egress rules.
    app = FastAPIOffline(
        title="gcr",
        version="0.1.0",
        summary="Generate-Critique-Refine: better images per prompt at test time.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        limits=body_limits(settings),
        default_bytes=JSON_OVERHEAD_BYTES,
        timeout_s=settings.request_body_timeout_s,
    )
    http_metrics.install(app)

    for router in (jobs.router, critique.router, admin.router, health.router, openai_compat.router, studio.router):
        app.include_router(router)
    app.mount("/studio/static", studio.static, name="studio-static")
    return app


def body_limits(settings: GatewaySettings) -> dict[str, int]:
    """The largest body each route that takes one accepts: one image, base64 or raw, plus
    room for the JSON (or the multipart framing) around it; two for POST /critique."""
    image = settings.max_image_bytes * 4 // 3  # base64 is 4/3 of the bytes; raw multipart less
    return {
        "/generate": image + JSON_OVERHEAD_BYTES,
        "/critique": 2 * image + JSON_OVERHEAD_BYTES,
        "/v1/images/edits": image + JSON_OVERHEAD_BYTES,
    }


async def _expire_unclaimed(state: GatewayState) -> None:
    """End jobs that no worker claimed within GCR_QUEUE_TIMEOUT_S: queued ones, and running
    ones whose worker stopped with no worker of their model to take them over (every replica
    runs this)."""
    timeout_s = state.settings.queue_timeout_s
    period = min(5.0, timeout_s / 4)
    while True:
        await asyncio.sleep(period)
        try:
            for job_id in await state.lifecycle.expire_unclaimed(timeout_s):
                log.warning("job %s expired: no worker claimed it in %.0fs", job_id, timeout_s)
            for job_id in await state.lifecycle.expire_orphaned(timeout_s):
                log.warning("job %s ended: its worker stopped and none took it over in %.0fs", job_id, timeout_s)
        except GcrError as exc:
            log.warning("could not expire unclaimed jobs: %s", exc.message)


ARTIFACT_SWEEP_S = 600.0


async def _sweep_artifacts(state: GatewayState) -> None:
    """Delete file artifacts older than the result TTL: images expire with their job."""
    while True:
        try:
            removed = await state.artifacts.sweep(state.settings.result_ttl_s)
            if removed:
                log.info("swept %d expired image(s) from the artifact store", removed)
        except OSError as exc:
            log.warning("could not sweep the artifact store: %s", exc)
        await asyncio.sleep(ARTIFACT_SWEEP_S)
