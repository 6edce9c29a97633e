"""The error hierarchy of gcr, mapped to HTTP in one place (`service.gateway.app`).

    GcrError
    ├── InvalidInput           422  the request is well-formed JSON but not acceptable
    │   ├── UnknownModel       422  no live worker serves the named model (lists the served ones)
    │   ├── PayloadTooLarge    413
    │   └── UnsupportedMediaType 415
    ├── NotFound               404  unknown id (or another key's id)
    │   └── ArtifactGone       410  the job is there, its image is not (any more)
    ├── Unauthorized           401  missing or unknown API key
    ├── Forbidden              403  a valid key without the right (an admin route)
    ├── Conflict               409  the same Idempotency-Key is being processed right now
    ├── QueueFull              429  the queue cap is reached; retry later
    ├── RateLimited            429  this key's token bucket is empty; retry after Retry-After
    ├── TooManyStreams         429  this key (or the gateway) holds its limit of open streams and waits
    ├── InternalError          500  a bug: the catch-all answer (with a request id to find it in the logs)
    ├── StoreUnavailable       503  Redis cannot be reached (or is full, read-only, loading)
    ├── StoreError             500  Redis refused a command for good (WRONGTYPE, a script error)
    ├── ArtifactStoreError     503  the artifact store (disk, S3) refused a read or write
    ├── NoWorker               503  no live worker serves the job's mode; nothing would run it
    ├── JobStillRunning        504  a waiting call (OpenAI images API) timed out; the job goes on
    ├── JobFailed              502  a waiting call found its job ended without an image (the job's code)
    ├── CriticError            502  the reward model could not give a usable critique
    │   ├── CriticTimeout      504
    │   ├── CriticUnavailable  503  connection refused, 5xx or 429 after retries
    │   ├── CriticRefused      502  the critic's server refused the request as too big (vLLM's 400s)
    │   └── CritiqueUnparseable 502 the answer was read but could not be parsed
    └── GeneratorError         500  the diffusion pipeline failed
        ├── GeneratorOutOfMemory    CUDA OOM even at batch size 1
        ├── GenerationInterrupted   a cancel stopped denoising (no images)
        └── DeviceUnavailable       the configured device (cuda) is not usable: the worker exits

Not GcrErrors, since no client ever sees them: `OwnershipLost` (another worker took a
job over: stop touching it) and `ConfigurationError` (settings that cannot work, raised
at start-up; `TemplateError`: a critic template folder is unusable).

Dependencies' exceptions (redis, httpx, torch) are translated into these at the
boundary of the client that calls them, nowhere else. A job's failure is stored
as data (`JobError`: code, message, retryable), built from one of these.
"""

from __future__ import annotations

from typing import Any

from gcr.errors import CODES


