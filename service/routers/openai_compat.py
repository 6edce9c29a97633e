"""The OpenAI images API over the whole Generate-Critique-Refine loop.

`POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart) take
OpenAI's request shapes, run one gcr job and answer in OpenAI's shape with the best
image(s) of all rounds: `data[].b64_json` (the default) or `data[].url` (a gateway link,
fetched with the same Bearer key), and `data[].revised_prompt`, the prompt of the round
that made the image. Loop and generation settings ride in the extra field `gcr`
(`extra_body={"gcr": {"loop": {...}}}` in the `openai` package; for edits, a JSON
string). The job id comes back in the `X-Gcr-Job-Id` header and in `gcr.job_id`.
`n` images are the n best candidates of one job (at least n candidates per round).

The call waits for the job up to `GCR_OPENAI_WAIT_S`; past that it answers 504
`job_still_running` naming the job to poll. Fields OpenAI defines that a diffusion loop
has no use for (quality, style, user, ...) are accepted and ignored.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import fleet, links
from service.deps import ERROR_RESPONSES, UPLOAD_ERRORS, Caller, State
from service.errors import InvalidInput, JobFailed, JobStillRunning, PayloadTooLarge
from service.gateway_state import GatewayState
from service.protocol import Candidate, GenerateRequest, JobDocument, Round
from service.submit import submit, validation_error

router = APIRouter(prefix="/v1", tags=["openai"])

ResponseFormat = Literal["b64_json", "url"]


class GcrOptions(BaseModel):
    """gcr's own settings, in the request's extra field `gcr`."""

    model_config = ConfigDict(extra="forbid")
    loop: dict[str, Any] = Field(default_factory=dict)
    generation: dict[str, Any] = Field(default_factory=dict)
    priority: Literal["high", "normal", "low"] = "normal"


class ImageGenerationRequest(BaseModel):
    """OpenAI's `POST /images/generations` body (fields gcr has no use for are ignored)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=8)
    size: str | None = Field(None, description="WIDTHxHEIGHT (multiples of 16), or `auto`.")
    response_format: ResponseFormat = "b64_json"
    gcr: GcrOptions = Field(default_factory=GcrOptions)


def _size(size: str | None) -> dict[str, int]:
    if size is None or size == "auto":
        return {}
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InvalidInput(f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024) or auto", field="size")
    return {"width": int(width), "height": int(height)}


def _job_request(body: ImageGenerationRequest, mode: str, source_b64: str | None) -> GenerateRequest:
    loop = dict(body.gcr.loop)
    loop["candidates_per_round"] = max(int(loop.get("candidates_per_round", 1)), body.n)
    spec = {
        "prompt": body.prompt,
        "mode": mode,
        "model": body.model,
        "source_image": source_b64,
        "generation": {**body.gcr.generation, **_size(body.size)},
        "loop": loop,
        "priority": body.gcr.priority,
    }
    try:
        return GenerateRequest.model_validate(spec)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def _ranked(doc: JobDocument) -> list[tuple[Round, Candidate]]:
    scored = [(r, c) for r in doc.rounds for c in r.candidates if c.overall is not None and c.has_image]
    return sorted(scored, key=lambda rc: (-(rc[1].overall or 0.0), rc[0].index, rc[1].index))


async def _answer(
    request: Request, state: GatewayState, doc: JobDocument, n: int, response_format: ResponseFormat
) -> JSONResponse:
    base = links.base_url(request, state.settings)
    headers = {"X-Gcr-Job-Id": doc.id}
    if doc.status not in ("succeeded", "failed", "cancelled", "expired"):
        raise JobStillRunning(
            f"job {doc.id} is still {doc.status} after {state.settings.openai_wait_s:g}s; "
            f"poll GET {links.job_url(base, doc.id)} (or follow its /events)",
            job_id=doc.id,
        )
    picks = _ranked(doc)[:n]
    if not picks:
        reason = doc.error.message if doc.error else f"it ended {doc.status} without an image"
        code = doc.error.code if doc.error else "no_image"
        retryable = bool(doc.error and doc.error.retryable)
        raise JobFailed(f"job {doc.id}: {reason}", code=code, job_id=doc.id, retryable=retryable)
    data = []
    for round_, candidate in picks:
        item: dict[str, Any] = {"revised_prompt": round_.prompt}
        if response_format == "url":
            item["url"] = links.image_url(base, doc.id, round_.index, candidate.index)
        else:
            png = await state.store.get_image(doc.id, round_.index, candidate.index)
            item["b64_json"] = base64.b64encode(png).decode()
        data.append(item)
    rendered = links.render(doc, base)
    extra = {
        "job_id": doc.id,
        "job_url": links.job_url(base, doc.id),
        "status": doc.status,
        "stop_reason": doc.stop_reason,
        "rounds": len(doc.rounds),
        "best": rendered.best.model_dump() if rendered.best else None,
    }
    return JSONResponse({"created": int(doc.created_at), "data": data, "gcr": extra}, headers=headers)


async def _run(
    request: Request, state: State, caller: Caller, body: ImageGenerationRequest, mode: str, source: bytes | None
) -> JSONResponse:
    spec = _job_request(body, mode, base64.b64encode(source).decode() if source is not None else None)
    base = links.base_url(request, state.settings)
    doc, _created = await submit(state, caller, spec.model_copy(update={"source_image": None}), source, base_url=base)
    doc = await state.wait_for_end(doc.id, state.settings.openai_wait_s)
    return await _answer(request, state, doc, body.n, body.response_format)


@router.post("/images/generations", responses={**ERROR_RESPONSES, **UPLOAD_ERRORS})
async def images_generations(
    body: ImageGenerationRequest, request: Request, state: State, caller: Caller
) -> JSONResponse:
    """OpenAI `images.generate`: runs the whole loop, answers with the best image(s) of all rounds."""
    return await _run(request, state, caller, body, "t2i", None)


@router.post("/images/edits", responses={**ERROR_RESPONSES, **UPLOAD_ERRORS})
async def images_edits(
    request: Request,
    state: State,
    caller: Caller,
    image: Annotated[list[UploadFile], Form(description="The source image (PNG, JPEG or WebP); one.")],
    prompt: Annotated[str, Form(min_length=1)],
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form(ge=1, le=8)] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "b64_json",
    gcr: Annotated[str | None, Form(description="gcr's settings as JSON: {loop, generation, priority}")] = None,
) -> JSONResponse:
    """OpenAI `images.edit` (multipart): the loop in edit mode on the uploaded image."""
    if len(image) != 1:
        raise InvalidInput(f"send exactly one image; got {len(image)}", field="image")
    limit = state.settings.max_image_bytes
    source = await image[0].read(limit + 1)
    if len(source) > limit:
        raise PayloadTooLarge(f"image is larger than {limit} bytes", field="image")
    try:
        options = GcrOptions.model_validate(json.loads(gcr)) if gcr else GcrOptions()
    except (ValueError, ValidationError) as exc:
        raise InvalidInput(f"gcr must be a JSON object of loop, generation, priority: {exc}", field="gcr") from exc
    body = ImageGenerationRequest(
        prompt=prompt, model=model, n=n, size=size, response_format=response_format, gcr=options
    )
    return await _run(request, state, caller, body, "edit", source)


@router.get("/models")
async def list_models(state: State, _caller: Caller) -> dict[str, Any]:
    """OpenAI's model list: the generator models live workers serve, with gcr's details in `gcr`
    (modes, ready workers, the modes it is the default for, its generation defaults)."""
    workers = await state.fleet(fresh=True)
    return {"object": "list", "data": fleet.model_list(workers, state.settings.default_models, int(time.time()))}
