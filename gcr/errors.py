"""The SDK's exceptions: one class per error `code` the gateway answers with.

    GcrError
    ├── APIConnectionError        the gateway could not be reached (retryable)
    ├── WaitTimeout               `wait` gave up before the job ended (the job goes on)
    └── APIStatusError            the gateway answered with an error body
        ├── InvalidInputError       422 invalid_input (and 413 payload_too_large, 415 unsupported_media_type)
        │   └── UnknownModelError   422 unknown_model: `choices` are the served models
        ├── AuthenticationError     401 unauthorized
        ├── PermissionDeniedError   403 forbidden: a valid key without the right (admin routes)
        ├── NotFoundError           404 not_found
        ├── ConflictError           409 conflict (retryable)
        ├── RequestTimeoutError     408 request_timeout
        ├── QueueFullError          429 queue_full (retryable)
        ├── RateLimitError          429 rate_limited (retryable)
        ├── TooManyStreamsError     429 too_many_streams: this key's open streams (retryable)
        ├── NoWorkerError           503 no_worker (retryable)
        ├── StoreUnavailableError   503 store_unavailable, artifact_store_error (retryable)
        ├── CriticError             502/503/504 critic_*, critique_unparseable
        └── ServerError             500 internal, store_error and the generator's codes

`CODES` is the one table of error codes: for each, its HTTP status, whether a retry
can help, and the class the SDK raises. The gateway's exceptions (service/errors.py)
take their status and retryability from it, and a test walks every one of them, so the
server's codes and these classes cannot drift apart.

Every error carries `status`, `code`, `message`, `field` and `retryable`, as the
error body does; `retry_after_s` when the gateway sent `Retry-After`; `choices` when
the body lists the accepted values (unknown_model).
"""

from __future__ import annotations

from typing import Any, NamedTuple


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


class PermissionDeniedError(APIStatusError): ...


class NotFoundError(APIStatusError): ...


class ConflictError(APIStatusError): ...


class RequestTimeoutError(APIStatusError): ...


class QueueFullError(APIStatusError): ...


class RateLimitError(APIStatusError): ...


class TooManyStreamsError(APIStatusError): ...


class NoWorkerError(APIStatusError): ...


class StoreUnavailableError(APIStatusError): ...


class CriticError(APIStatusError): ...


class ServerError(APIStatusError): ...


class Code(NamedTuple):
    """One error code: the status the gateway answers it with, whether the same request
    may succeed later, and the class the SDK raises for it."""

    status: int
    retryable: bool
    exception: type[APIStatusError]


CODES: dict[str, Code] = {
    "invalid_input": Code(422, False, InvalidInputError),
    "unknown_model": Code(422, False, UnknownModelError),
    "payload_too_large": Code(413, False, InvalidInputError),
    "unsupported_media_type": Code(415, False, InvalidInputError),
    "bad_request": Code(400, False, InvalidInputError),
    "method_not_allowed": Code(405, False, InvalidInputError),
    "unauthorized": Code(401, False, AuthenticationError),
    "forbidden": Code(403, False, PermissionDeniedError),
    "not_found": Code(404, False, NotFoundError),
    "artifact_gone": Code(410, False, NotFoundError),
    "conflict": Code(409, True, ConflictError),
    "request_timeout": Code(408, False, RequestTimeoutError),
    "queue_full": Code(429, True, QueueFullError),
    "rate_limited": Code(429, True, RateLimitError),
    "too_many_streams": Code(429, True, TooManyStreamsError),
    "no_worker": Code(503, True, NoWorkerError),
    "store_unavailable": Code(503, True, StoreUnavailableError),
    "store_error": Code(500, False, ServerError),
    "artifact_store_error": Code(503, True, StoreUnavailableError),
    "job_still_running": Code(504, False, APIStatusError),
    "critic_error": Code(502, False, CriticError),
    "critic_timeout": Code(504, True, CriticError),
    "critic_unavailable": Code(503, True, CriticError),
    "critique_unparseable": Code(502, False, CriticError),
    "critic_refused": Code(502, False, CriticError),
    "internal": Code(500, False, ServerError),
    "generator_error": Code(500, False, ServerError),
    "generator_out_of_memory": Code(500, False, ServerError),
    "device_unavailable": Code(500, False, ServerError),
    "generator_interrupted": Code(500, False, ServerError),
}


def from_body(status: int, body: Any, retry_after_s: float | None = None) -> APIStatusError:
    """The exception for an error answer (a body that is not ours becomes `http_error`)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        text = str(body)[:300] if body else f"HTTP {status}"
        return APIStatusError(status, "http_error", text, retryable=status in (429, 502, 503, 504))
    code = str(error.get("code", "http_error"))
    known = CODES.get(code)
    cls = known.exception if known is not None else APIStatusError
    return cls(
        status,
        code,
        str(error.get("message", "")),
        field=error.get("field"),
        retryable=bool(error.get("retryable", False)),
        retry_after_s=retry_after_s,
        choices=[str(c) for c in error["choices"]] if isinstance(error.get("choices"), list) else None,
    )