class GcrError(Exception):
    """Base of every error gcr raises on purpose."""

    code = "internal"
    status_code = CODES["internal"].status
    retryable = CODES["internal"].retryable

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that names its `code` answers with that code's status and retryability,
        as the one table (gcr.errors.CODES) gives them."""
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            cls.status_code, cls.retryable = CODES[cls.code].status, CODES[cls.code].retryable

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.choices: list[str] | None = None
        """The accepted values, for an error about a name (the error body's `choices`)."""
        self.job_id: str | None = None
        """The job that exists and that this error is about: its answer names it (`X-Gcr-Job-Id`),
        and on the OpenAI API says not to retry (a retry there would submit a second job)."""


class InvalidInput(GcrError):
    code = "invalid_input"


class UnknownModel(InvalidInput):
    """The request names a model no live worker serves; `served` are the ones they do."""

    code = "unknown_model"

    def __init__(self, message: str, *, served: list[str], field: str = "model") -> None:
        super().__init__(message, field=field)
        self.choices = served


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class NotFound(GcrError):
    code = "not_found"

    @classmethod
    def job(cls, job_id: str) -> NotFound:
        """The one answer for unknown, expired, malformed and other tenants' ids alike."""
        return cls(f"no job {job_id[:80]!r} (unknown, or its results expired)", field="id")


class ArtifactGone(NotFound):
    """The job exists, but one of its images is no longer stored (it expired, or was removed)."""

    code = "artifact_gone"


class Forbidden(GcrError):
    """A valid key asked for what it may not (an admin route without an admin key)."""

    code = "forbidden"


class Conflict(GcrError):
    code = "conflict"


class Unauthorized(GcrError):
    code = "unauthorized"


class QueueFull(GcrError):
    code = "queue_full"


class RateLimited(GcrError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyStreams(GcrError):
    """Refused before an event stream starts: the key, or the gateway, holds its limit of
    open streams and waits (GCR_MAX_OPEN_STREAMS_PER_KEY, GCR_MAX_OPEN_STREAMS)."""

    code = "too_many_streams"


class StoreUnavailable(GcrError):
    code = "store_unavailable"


class StoreFull(StoreUnavailable):
    """Redis refuses writes: it reached its maxmemory (noeviction). Reads still work."""


class StoreError(GcrError):
    """Redis answered, and refused a command for good (WRONGTYPE, a script error): retrying
    will not help. A worker that keeps hitting one with a job dead-letters the job."""

    code = "store_error"


class InternalError(GcrError):
    """Something failed that gcr has no name for (a bug); the log has the traceback."""


class ArtifactStoreError(GcrError):
    """The artifact store refused a read or a write: a full disk, a folder that went away or
    became read-only, S3 errors. Not `StoreUnavailable`: a worker whose images cannot be
    stored ends the job with this error (its finished rounds kept) instead of resuming it
    over and over; at the gateway it is a retryable 503."""

    code = "artifact_store_error"


class NoWorker(GcrError):
    """Refused at submit: no worker that serves this mode has heartbeated recently."""

    code = "no_worker"


class JobStillRunning(GcrError):
    """A call that waits for its job (the OpenAI images API) ran out of time; the job goes on."""

    code = "job_still_running"

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message, field="job_id")
        self.job_id = job_id


class JobFailed(GcrError):
    """A call that waits for its job (the OpenAI images API) found it ended without an image;
    the code is the job's own (`critic_unavailable`, `generator_error`, ...)."""

    status_code = 502

    def __init__(self, message: str, *, code: str, job_id: str, retryable: bool = False) -> None:
        super().__init__(message, field="job_id")
        self.code = code
        self.retryable = retryable
        self.job_id = job_id


class CriticError(GcrError):
    code = "critic_error"

    usage: dict[str, int] | None = None
    """Tokens the critic spent on the answers it did give (an unparseable one), if any."""


class CriticTimeout(CriticError):
    code = "critic_timeout"


class CriticUnavailable(CriticError):
    code = "critic_unavailable"


class CriticRefused(CriticError):
    """The critic's server refused the critique as it is, for a limit it was started with (vLLM:
    the context length, images per prompt). The same request would be refused again: not retried."""

    code = "critic_refused"


class CritiqueUnparseable(CriticError):
    """The critic answered, but the answer holds no usable critique.

    `missing` names what could not be found (e.g. ``["score: text_faithfulness"]``)
    so the message says exactly why the answer was refused.
    """

    code = "critique_unparseable"

    def __init__(self, message: str, *, missing: list[str] | None = None, raw: str = "") -> None:
        super().__init__(message)
        self.missing = missing or []
        self.raw = raw


class GeneratorError(GcrError):
    code = "generator_error"


class GeneratorOutOfMemory(GeneratorError):
    code = "generator_out_of_memory"


class DeviceUnavailable(GeneratorError):
    """The worker was told to use a GPU it cannot use (no driver, too old a driver, no such index)."""

    code = "device_unavailable"


class GenerationInterrupted(GeneratorError):
    """`generate` stopped early because `interrupt()` returned True; it made no images."""

    code = "generator_interrupted"


class OwnershipLost(Exception):
    """Another worker took the job over (or it ended): stop touching it."""


class ConfigurationError(ValueError):
    """A setting, or a combination of settings, that cannot work (raised at start-up, before
    any job is claimed; the message names the setting)."""


class TemplateError(ConfigurationError):
    """A template folder or manifest is unusable (raised at start-up)."""
