"""One error body per API: gcr's own (`{"error": ErrorBody}`), or OpenAI's shape on `/v1/`
(so the `openai` package raises its own exception classes with our message). Every answer
says whether a retry can help in `x-should-retry`, the header the `openai` package obeys
(`retryable` in our body). The app's exception handlers and the body-limit middleware,
which answers before any route runs, both build their answers here."""

from __future__ import annotations

from typing import Any

from gcr.types import ErrorBody, ErrorResponse


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_answer(path: str, status: int, body: ErrorBody) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, JSON content and headers of an error answer on `path`."""
    headers = {"x-should-retry": "true" if body.retryable else "false"}
    if not path.startswith("/v1/"):
        return status, ErrorResponse(error=body).model_dump(), headers
    if status == 422:
        status = 400  # OpenAI answers every invalid request 400 (`BadRequestError` in the package)
    error = {
        "message": body.message,
        "type": _openai_type(status),
        "param": body.field,
        "code": body.code,
        **body.model_dump(include={"retryable", "choices", "request_id"}),
    }
    return status, {"error": error}, headers
