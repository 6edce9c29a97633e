"""What `Client` and `AsyncClient` share: their state (`BaseClient`), building requests,
reading answers, and the one retry policy. Only the sending differs between the two
(httpx's sync and async clients).

Retries: connection errors and answers 429, 502, 503 and 504 are retried up to
`max_retries` times, after the answer's `Retry-After` when it has one (capped), else
after an exponential backoff with jitter. A submit is retried only with an
`Idempotency-Key` (the SDK makes one when the caller gives none), so a retried submit
never makes a second job.
"""

from __future__ import annotations

import base64
import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypedDict, TypeVar

import httpx
from httpx_sse import ServerSentEvent
from pydantic import BaseModel

from gcr.backoff import equal_jitter_s, retry_after_s
from gcr.errors import CODES, APIConnectionError, APIStatusError, GcrError, WaitTimeout, from_body
from gcr.types import GenerationParams, JobEvent, LoopParams

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_AFTER_CAP_S = 60.0
BACKOFF_FIRST_S = 0.5
READ_SLICE_S = 15.0  # the gateway pings every 10 s, so a read longer than this means trouble
BACKOFF_CAP_S = 8.0
USER_AGENT = "gcr-python"

ImageInput = bytes | str | Path
"""PNG/JPEG/WebP bytes, a path to such a file, or a base64 string / data: URI."""
EventCallback = Callable[[JobEvent], Any]
HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)


class BaseClient(Generic[HttpT]):
    """What both faces hold: the httpx client (given, or made from the URL, the key and the
    timeout) and the retry budget of each request (see `gcr.AsyncClient`)."""

    _http_class: type[HttpT]

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        http_client: HttpT | None = None,
    ) -> None:
        self.max_retries = max_retries
        self.http: HttpT = http_client or self._http_class(
            base_url=base_url.rstrip("/"), headers=headers(api_key), timeout=timeout_s
        )


def headers(api_key: str | None) -> dict[str, str]:
    values = {"user-agent": USER_AGENT}
    if api_key:
        values["authorization"] = f"Bearer {api_key}"
    return values


def encode_image(image: ImageInput) -> str:
    """Base64 of an image given as bytes or a path; a string is passed as it is."""
    if isinstance(image, Path):
        image = image.read_bytes()
    if isinstance(image, bytes):
        return base64.b64encode(image).decode()
    return image


class JobOptions(TypedDict, total=False):
    """What a job may say beside its prompt."""

    model: str | None
    mode: str | None
    source_image: ImageInput | None
    generation: GenerationParams | Mapping[str, Any] | None
    loop: LoopParams | Mapping[str, Any] | None
    priority: str | None
    callback_url: str | None


class GenerateOptions(JobOptions, total=False):
    """`Client.generate(prompt, **options)`: the job's options, and how to wait for it."""

    wait: bool | float
    on_event: EventCallback | None
    idempotency_key: str | None


class GenerateCall(NamedTuple):
    """`generate`'s keywords sorted out: the request body, its key, and how to wait."""

    body: dict[str, Any]
    idempotency_key: str | None
    wait: bool | float
    on_event: EventCallback | None

    @classmethod
    def of(cls, prompt: str, options: Mapping[str, Any]) -> GenerateCall:
        job = dict(options)
        wait, on_event, key = job.pop("wait", False), job.pop("on_event", None), job.pop("idempotency_key", None)
        return cls(generate_body(prompt, job), key, wait, on_event)

    @property
    def timeout(self) -> float | None:
        """`wait` as `wait()`'s timeout: True waits for as long as it takes."""
        return None if self.wait is True else float(self.wait)


def generate_body(prompt: str, options: Mapping[str, Any]) -> dict[str, Any]:
    if unknown := sorted(set(options) - set(JobOptions.__annotations__)):  # a typo must not pass silently
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")
    model, mode, source_image = options.get("model"), options.get("mode"), options.get("source_image")
    generation, loop = options.get("generation"), options.get("loop")
    priority, callback_url = options.get("priority"), options.get("callback_url")
    body: dict[str, Any] = {"prompt": prompt}
    if model is not None:
        body["model"] = model
    if source_image is not None:
        body["source_image"] = encode_image(source_image)
        body["mode"] = mode or "edit"
    elif mode is not None:
        body["mode"] = mode
    for name, value in (("generation", generation), ("loop", loop)):
        if value is not None:
            body[name] = value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else dict(value)
    if priority is not None:
        body["priority"] = priority
    if callback_url is not None:
        body["callback_url"] = callback_url
    return body


def critique_body(
    instruction: str, image: ImageInput, source_image: ImageInput | None, mode: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"instruction": instruction, "image": encode_image(image)}
    if source_image is not None:
        body["source_image"] = encode_image(source_image)
    if mode is not None:
        body["mode"] = mode
    return body


def idempotency_header(key: str | None) -> dict[str, str]:
    """The submit's `Idempotency-Key`: the caller's, or a new one, so a retried submit never makes a second job."""
    return {"Idempotency-Key": key or f"gcr-sdk-{uuid.uuid4().hex}"}


def raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise from_body(response.status_code, body, retry_after_s(response))


