"""The SDK's exceptions: one class per error `code` the gateway answers with.

    GcrError
    ├── APIConnectionError        the gateway could not be reached (retryable)
    ├── WaitTimeout               `wait` gave up before the job ended (the job goes on)
    └── APIStatusError            the gateway answered with an error body
        ├── InvalidInputError       422 invalid_input (and 413 payload_too_large, 415 unsupported_media_type)
        │   └── UnknownModelError   422 unknown_model: `choices` are the served models
        ├── AuthenticationError     401 unauthorized
        ├── NotFoundError           404 not_found
        ├── ConflictError           409 conflict (retryable)
        ├── RequestTimeoutError     408 request_timeout
        ├── QueueFullError          429 queue_full (retryable)
        ├── RateLimitError          429 rate_limited (retryable)
        ├── TooManyStreamsError     429 too_many_streams: this key's open streams (retryable)
        ├── NoWorkerError           503 no_worker (retryable)
        ├── StoreUnavailableError   503 store_unavailable (retryable)
        └── CriticError             502/503/504 critic_* and critique_unparseable

Every error carries `status`, `code`, `message`, `field` and `retryable`, as the
error body does; `retry_after_s` when the gateway sent `Retry-After`; `choices` when
the body lists the accepted values (unknown_model).
"""

from __future__ import annotations

from typing import Any


class GcrError(Exception):
    """Base of everything the SDK raises."""

    code = "error"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(GcrError):
    code = "unreachable"
    retryable = True


class WaitTimeout(GcrError):
    code = "wait_timeout"

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class APIStatusError(GcrError):
    """The gateway's error body: `{"error": {"code", "message", "field", "retryable"}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        choices: list[str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.choices = choices


class InvalidInputError(APIStatusError): ...


class UnknownModelError(InvalidInputError): ...


class AuthenticationError(APIStatusError): ...


class NotFoundError(APIStatusError): ...


class ConflictError(APIStatusError): ...


class RequestTimeoutError(APIStatusError): ...


class QueueFullError(APIStatusError): ...


class RateLimitError(APIStatusError): ...


class TooManyStreamsError(APIStatusError): ...


class NoWorkerError(APIStatusError): ...


class StoreUnavailableError(APIStatusError): ...


class CriticError(APIStatusError): ...


BY_CODE: dict[str, type[APIStatusError]] = {
    "invalid_input": InvalidInputError,
    "unknown_model": UnknownModelError,
    "payload_too_large": InvalidInputError,
    "unsupported_media_type": InvalidInputError,
    "unauthorized": AuthenticationError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "request_timeout": RequestTimeoutError,
    "queue_full": QueueFullError,
    "rate_limited": RateLimitError,
    "too_many_streams": TooManyStreamsError,
    "no_worker": NoWorkerError,
    "store_unavailable": StoreUnavailableError,
    "artifact_store_error": StoreUnavailableError,
    "critic_error": CriticError,
    "critic_unavailable": CriticError,
    "critic_timeout": CriticError,
    "critique_unparseable": CriticError,
}


def from_body(status: int, body: Any, retry_after_s: float | None = None) -> APIStatusError:
    """The exception for an error answer (a body that is not ours becomes `http_error`)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        text = str(body)[:300] if body else f"HTTP {status}"
        return APIStatusError(status, "http_error", text, retryable=status in (429, 502, 503, 504))
    code = str(error.get("code", "http_error"))
    cls = BY_CODE.get(code, APIStatusError)
    return cls(
        status,
        code,
        str(error.get("message", "")),
        field=error.get("field"),
        retryable=bool(error.get("retryable", False)),
        retry_after_s=retry_after_s,
        choices=[str(c) for c in error["choices"]] if isinstance(error.get("choices"), list) else None,
    )
