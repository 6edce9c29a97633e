"""The native job API: submit, poll, wait, follow (SSE), cancel, fetch images."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import RedirectResponse, Response

from gcr.types import TERMINAL_STATUSES, JobDocument, JobEvent, JobList
from service.errors import InvalidInput, StoreUnavailable
from service.gateway import links
from service.gateway.bodies import parse_generate_body
from service.gateway.deps import ERROR_RESPONSES, UPLOAD_ERRORS, Before, Caller, JobId, Jobs, State
from service.gateway.follow import follow
from service.gateway.streams import HeldEventSource
from service.jobs.listener import stream_position as position
from service.jobs.presenter import job_url, present, present_round_json
from service.jobs.store import JobStore

router = APIRouter(tags=["jobs"])

MAX_PREFER_WAIT_S = 60.0
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
MAX_STREAM_PART = 2**64 - 1
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)

GENERATE_BODY: dict[str, Any] = {
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
}


def document(doc: JobDocument, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # The document was validated when read from Redis; returning it as a model would make
    # FastAPI dump, re-validate and dump it again on the hottest route (polling).
    return Response(doc.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def prefer_wait_s(prefer: str | None) -> float | None:
    """Seconds from `Prefer: wait=N` (RFC 7240), capped at MAX_PREFER_WAIT_S."""
    match = _PREFER_WAIT.search(prefer or "")
    return min(float(match.group(1)), MAX_PREFER_WAIT_S) if match else None


@router.post(
    "/generate",
    status_code=202,
    response_model=JobDocument,
    responses={
        200: {"model": JobDocument, "description": "Idempotent replay: the existing job"},
        201: {"model": JobDocument, "description": "`Prefer: wait=N` and the job ended within N seconds"},
        **ERROR_RESPONSES,
        **UPLOAD_ERRORS,
    },
    openapi_extra=GENERATE_BODY,
)
async def generate(
    request: Request,
    state: State,
    jobs: Jobs,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    prefer: Annotated[str | None, Header(max_length=200, description="`wait=N`: answer when done, N s at most")] = None,
) -> Response:
    """Queue a job. JSON body, or multipart with a `request` JSON field and a `source_image` file.

    Answers 202 with the queued job; with `Prefer: wait=N` (N ≤ 60), 201 with the finished
    job if it ends within N seconds, else 202 (at once, without `Preference-Applied`, when
    this key or the gateway holds its limit of open waits). 429 with Retry-After when the queue is full;
    503 `no_worker` when no live worker serves the job's mode (it would never run). The same
    `Idempotency-Key` with the same body returns the same job (200)."""
    spec, source = await parse_generate_body(request, state.settings)
    base = links.base_url(request, state.settings)
    job, created = await jobs.submit(caller, spec, source, base_url=base, idempotency_key=idempotency_key)
    status = 202 if created else 200
    wait_s = prefer_wait_s(prefer)
    if wait_s and not state.streams.available(caller.key_id):
        # The job exists: a 429 now would invite a retry. `Prefer` is a preference, so it is
        # not applied (no Preference-Applied header) and the job is answered as queued.
        wait_s = None
    headers = {"Location": job_url(base, job.id)}
    if wait_s:
        try:
            with state.streams.held(caller.key_id):
                job = await jobs.wait_for_end(job.id, wait_s)
            headers["Preference-Applied"] = f"wait={wait_s:g}"
        except StoreUnavailable:
            # The job exists and runs on: answer it as it was stored (no retry, no second job),
            # without Preference-Applied; the client polls its Location.
            pass
        if job.status in TERMINAL_STATUSES:
            status = 201
    return document(present(job, base), status, headers)


@router.get("/jobs", response_model=JobList, responses=ERROR_RESPONSES)
async def list_jobs(
    request: Request,
    state: State,
    jobs: Jobs,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Before = None,
) -> JobList:
    """Your jobs (this key's tenant), newest first; page with `before` (a `created_at`)."""
    base = links.base_url(request, state.settings)
    return JobList(jobs=[present(job, base) for job in await jobs.recent(caller, limit, before)])


@router.get("/jobs/{job_id}", response_model=JobDocument, responses=ERROR_RESPONSES)
async def get_job(job_id: JobId, request: Request, state: State, jobs: Jobs, caller: Caller) -> Response:
    """The job: status, effective spec, every round with scores and images, the best candidate."""
    job = await jobs.get(job_id, caller)
    return document(present(job, links.base_url(request, state.settings)))


@router.delete("/jobs/{job_id}", response_model=JobDocument, responses=ERROR_RESPONSES)
async def cancel_job(job_id: JobId, request: Request, state: State, jobs: Jobs, caller: Caller) -> Response:
    """Cancel: a queued job never runs; a running one stops at its next stage boundary."""
    job = await jobs.cancel(job_id, caller)
    return document(present(job, links.base_url(request, state.settings)))


@router.get("/jobs/{job_id}/events", responses=ERROR_RESPONSES)
async def job_events(
    job_id: JobId,
    request: Request,
    state: State,
    jobs: Jobs,
    caller: Caller,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> Response:
    """Server-Sent Events, each a `JobEvent`: `status`, `stage`, `progress`, `round`, then `end`
    (after `error` if the stream could not go on). Reconnect with `Last-Event-ID` to resume;
    an id this job's stream never sent is a 422. A quiet stream gets a keep-alive comment
    every GCR_SSE_KEEPALIVE_S. 429 `too_many_streams` when this key (or the gateway) holds
    its limit of open streams."""
    after = stream_position(last_event_id)
    await jobs.check_owner(job_id, caller)
    last = await state.store.last_event(job_id)
    if last is not None and position(last[0]) < after:
        raise InvalidInput(
            f"Last-Event-ID {last_event_id} is ahead of this job's events (the newest is {last[0]})",
            field="Last-Event-ID",
        )
    if last is None and after > (0, 0):
        raise InvalidInput(
            f"Last-Event-ID {last_event_id} was not sent by this job's stream (it has no events yet)",
            field="Last-Event-ID",
        )
    if last_event_id is not None and not await state.store.sent_event(job_id, last_event_id):
        raise InvalidInput(f"Last-Event-ID {last_event_id} was not sent by this job's stream", field="Last-Event-ID")
    base = links.base_url(request, state.settings)
    slot = state.streams.take(caller.key_id)  # decided before the stream starts
    try:
        if last is not None and last[1].type == "end" and position(last[0]) == after:
            # The client saw the end and reconnected anyway: end again rather than wait forever.
            body: AsyncIterator[dict[str, str]] = _replay_end(*last)
        else:
            body = event_stream(state.store, job_id, last_event_id or "0-0", base)
        return HeldEventSource(slot.release, body, ping=state.settings.sse_keepalive_s)
    except BaseException:
        slot.release()
        raise


def stream_position(last_event_id: str | None) -> tuple[int, int]:
    """`Last-Event-ID` as (ms, seq); 422 unless it is a stream id Redis could have issued
    (two unsigned 64-bit integers: a larger one made Redis refuse the read, a 503)."""
    if last_event_id is None:
        return (0, 0)
    parsed = position(last_event_id) if _STREAM_ID.match(last_event_id) else None
    if parsed is None or max(parsed) > MAX_STREAM_PART:
        raise InvalidInput(
            "Last-Event-ID must be an event id this stream sent (like 1700000000000-0)", field="Last-Event-ID"
        )
    return parsed


async def _replay_end(entry_id: str, event: JobEvent) -> AsyncIterator[dict[str, str]]:
    yield _sse(event, entry_id)


@router.get(
    "/jobs/{job_id}/images/{round_index}/{candidate}",
    responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES},
    response_class=Response,
)
async def job_image(
    job_id: JobId, round_index: int, candidate: int, state: State, jobs: Jobs, caller: Caller
) -> Response:
    """PNG bytes of one candidate image (`round_index` and `candidate` count from 0); with
    GCR_ARTIFACT_REDIRECT on an S3 store, a 307 to a short-lived presigned URL instead.
    410 when the job is there but the image is not any more."""
    await jobs.check_owner(job_id, caller)
    if state.settings.artifact_redirect:
        key = await state.store.image_key(job_id, round_index, candidate)
        url = await state.artifacts.presigned(key)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "private, no-store"})
    png = await state.store.get_image(job_id, round_index, candidate)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/jobs/{job_id}/source",
    responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES},
    response_class=Response,
)
async def job_source(job_id: JobId, state: State, jobs: Jobs, caller: Caller) -> Response:
    """PNG bytes of an edit job's source image."""
    await jobs.check_owner(job_id, caller)
    return Response(await state.store.get_source_image(job_id), media_type="image/png")


def _sse(event: JobEvent, entry_id: str | None = None) -> dict[str, str]:
    message = {"event": event.type, "data": event.model_dump_json()}
    if entry_id is not None:
        message["id"] = entry_id
    return message


async def event_stream(store: JobStore, job_id: str, after: str, base: str) -> AsyncIterator[dict[str, str]]:
    """The job's events from `after` on, round images linked (`follow`: a Redis blip is ridden
    out; past that the error becomes an `error` event, then `end`: the status line is sent)."""
    try:
        async for entry_id, event in follow(store, job_id, after):
            if event.type == "round" and isinstance(event.data.get("round"), dict):
                event.data["round"] = present_round_json(job_id, event.data["round"], base)
            yield _sse(event, entry_id)
    except StoreUnavailable as exc:
        now = time.time()
        yield _sse(JobEvent(type="error", job_id=job_id, at=now, data={"code": exc.code, "message": exc.message}))
        yield _sse(JobEvent(type="end", job_id=job_id, at=now, data={"status": "unknown"}))
