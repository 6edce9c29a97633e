"""Reading the body of `POST /generate`: JSON, or multipart with the image as a file.

Parsing only: what the body says is checked against limits, tenancy and the fleet by the
job service (`service.gateway.job_service`).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from gcr.types import GenerateRequest
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.gateway.uploads import decode_base64_image
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