def retry_delay(error: Exception, attempt: int, max_retries: int) -> float | None:
    """Seconds to wait before retry number `attempt + 1`, or None when `error` is final."""
    if attempt >= max_retries:
        return None
    if isinstance(error, APIStatusError):
        if error.status not in RETRY_STATUSES:
            return None
        if error.code in CODES and not CODES[error.code].retryable:  # the table says a retry cannot help
            return None
        if error.retry_after_s is not None:
            return min(error.retry_after_s, RETRY_AFTER_CAP_S)
    elif not isinstance(error, APIConnectionError):
        return None
    return equal_jitter_s(attempt, BACKOFF_FIRST_S, BACKOFF_CAP_S)


class Retries:
    """One request's retries: `after(error)` is the wait before the next attempt; it raises
    `error` when the error is final or the retries are spent."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries
        self.attempt = 0

    def after(self, error: GcrError) -> float:
        delay = retry_delay(error, self.attempt, self.max_retries)
        if delay is None:
            raise error
        self.attempt += 1
        return delay


def unreachable(base_url: httpx.URL, exc: httpx.TransportError) -> APIConnectionError:
    return APIConnectionError(
        f"cannot reach the gateway at {base_url} ({type(exc).__name__}: {exc}); "
        "check the URL, and that `gcr serve` (or `gcr up --dev`) is running there"
    )


@contextlib.contextmanager
def connection_errors(base_url: httpx.URL) -> Iterator[None]:
    """httpx's transport errors become `APIConnectionError`, here at the boundary."""
    try:
        yield
    except httpx.TransportError as exc:
        raise unreachable(base_url, exc) from exc


def readiness(response: httpx.Response, base_url: httpx.URL) -> dict[str, Any]:
    """GET /readyz's report (200 or 503 alike)."""
    with contextlib.suppress(ValueError):
        report: dict[str, Any] = response.json()
        return report
    raise APIConnectionError(f"{base_url}/readyz did not answer JSON")


def job_event(sse: ServerSentEvent) -> JobEvent | None:
    """The `JobEvent` an SSE message carries, or None for a keep-alive.

    The gateway pings a quiet stream (GCR_SSE_KEEPALIVE_S) with a comment line. httpx-sse
    hands that on as a message with empty data (and the last id seen), so a client that
    parsed every message would crash whenever a job is quiet for one keep-alive: while it
    waits in the queue, or on every real critique (10-60 s of reasoning)."""
    if not sse.data.strip() or sse.event == "ping":
        return None
    return JobEvent.model_validate_json(sse.data)


def stream_error(event: JobEvent) -> APIStatusError:
    """An `error` event: the stream could not go on (its status line had already been sent)."""
    data = event.data
    return from_body(200, {"error": {"code": data.get("code", "stream_error"), "message": data.get("message", "")}})


class EventStream:
    """One job's event stream without the I/O: where to resume, what to skip, when to give
    up. `Client` and `AsyncClient` drive it the same way; only their sending differs.

    A dropped connection is resumed with `Last-Event-ID`, up to `reconnects` times in a
    row without a new event. With a `deadline` (time.monotonic), reads are sliced so the
    deadline holds even while pings keep the connection busy."""

    def __init__(self, base_url: httpx.URL, job_id: str, *, reconnects: int, deadline: float | None = None) -> None:
        self.base_url = base_url
        self.job_id = job_id
        self.path = f"/jobs/{job_id}/events"
        self.reconnects = reconnects
        self.deadline = deadline
        self.last_id: str | None = None
        self.failures = 0
        self.ended = False

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last_id} if self.last_id else {}

    def timeout(self) -> httpx.Timeout:
        if self.deadline is None:
            return httpx.Timeout(30, read=READ_SLICE_S)
        return httpx.Timeout(30, read=max(0.1, min(READ_SLICE_S, self.deadline - time.monotonic())))

    def accept(self, sse: ServerSentEvent) -> JobEvent | None:
        """The event to hand on, or None for a keep-alive; raises on the deadline or an `error` event."""
        # A steady flow of events (progress, pings) never times a read out, so the
        # deadline is checked on every message, not only on a read timeout.
        self._check_deadline()
        event = job_event(sse)
        if event is None:
            return None
        self.last_id, self.failures = sse.id or self.last_id, 0
        if event.type == "error":
            raise stream_error(event)
        self.ended = event.type == "end"
        return event

    def until_end(self, messages: Iterable[ServerSentEvent]) -> Iterator[JobEvent]:
        """The events of one connection's messages, up to `end` (for the blocking client)."""
        for sse in messages:
            if (event := self.accept(sse)) is not None:
                yield event
            if self.ended:
                return

    def interrupted(self, exc: httpx.TransportError) -> float:
        """Seconds to wait before reconnecting; raises once reconnecting is no use.

        A read slice that ended quietly (`ReadTimeout`) is no failure: go on at once,
        unless the deadline has passed."""
        if isinstance(exc, httpx.ReadTimeout):
            self._check_deadline(exc)
            return 0.0
        self.failures += 1
        if self.failures > self.reconnects:
            raise unreachable(self.base_url, exc) from exc
        pause: float = min(2.0, 0.2 * 2**self.failures)
        if self.deadline is not None and time.monotonic() + pause >= self.deadline:
            raise WaitTimeout(f"job {self.job_id} did not end in time; it goes on", self.job_id) from exc
        return pause

    def _check_deadline(self, cause: Exception | None = None) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeout(f"job {self.job_id} did not end in time; it goes on", self.job_id) from cause
