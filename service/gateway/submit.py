"""Turning a `POST /generate` request into a job ready to queue."""

from __future__ import annotations

import asyncio
import math
import secrets
import time

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from gcr.types import MAX_SEED, GenerateRequest, JobDocument
from service.errors import GcrError, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.gateway import http_metrics
from service.gateway.auth import Principal
from service.gateway.state import GatewayState
from service.gateway.uploads import check_image, check_mode_images, decode_base64_image
from service.netguard import check_public_url
from service.settings import GatewaySettings

JSON_OVERHEAD_BYTES = 1024 * 1024


def validation_error(exc: ValidationError) -> RequestValidationError:
    """A pydantic error of a body read by hand, as FastAPI's own (one 422 shape for both)."""
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])


async def parse_generate_body(request: Request, settings: GatewaySettings) -> tuple[GenerateRequest, bytes | None]:
    """The validated spec and, for edits, the raw source image bytes (not yet checked)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.max_image_bytes * 4 // 3 + JSON_OVERHEAD_BYTES
    if content_type in ("application/json", ""):
        body = await request.body()
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        try:
            spec = GenerateRequest.model_validate_json(body or b"null")
        except ValidationError as exc:
            raise validation_error(exc) from exc
        source = None
        if spec.source_image is not None:
            source = decode_base64_image(spec.source_image, field="source_image", max_bytes=settings.max_image_bytes)
        return spec, source
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4, max_part_size=limit) as form:
            return await _parse_multipart(form, settings)
    raise UnsupportedMediaType(f"content type {content_type!r} is not accepted; use JSON or multipart/form-data")


async def _parse_multipart(form: FormData, settings: GatewaySettings) -> tuple[GenerateRequest, bytes | None]:
    raw = form.get("request")
    if not isinstance(raw, str):
        raise InvalidInput("multipart body needs a `request` field holding the JSON request", field="request")
    try:
        spec = GenerateRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    upload = form.get("source_image")
    if isinstance(upload, UploadFile):
        source = await upload.read(settings.max_image_bytes + 1)
        if len(source) > settings.max_image_bytes:
            raise PayloadTooLarge(f"source_image is larger than {settings.max_image_bytes} bytes", field="source_image")
        return spec, source
    if spec.source_image is not None:
        return spec, decode_base64_image(spec.source_image, field="source_image", max_bytes=settings.max_image_bytes)
    return spec, None


async def submit(
    state: GatewayState,
    caller: Principal,
    spec: GenerateRequest,
    source: bytes | None,
    *,
    base_url: str,
    idempotency_key: str | None = None,
) -> tuple[JobDocument, bool]:
    """Store and queue the job (or find the one an earlier request with this key made).
    Returns the job and whether it was created now (False: an idempotent replay)."""
    if idempotency_key is not None and (replay := await state.replay(caller, idempotency_key, spec)):
        return replay, False
    # Validate first, route second: a bad request is the client's 4xx whether or not a worker
    # serves its mode (routing first answered a missing edit image with a retryable 503).
    doc, source_png = await prepare_job(spec, source, state.settings, owner=caller.tenant, base_url=base_url)
    model = await state.route(spec.mode, spec.model)
    await check_size(state, spec, model)
    loop = doc.spec.loop.model_copy(update={"edit_model": await route_edit_model(state, spec, model)})
    doc = doc.model_copy(update={"spec": doc.spec.model_copy(update={"model": model, "loop": loop})})
    if idempotency_key is None:
        await state.store.create(doc, source_png, state.settings.queue_max)
    elif (replay := await state.create_once(caller, idempotency_key, spec, doc, source_png)) is not None:
        return replay, False
    http_metrics.JOBS_SUBMITTED.labels(doc.spec.model, doc.spec.mode, doc.spec.priority).inc()
    return doc, True


async def route_edit_model(state: GatewayState, spec: GenerateRequest, model: str) -> str | None:
    """The model a strategy that edits (`edit`, `auto`) runs its edit rounds on: `loop.edit_model`,
    else the job's own model for an edit job, else the fleet's default edit model. Refused as the
    job's own model is: 503 while no live worker serves it for edits, 422 for a name nobody serves."""
    if spec.loop.strategy == "rewrite":
        return spec.loop.edit_model
    requested = spec.loop.edit_model or (model if spec.mode == "edit" else None)
    try:
        return await state.route("edit", requested)
    except GcrError as exc:
        exc.field = "loop.edit_model"
        exc.message = f"loop.strategy {spec.loop.strategy!r} edits its best image: {exc.message}"
        raise


async def check_size(state: GatewayState, spec: GenerateRequest, model: str) -> None:
    """A size the model's workers were not sized for (GCR_MAX_OUTPUT_PIXELS) is refused now,
    not run into an out-of-memory error on a GPU it shares."""
    width, height = spec.generation.width, spec.generation.height
    if spec.mode != "t2i" or (width is None and height is None):
        return  # an edit's size follows its source, bounded by the workers' GCR_EDIT_MAX_EDGE
    cap = await state.pixel_cap(model, spec.mode, width, height)
    if cap is not None:
        raise InvalidInput(
            f"{width or 'default'}x{height or 'default'} is larger than the workers of {model} generate: "
            f"at most {cap} pixels (e.g. {math.isqrt(cap) // 16 * 16}x{math.isqrt(cap) // 16 * 16})",
            field="width" if width is not None else "height",
        )


async def prepare_job(
    spec: GenerateRequest, source: bytes | None, settings: GatewaySettings, owner: str, base_url: str | None = None
) -> tuple[JobDocument, bytes | None]:
    """Check what the schema cannot, draw the seed, and build the queued document."""
    if len(spec.prompt) > settings.max_prompt_chars:
        raise InvalidInput(
            f"prompt has {len(spec.prompt)} characters; the limit is {settings.max_prompt_chars}",
            field="prompt",
        )
    check_mode_images(spec.mode, source is not None)
    if spec.callback_url is not None:
        await check_public_url(spec.callback_url, field="callback_url", allow_private=settings.webhook_allow_private)
    source_png = None
    if source is not None:
        source_png = await asyncio.to_thread(
            check_image,
            source,
            field="source_image",
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
        )
    generation = spec.generation
    if generation.seed is None:
        generation = generation.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    # The stored spec echoes the effective values; the image bytes live in their own key.
    effective = spec.model_copy(update={"generation": generation, "source_image": None})
    doc = JobDocument(
        id=secrets.token_urlsafe(16),
        status="queued",
        spec=effective,
        stage="queued",
        created_at=time.time(),
        owner=owner,
        base_url=base_url,
    )
    return doc, source_png
