"""The OpenAI images API over the whole Generate-Critique-Refine loop.

`POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart) take
OpenAI's request shapes (see `service.gateway.openai_images`), run one gcr job and answer in
OpenAI's shape with the best image(s) of all rounds: `data[].b64_json` (the default) or
`data[].url` (a gateway link, fetched with the same Bearer key), and
`data[].revised_prompt`, the prompt of the round that made the image (an edit
round's instruction, when `loop.strategy` edits). The job id comes
back in the `X-Gcr-Job-Id` header and in `gcr.job_id`. `n` images are the n best
candidates of one job (at least n candidates per round). `stream=true` sends the rounds
as `partial_image` events, then `completed`.

One call, one job: once the job exists, every error answer carries `x-should-retry:
false` (the `openai` package and others honour it), since a retry would submit a second
job; `Idempotency-Key` works as on `POST /generate`. The call waits for the job up to
`GCR_OPENAI_WAIT_S`, then answers 504 `job_still_running` naming the job to poll.
Errors come in OpenAI's shape (`service.gateway.app`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Form, Header, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from gcr.types import TERMINAL_STATUSES, JobDocument, OpenAIErrorResponse, blank
from service.errors import GcrError, InternalError, InvalidInput, JobFailed, JobStillRunning, PayloadTooLarge
from service.gateway import links
from service.gateway.auth import Principal
from service.gateway.bodies import validation_error
from service.gateway.deps import Caller, Jobs, State, Workers
from service.gateway.follow import follow
from service.gateway.job_service import JobService
from service.gateway.openai_images import (
    GcrOptions,
    ImageGenerationRequest,
    OutputFormat,
    PartialPlan,
    ResponseFormat,
    b64,
    encode,
    job_request,
    size_of,
    stream_event,
    usage,
)
from service.gateway.state import GatewayState
from service.gateway.streams import HeldEventSource
from service.jobs.presenter import image_url, job_url, present
from service.jobs.ranking import ranked
from service.jobs.records import StoredJob

router = APIRouter(prefix="/v1", tags=["openai"])
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 408, 409, 413, 415, 429, 500, 502, 503, 504)
}
log = logging.getLogger("gcr.gateway")

T = TypeVar("T")


async def _for_job(job_id: str, work: Awaitable[T]) -> T:
    """Run `work` for an existing job: whatever goes wrong, the error names the job (the error
    handler then tells clients not to retry: a retry would submit a second job)."""
    try:
        return await work
    except GcrError as exc:
        exc.job_id = job_id
        raise
    except Exception as exc:
        log.exception("answering for job %s failed", job_id)
        error = InternalError(f"the gateway failed while answering for job {job_id}; the job goes on: poll it")
        error.job_id = job_id
        raise error from exc


def _gcr_extra(job: StoredJob, base: str) -> dict[str, Any]:
    doc = present(job, base)
    return {
        "job_id": doc.id,
        "job_url": job_url(base, doc.id),
        "status": doc.status,
        "stop_reason": doc.stop_reason,
        "rounds": len(doc.rounds),
        "best": doc.best.model_dump() if doc.best else None,
        # The client's own prompt, longer than the generator's text encoder reads: what it read
        # is each item's `revised_prompt`; this says so, with the words left out.
        "prompt_cut": _prompt_cut(doc),
    }


def _prompt_cut(doc: JobDocument) -> dict[str, Any] | None:
    fit = doc.rounds[0].prompt_fit if doc.rounds else None
    return fit.model_dump() if fit is not None and fit.cut else None


def _no_image(doc: StoredJob) -> JobFailed:
    reason = doc.error.message if doc.error else f"it ended {doc.status} without an image"
    code = doc.error.code if doc.error else "no_image"
    retryable = bool(doc.error and doc.error.retryable)
    return JobFailed(f"job {doc.id}: {reason}", code=code, job_id=doc.id, retryable=retryable)


async def _answer(request: Request, state: GatewayState, doc: StoredJob, body: ImageGenerationRequest) -> Response:
    base = links.base_url(request, state.settings)
    if doc.status not in TERMINAL_STATUSES:
        raise JobStillRunning(
            f"job {doc.id} is still {doc.status} after {state.settings.openai_wait_s:g}s; "
            f"poll GET {job_url(base, doc.id)} (or follow its /events)",
            job_id=doc.id,
        )
    picks = ranked(doc.rounds)[: body.n]
    if not picks:
        raise _no_image(doc)
    data = []
    for round_, candidate in picks:
        item: dict[str, Any] = {"revised_prompt": round_.prompt}
        if body.response_format == "url":
            item["url"] = image_url(base, doc.id, round_.index, candidate.index)
        else:
            png = await state.store.get_image(doc.id, round_.index, candidate.index)
            item["b64_json"] = b64(await asyncio.to_thread(encode, png, body.output_format, body.output_compression))
        data.append(item)
    content = {
        "created": int(doc.created_at),
        "data": data,
        "output_format": body.output_format,
        "size": size_of(doc),
        "usage": usage(doc),
        "gcr": _gcr_extra(doc, base),
    }
    return JSONResponse(content, headers={"X-Gcr-Job-Id": doc.id})


async def _run(
    request: Request,
    state: GatewayState,
    jobs: JobService,
    caller: Principal,
    body: ImageGenerationRequest,
    mode: str,
    source: bytes | None,
    idempotency_key: str | None,
) -> Response:
    spec = job_request(body, mode)
    base = links.base_url(request, state.settings)
    # The wait or stream counts against the stream limits like GET /events; taken before the
    # job exists, so a 429 too_many_streams can be retried without making a second job.
    slot = state.streams.take(caller.key_id)
    try:
        doc, _created = await jobs.submit(caller, spec, source, base_url=base, idempotency_key=idempotency_key)
    except BaseException:
        slot.release()
        raise
    if body.stream:
        stream = _stream(state, doc, body, base)
        return HeldEventSource(
            slot.release, stream, ping=state.settings.sse_keepalive_s, headers={"X-Gcr-Job-Id": doc.id}
        )

    async def finish() -> Response:
        try:
            done = await jobs.wait_for_end(doc.id, state.settings.openai_wait_s)
        finally:
            slot.release()
        return await _answer(request, state, done, body)

    return await _for_job(doc.id, finish())


async def _stream(state: GatewayState, doc: StoredJob, body: ImageGenerationRequest, base: str) -> AsyncIterator[Any]:
    """The job's rounds as OpenAI stream events; an error becomes an `error` event (OpenAI's
    shape: the `openai` package raises it), since the status line is already sent."""
    try:
        async for event in _events(state, doc, body, base):
            yield {"event": event["type"], "data": json.dumps(event)}
    except GcrError as exc:
        error = {"message": exc.message, "type": "server_error", "param": exc.field, "code": exc.code}
        yield {"event": "error", "data": json.dumps({"type": "error", "error": error})}
    except Exception:
        log.exception("the stream of job %s failed", doc.id)
        error = {"message": f"the stream failed; the job goes on: poll job {doc.id}", "type": "server_error"}
        yield {"event": "error", "data": json.dumps({"type": "error", "error": {**error, "param": None}})}


async def _events(
    state: GatewayState, doc: StoredJob, body: ImageGenerationRequest, base: str
) -> AsyncIterator[dict[str, Any]]:
    mode, size = doc.spec.mode, size_of(doc)
    plan = PartialPlan(body.partial_images, doc.spec.loop.max_rounds)
    rounds: dict[int, dict[str, Any]] = {}
    sent = 0

    async def partial(index: int) -> dict[str, Any]:
        nonlocal sent
        round_ = rounds[index]
        png = await state.store.get_image(doc.id, index, int(round_["chosen"]))
        image = await asyncio.to_thread(encode, png, body.output_format, body.output_compression)
        extra = {"partial_image_index": sent, "gcr": {"job_id": doc.id, "round": index, "overall": round_["overall"]}}
        sent += 1
        return stream_event("partial_image", mode, image, body, size, extra)

    async for _entry, event in follow(state.store, doc.id):
        # A round whose images could not be judged has no chosen image to stream.
        round_ = event.data.get("round") if event.type == "round" else None
        if isinstance(round_, dict) and round_.get("chosen") is not None:
            rounds[int(round_["index"])] = round_
            for index in plan.on_round(int(round_["index"])):
                yield await partial(index)
    for index in plan.at_end():
        yield await partial(index)
    final = await state.store.get(doc.id)
    picks = ranked(final.rounds)
    if not picks:
        raise _no_image(final)
    best_round, best = picks[0]
    png = await state.store.get_image(doc.id, best_round.index, best.index)
    image = await asyncio.to_thread(encode, png, body.output_format, body.output_compression)
    extra = {"revised_prompt": best_round.prompt, "usage": usage(final), "gcr": _gcr_extra(final, base)}
    yield stream_event("completed", mode, image, body, size_of(final), extra)


@router.post("/images/generations", responses=OPENAI_ERRORS)
async def images_generations(
    body: ImageGenerationRequest,
    request: Request,
    state: State,
    jobs: Jobs,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """OpenAI `images.generate`: runs the whole loop, answers with the best image(s) of all rounds
    (or streams each round's image with `stream`)."""
    return await _run(request, state, jobs, caller, body, "t2i", None, idempotency_key)


@router.post("/images/edits", responses=OPENAI_ERRORS)
async def images_edits(
    request: Request,
    state: State,
    jobs: Jobs,
    caller: Caller,
    image: Annotated[list[UploadFile], Form(description="The source image (PNG, JPEG or WebP); one.")],
    prompt: Annotated[str | None, Form(description="The edit instruction.")] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form(ge=1, le=8)] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "b64_json",
    output_format: Annotated[OutputFormat, Form()] = "png",
    output_compression: Annotated[int | None, Form(ge=0, le=100)] = None,
    stream: Annotated[bool, Form()] = False,
    partial_images: Annotated[int, Form(ge=0, le=3)] = 0,
    seed: Annotated[int | None, Form()] = None,
    num_inference_steps: Annotated[int | None, Form()] = None,
    guidance_scale: Annotated[float | None, Form()] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    gcr: Annotated[str | None, Form(description="gcr's settings as JSON: {loop, generation, priority}")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """OpenAI `images.edit` (multipart): the loop in edit mode on the uploaded image."""
    if len(image) != 1:
        raise InvalidInput(f"send exactly one image; got {len(image)}", field="image")
    if not prompt or blank(prompt):  # an empty form field arrives as missing: say what it is
        raise InvalidInput("prompt is empty: send the edit instruction", field="prompt")
    limit = state.settings.max_image_bytes
    source = await image[0].read(limit + 1)
    if len(source) > limit:
        raise PayloadTooLarge(f"image is larger than {limit} bytes", field="image")
    try:
        # pydantic's own parser: it bounds nesting (json.loads raised RecursionError, a 500).
        options = GcrOptions.model_validate_json(gcr) if gcr else GcrOptions()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'gcr'}: {error['msg']}" for error in exc.errors()[:3]
        )
        message = f"gcr must be a JSON object of loop, generation, priority ({problems})"
        raise InvalidInput(message, field="gcr") from exc
    fields = {
        "prompt": prompt,
        "model": model,
        "n": n,
        "size": size,
        "response_format": response_format,
        "output_format": output_format,
        "output_compression": output_compression,
        "stream": stream,
        "partial_images": partial_images,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
    }
    try:
        body = ImageGenerationRequest.model_validate({**fields, "gcr": options})
    except ValidationError as exc:
        raise validation_error(exc) from exc
    return await _run(request, state, jobs, caller, body, "edit", source, idempotency_key)


@router.get("/models", responses={401: {"model": OpenAIErrorResponse}, 429: {"model": OpenAIErrorResponse}})
async def list_models(fleet: Workers, _caller: Caller) -> dict[str, Any]:
    """OpenAI's model list: the generator models live workers serve, with gcr's details in `gcr`
    (modes, ready workers, the modes it is the default for, its generation defaults)."""
    return {"object": "list", "data": await fleet.model_list()}
