"""The HTTP gateway: validates, enqueues, and answers from Redis.

It holds no job state in memory, so any number of replicas can serve the same
Redis. Errors of every kind leave through one handler as one body shape:
`{"error": {"code", "message", "field", "retryable"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import http_metrics
from service.auth import Principal, authenticate
from service.body_limit import BodyLimitMiddleware
from service.errors import GcrError, InvalidInput, NotFound, RateLimited, StoreUnavailable, Unauthorized
from service.gateway_state import GatewayState
from service.protocol import (
    Critique,
    CritiqueRequest,
    ErrorBody,
    ErrorResponse,
    JobDocument,
    JobList,
    SubmitResponse,
)
from service.settings import Settings
from service.submit import JSON_OVERHEAD_BYTES, parse_generate_body, prepare_job

log = logging.getLogger("gcr.gateway")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 409, 422, 429, 502, 503, 504)
}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 413, 415)}
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
}
SSE_BLOCK_MS = 10_000  # below redis_client.SOCKET_TIMEOUT_S
SSE_BLIP_S = 30.0  # how long a stream waits for Redis to come back before it gives up
RETRY_AFTER_S = 5


def _error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=ErrorResponse(error=body).model_dump(), headers=headers)


def _validation_field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GcrError)
    async def gcr_error(_request: Request, exc: GcrError) -> JSONResponse:
        http_metrics.ERRORS.labels(exc.code).inc()
        headers: dict[str, str] | None = None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        elif exc.status_code in (429, 503):
            headers = {"Retry-After": str(RETRY_AFTER_S)}
        elif isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        body = ErrorBody(code=exc.code, message=exc.message, field=exc.field, retryable=exc.retryable)
        return _error_response(exc.status_code, body, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (unknown route, wrong method, malformed multipart) get our body too.
        code = HTTP_CODES.get(exc.status_code, "http_error")
        http_metrics.ERRORS.labels(code).inc()
        headers = dict(exc.headers) if exc.headers else None
        return _error_response(exc.status_code, ErrorBody(code=code, message=str(exc.detail)), headers)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _validation_field(tuple(first.get("loc", ())))
        message = "; ".join(f"{_validation_field(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors)
        return _error_response(422, ErrorBody(code="invalid_input", message=message, field=field or None))


async def get_state(request: Request) -> GatewayState:
    # async: a plain def would be run in FastAPI's threadpool on every request.
    state: GatewayState = request.app.state.gcr
    return state


State = Annotated[GatewayState, Depends(get_state)]


async def get_principal(
    state: State, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> Principal:
    """Authenticate the key, then take a token from its rate-limit bucket."""
    principal = authenticate(state.settings, authorization)
    await state.rate_limiter.take(principal.key_id)
    return principal


Caller = Annotated[Principal, Depends(get_principal)]

# Ids are token_urlsafe(16); anything else cannot exist, and must never reach Redis as
# part of a key (`<id>:events` would name another key type).
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def valid_job_id(job_id: Annotated[str, Path(description="The id POST /generate returned.")], _caller: Caller) -> str:
    # Depends on Caller so that authentication and the rate limit come first (FastAPI
    # runs the shared dependency once per request).
    if not _JOB_ID.match(job_id):
        raise NotFound.job(job_id)
    return job_id


JobId = Annotated[str, Depends(valid_job_id)]


def create_app(settings: Settings) -> FastAPI:
    """The gateway app; its lifespan opens the Redis pool and the critic client."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = GatewayState(settings)
        app.state.gcr = state
        if settings.auth_disabled:
            log.warning("AUTH IS DISABLED (GCR_AUTH_DISABLED=true): anyone who reaches this port can use it")
        elif not settings.api_keys and not settings.admin_keys:
            log.warning("no API keys configured (GCR_API_KEYS): every request will answer 401")
        sweeper = asyncio.create_task(_expire_unclaimed(state), name="gcr-expire-unclaimed")
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.wait({sweeper}, timeout=5)
            await state.aclose()

    app = FastAPI(
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

    @app.post(
        "/generate",
        status_code=202,
        response_model=SubmitResponse,
        responses={
            200: {"model": SubmitResponse, "description": "Idempotent replay: the existing job"},
            **ERROR_RESPONSES,
            **UPLOAD_ERRORS,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["request"],
                            "properties": {
                                "request": {"type": "string", "description": "GenerateRequest as JSON"},
                                "source_image": {"type": "string", "format": "binary"},
                            },
                        }
                    },
                },
            }
        },
    )
    async def generate(
        request: Request,
        state: State,
        caller: Caller,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> JSONResponse:
        """Queue a job. JSON body, or multipart with a `request` JSON field and a `source_image` file.

        Answers 202 with the job id and links; 429 with Retry-After when the queue is full;
        503 `no_worker` when no live worker serves the job's mode (it would never run).
        The same `Idempotency-Key` with the same body returns the same job."""
        spec, source = await parse_generate_body(request, settings)
        if idempotency_key is not None and (replay := await state.replay(caller, idempotency_key, spec)):
            return _submitted(request, settings, replay, status=200)
        await state.require_worker(spec.mode)
        doc, source_png = await prepare_job(spec, source, settings, owner=caller.tenant)
        if idempotency_key is None:
            await state.store.create(doc, source_png, settings.queue_max)
        else:
            replay = await state.create_once(caller, idempotency_key, spec, doc, source_png)
            if replay is not None:
                return _submitted(request, settings, replay, status=200)
        http_metrics.JOBS_SUBMITTED.labels(doc.spec.mode, doc.spec.priority).inc()
        return _submitted(request, settings, doc, status=202)

    @app.get("/jobs/{job_id}", response_model=JobDocument, responses=ERROR_RESPONSES)
    async def get_job(job_id: JobId, request: Request, state: State, caller: Caller) -> Response:
        """The job: status, effective spec, every round with scores and images, the best candidate."""
        return _document(_render(request, settings, await state.owned_job(job_id, caller)))

    @app.delete("/jobs/{job_id}", response_model=JobDocument, responses=ERROR_RESPONSES)
    async def cancel_job(job_id: JobId, request: Request, state: State, caller: Caller) -> Response:
        """Cancel: a queued job never runs; a running one stops at its next stage boundary."""
        await state.check_owner(job_id, caller)
        outcome = await state.store.cancel(job_id)
        if outcome == "missing":
            raise NotFound.job(job_id)
        return _document(_render(request, settings, await state.store.get(job_id)))

    @app.get("/jobs/{job_id}/events", responses=ERROR_RESPONSES)
    async def job_events(
        job_id: JobId,
        state: State,
        caller: Caller,
        last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    ) -> EventSourceResponse:
        """Server-Sent Events: `status`, `stage`, `progress`, `round`, then `end` when the job ends.

        Reconnect with `Last-Event-ID` to resume after the last event received."""
        if last_event_id is not None and not _STREAM_ID.match(last_event_id):
            raise InvalidInput(
                "Last-Event-ID must be an event id this stream sent (like 1700000000000-0)", field="Last-Event-ID"
            )
        await state.check_owner(job_id, caller)
        return EventSourceResponse(_event_stream(state, job_id, last_event_id or "0-0"), ping=10)

    @app.get(
        "/jobs/{job_id}/images/{round_index}/{candidate}",
        responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES},
        response_class=Response,
    )
    async def job_image(job_id: JobId, round_index: int, candidate: int, state: State, caller: Caller) -> Response:
        """PNG bytes of one candidate image."""
        await state.check_owner(job_id, caller)
        png = await state.store.get_image(job_id, round_index, candidate)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/jobs/{job_id}/source",
        responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES},
        response_class=Response,
    )
    async def job_source(job_id: JobId, state: State, caller: Caller) -> Response:
        """PNG bytes of an edit job's source image."""
        await state.check_owner(job_id, caller)
        return Response(await state.store.get_source_image(job_id), media_type="image/png")

    @app.post("/critique", response_model=Critique, responses=ERROR_RESPONSES)
    async def critique(body: CritiqueRequest, state: State, _caller: Caller) -> Critique:
        """Judge one client-supplied image with the reward model, synchronously."""
        return await state.critique(body)

    @app.get("/admin/jobs", response_model=JobList, responses=ERROR_RESPONSES)
    async def admin_jobs(
        request: Request,
        state: State,
        caller: Caller,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        before: Annotated[
            float | None, Query(allow_inf_nan=False, description="Only jobs created before this timestamp.")
        ] = None,
    ) -> JobList:
        """Admin keys only: every tenant's jobs, newest first."""
        state.require_admin(caller)
        docs = await state.recent_jobs(limit, before)
        return JobList(jobs=[_render(request, settings, d) for d in docs])

    @app.get("/admin/queue", responses=ERROR_RESPONSES)
    async def admin_queue(state: State, caller: Caller) -> dict[str, Any]:
        """Admin keys only: queue depth by mode and priority, pending entries, live workers."""
        state.require_admin(caller)
        return await state.queue_stats()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready"}})
    async def readyz(state: State) -> JSONResponse:
        """Readiness: Redis answers and at least one worker heartbeat is recent."""
        report = await state.readiness()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics of this gateway replica."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def body_limits(settings: Settings) -> dict[str, int]:
    """The largest body each route that takes one accepts: one image, base64 or raw, plus
    room for the JSON (or the multipart framing) around it; two for POST /critique."""
    image = settings.max_image_bytes * 4 // 3  # base64 is 4/3 of the bytes; raw multipart less
    return {"/generate": image + JSON_OVERHEAD_BYTES, "/critique": 2 * image + JSON_OVERHEAD_BYTES}


def _base_url(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


def _links(base: str, job_id: str) -> dict[str, str]:
    return {"self": f"{base}/jobs/{job_id}", "events": f"{base}/jobs/{job_id}/events"}


def _render(request: Request, settings: Settings, doc: JobDocument) -> JobDocument:
    """Absolute URLs for images and links."""
    base = _base_url(request, settings)
    doc.links = _links(base, doc.id)
    if doc.spec.mode == "edit":
        doc.links["source_image"] = f"{base}/jobs/{doc.id}/source"
    for round_ in doc.rounds:
        for candidate in round_.candidates:
            if candidate.image_url and candidate.image_url.startswith("/"):
                candidate.image_url = base + candidate.image_url
    if doc.best and doc.best.image_url and doc.best.image_url.startswith("/"):
        doc.best.image_url = base + doc.best.image_url
        doc.links["best_image"] = doc.best.image_url
    return doc


def _document(doc: JobDocument) -> Response:
    # The document was validated when read from Redis; returning it as a model would make
    # FastAPI dump, re-validate and dump it again on the hottest route (polling).
    return Response(doc.model_dump_json(), media_type="application/json")


def _submitted(request: Request, settings: Settings, doc: JobDocument, status: int) -> JSONResponse:
    links = _links(_base_url(request, settings), doc.id)
    body = SubmitResponse(id=doc.id, status=doc.status, links=links)
    return JSONResponse(body.model_dump(), status_code=status, headers={"Location": links["self"]})


async def _expire_unclaimed(state: GatewayState) -> None:
    """End queued jobs that no worker claimed within GCR_QUEUE_TIMEOUT_S (every replica runs this)."""
    period = min(5.0, state.settings.queue_timeout_s / 4)
    while True:
        await asyncio.sleep(period)
        try:
            for job_id in await state.store.expire_unclaimed(state.settings.queue_timeout_s):
                log.warning("job %s expired: no worker claimed it in %.0fs", job_id, state.settings.queue_timeout_s)
        except GcrError as exc:
            log.warning("could not expire unclaimed jobs: %s", exc.message)


async def _event_stream(state: GatewayState, job_id: str, after: str) -> AsyncIterator[dict[str, str]]:
    """The job's events from `after` on. A Redis blip is ridden out (reads resume from the last
    id sent, for up to SSE_BLIP_S); past that the error becomes an event, then the end marker."""
    lost_since: float | None = None
    delay = 0.1
    while True:
        try:
            events = await state.store.read_events(job_id, after=after, block_ms=SSE_BLOCK_MS)
            exists = bool(events) or await state.store.exists(job_id)
        except StoreUnavailable as exc:
            now = time.monotonic()
            lost_since = lost_since or now
            if now - lost_since > SSE_BLIP_S:
                # The status line is already sent: the error becomes an event, then the end marker.
                yield {"event": "error", "data": json.dumps({"code": exc.code, "message": exc.message})}
                yield {"event": "end", "data": json.dumps({"job_id": job_id, "status": "unknown"})}
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        lost_since, delay = None, 0.1
        for entry_id, event in events:
            after = entry_id
            yield {"event": event.type, "id": entry_id, "data": event.model_dump_json()}
            if event.type == "end":
                return
        if not exists:
            yield {"event": "end", "data": json.dumps({"job_id": job_id, "status": "expired"})}
            return
