"""Settings per role, read from `GCR_*` environment variables at start-up.

`SharedSettings` is what every role reads; `GatewaySettings` (`gcr serve`) and
`WorkerSettings` (`gcr worker`) add their own; `Settings` is all of them, for `gcr up
--dev` and the tests, which run both roles in one process. Each process builds its
object once and passes it down; no other module reads `os.environ`. docs/configuration.md's
table lists these fields; `tests/unit/test_docs.py` keeps the two in step.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gcr.types import MODEL_NAME, MODES

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TENANT_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class SharedSettings(BaseSettings):
    """What the gateway and the worker both read: Redis, the artifact store, the critic
    (the gateway's POST /critique and the worker's rounds), callback URLs, logs."""

    # env_ignore_empty: `GCR_X=` (compose's `${GCR_X:-}`) means "not set", i.e. the default.
    model_config = SettingsConfigDict(env_prefix="GCR_", extra="forbid", validate_default=True, env_ignore_empty=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the queue and all job state.")
    redis_prefix: str = Field("gcr", pattern=r"^[A-Za-z0-9_.-]+$", description="Prefix of every Redis key.")
    redis_max_connections: int = Field(
        200, ge=1, description="Connections per process; beyond it requests wait for a free one."
    )
    redis_pool_timeout_s: float = Field(
        10.0, gt=0, description="How long a request waits for a free Redis connection before 503."
    )
    artifact_url: str = Field(
        default_factory=lambda: f"file://{Path.home() / '.cache' / 'gcr' / 'artifacts'}",
        description="Where images go: file:///path (shared by gateway and workers) or s3://bucket/prefix.",
    )
    artifact_redirect: bool = Field(
        False, description="Answer image requests with a redirect to a presigned S3 URL instead of the bytes."
    )
    result_ttl_s: int = Field(86_400, ge=60, description="How long job documents, events and images live.")
    max_inflight_critiques: int = Field(
        256,
        ge=1,
        description="Most critic requests one process keeps in flight: a ceiling; a worker's own limit adapts "
        "below it to the critic's knee (docs/performance.md).",
    )
    public_url: str | None = Field(None, description="Base URL put in links; default: the request's own base URL.")
    webhook_allow_private: bool = Field(
        False, description="Allow callback URLs on private/loopback addresses (tests, single-host setups)."
    )
    log_format: Literal["json", "text"] = Field("json", description="`json`: one object per line, with job id.")
    critic_base_url: str = Field("http://127.0.0.1:8001/v1", description="OpenAI-compatible base URL (vLLM).")
    critic_model: str = Field("TIGER-Lab/RationalRewards-8B-T2I", description="Served model name for t2i.")
    critic_edit_model: str | None = Field(None, description="Served model name for edits; default: critic_model.")
    critic_api_key: SecretStr | None = Field(None, description="Bearer token for a hosted endpoint.")
    critic_timeout_s: float = Field(180.0, gt=0, description="Per-request timeout of one critique.")
    critic_max_tokens: int = Field(2048, ge=256, description="max_tokens of one critique.")
    critic_temperature: float = Field(0.1, ge=0, le=2, description="Sampling temperature (upstream: 0.1).")
    critic_retries: int = Field(3, ge=0, description="Retries on connection errors, 429 and 5xx.")
    critic_max_image_edge: int = Field(1024, ge=64, description="Images are downscaled to this long edge.")
    critic_structured_outputs: bool = Field(
        True,
        description="Constrain the re-ask of an unparseable answer with vLLM `structured_outputs` (a bounded "
        "regex; turn off for servers that refuse the field).",
    )
    critic_templates_dir: Path | None = Field(None, description="Folder of your own templates, replacing ours.")
    critic_edit_template: Literal["edit", "edit_tuning"] = Field(
        "edit", description="`edit_tuning`: the variant of the authors' test-time script."
    )
    critic_breaker_failures: int = Field(
        5, ge=1, description="Consecutive failed critic calls that open the circuit breaker."
    )
    critic_breaker_cooldown_s: float = Field(
        30.0, gt=0, description="How long an open breaker fails calls fast before one trial call."
    )

    @property
    def effective_edit_model(self) -> str:
        return self.critic_edit_model or self.critic_model


class GatewaySettings(SharedSettings):
    """`gcr serve`: HTTP, admission, auth, limits, routing (read in service/gateway/)."""

    host: str = Field("127.0.0.1", description="Address `gcr serve` binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port `gcr serve` binds.")
    queue_max: int = Field(1000, ge=1, description="Queued jobs beyond which POST /generate answers 429.")
    request_body_timeout_s: float = Field(
        30.0, gt=0, description="A request body that stops arriving for this long is answered 408."
    )
    # The `openai` package's default timeout is 600 s (`DEFAULT_TIMEOUT` in its `_constants.py`),
    # and it retries a timed-out call as a new request: answering 10 s before that, with
    # `x-should-retry: false`, makes a slow job one 504 instead of three jobs.
    openai_wait_s: float = Field(
        590.0,
        gt=0,
        le=3600,
        description="How long /v1/images/* wait for their job before 504 job_still_running "
        "(just under the openai package's 600 s default timeout).",
    )
    # At most 12: the SDK reads a stream in 15 s slices (gcr/_base.py READ_SLICE_S) and
    # reconnects after a slice with nothing in it.
    sse_keepalive_s: float = Field(
        10.0, gt=0, le=12, description="A quiet event stream gets a keep-alive comment this often (at most 12 s)."
    )
    max_open_streams: int = Field(
        4096, ge=1, description="Open event streams and `Prefer: wait` requests per gateway; beyond: 429."
    )
    max_open_streams_per_key: int = Field(
        256, ge=1, description="The same, per API key (tenant with auth off); beyond: 429."
    )
    max_prompt_chars: int = Field(4000, ge=1, description="Longest accepted prompt.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest accepted source image, encoded.")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="Most pixels in an accepted source image.")
    worker_stale_s: float = Field(15.0, gt=0, description="A worker whose last heartbeat is older is not alive.")
    default_models: dict[str, str] = Field(
        default_factory=dict,
        description='JSON {"t2i": "<model>", "edit": "<model>"}: the model of requests that name none; '
        "unset: the model most live workers serve for the mode.",
    )
    queue_timeout_s: float = Field(
        900.0,
        gt=0,
        description="A queued job no worker claims within this ends as `expired` (stop reason `unclaimed`).",
    )
    auth_disabled: bool = Field(False, description="Turn API-key auth off (dev only; logged loudly).")
    api_keys: dict[str, str] = Field(
        default_factory=dict, description='JSON {"<sha256 of key>": "<tenant>"}; make one with `gcr keys new`.'
    )
    admin_keys: dict[str, str] = Field(
        default_factory=dict, description="Same form; these keys also list all jobs and see queue stats."
    )
    rate_limit_per_s: float = Field(20.0, ge=0, description="Requests per second per key (token bucket); 0: off.")
    rate_limit_burst: int = Field(40, ge=1, description="Bucket size of the per-key rate limit.")

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _tenant_names(cls, table: dict[str, str]) -> dict[str, str]:
        for digest, tenant in table.items():
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise ValueError(f"{digest[:12]}...: keys are SHA-256 hex digests (make one with `gcr keys new`)")
            if not TENANT_NAME.fullmatch(tenant):
                raise ValueError(f"tenant {tenant!r}: {TENANT_RULE}")
        return table

    @field_validator("default_models")
    @classmethod
    def _default_models(cls, table: dict[str, str]) -> dict[str, str]:
        for mode, model in table.items():
            if mode not in MODES:
                raise ValueError(f"{mode!r} is not a mode ({', '.join(MODES)})")
            if not re.fullmatch(MODEL_NAME, model):
                raise ValueError(f"{model!r} is not a model name (no whitespace or glob characters, 1-200 long)")
        return table


class WorkerSettings(SharedSettings):
    """`gcr worker`: the generator, scheduling, webhook delivery (read in workers/)."""

    webhook_secret: SecretStr | None = Field(
        None, description="Standard Webhooks secret (`whsec_` + base64 of 24-64 random bytes) signing webhooks."
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="Per-attempt timeout of a webhook delivery.")
    webhook_attempts: int = Field(5, ge=1, description="Delivery attempts, with exponential backoff.")
    webhook_backoff_s: float = Field(1.0, ge=0, description="First retry delay of a webhook; doubles each time.")
    generator: str | None = Field(
        None,
        description="Diffusers model id or local folder; `tiny:sd`, `tiny:flux`, `tiny:kontext` build a "
        "random-weight test pipeline; `sim:SECONDS` is the timed simulator used by benchmarks.",
    )
    model_name: str | None = Field(
        None,
        pattern=MODEL_NAME,
        description="Name requests use for this worker's model (`model`, /v1/models); default: GCR_GENERATOR.",
    )
    generator_device: str = Field("auto", description="`auto` (cuda if available), `cuda`, `cuda:1`, `cpu`.")
    generator_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="`auto`: bfloat16 on CUDA, float32 on CPU."
    )
    cpu_offload: bool = Field(False, description="Call `enable_model_cpu_offload()` (saves VRAM, costs speed).")
    compile: bool = Field(False, description="`torch.compile` the denoiser at load time.")
    lora_path: str | None = Field(None, description="LoRA weights loaded into the pipeline at start-up.")
    attention_backend: str | None = Field(None, description="diffusers attention backend, e.g. `flash`, if available.")
    memory_check: bool = Field(
        True, description="Before loading, estimate the model's GPU memory and wait (reported) until it fits."
    )
    memory_retry_s: float = Field(30.0, gt=0, description="How often a worker whose model does not fit checks again.")
    cache_dir: Path = Field(Path.home() / ".cache" / "gcr", description="Where `tiny:*` pipelines are built.")
    edit_max_edge: int = Field(1024, ge=64, description="Edit outputs: long edge bound (rounded to 16).")
    max_output_pixels: int | None = Field(
        None,
        ge=16 * 16,
        description="Largest width x height this worker generates: the memory check assumes it, and the "
        "gateway refuses larger jobs for its model. Unset: 512x512 for a pipeline on the CPU (a bigger one "
        "takes minutes a step), else no cap (the API's 2048x2048), and the check assumes the model's default size.",
    )
    worker_id: str = Field(default_factory=_default_worker_id, description="Consumer name in the Redis group.")
    max_batch: int = Field(4, ge=1, description="Most requests coalesced into one pipeline call.")
    batch_window_ms: float = Field(10.0, ge=0, description="How long the batcher waits for compatible requests.")
    max_inflight_jobs: int = Field(
        256,
        ge=1,
        description="Most jobs one worker runs at once: a ceiling (memory, fairness); under it the worker "
        "claims the jobs its measured stage times say keep the generator busy (docs/performance.md).",
    )
    heartbeat_s: float = Field(2.0, gt=0, description="Worker heartbeat period.")
    visibility_timeout_s: float = Field(
        60.0, gt=0, description="A claimed job whose worker stopped heartbeating is re-claimed after this."
    )
    max_attempts: int = Field(3, ge=1, description="Claims of one job before it is dead-lettered.")
    drain_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long running jobs may finish before they are released."
    )
    preview_every_steps: int = Field(
        2, ge=1, description="A job with `previews` gets a live preview every this many denoising steps."
    )
    progress_interval_s: float = Field(0.25, ge=0, description="Least time between two progress events of a job.")
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the worker's /metrics and /livez (its liveness probe); 0: off."
    )
    worker_metrics_host: str = Field(
        "127.0.0.1",
        description="Address that port listens on: this host only by default; `0.0.0.0` where a scraper or a "
        "probe reaches it from outside (the compose files and the Kubernetes manifests set that).",
    )
    critic_outage_s: float = Field(
        300.0,
        ge=0,
        description="How long a round's critique waits, asking again with backoff, for a critic that is "
        "unreachable or timing out (a vLLM restart takes minutes) before the job ends with what it has.",
    )
    critic_wait_before_load: bool = Field(
        False,
        description="Load the model only once the critic answers: on a GPU shared with vLLM, vLLM must finish "
        "profiling first (after a host reboot both start at once; vllm-project/vllm#55827).",
    )
    worker_stall_s: float = Field(
        600.0, gt=0, description="A generator call with no denoising step for this long fails /livez."
    )

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhooks_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        value = secret.get_secret_value()
        try:
            key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
        except ValueError:
            key = b""
        if not value.startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError(
                "not a Standard Webhooks secret: whsec_ then base64 of 24-64 random bytes; make one with: python -c "
                "\"import base64,secrets; print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
            )
        return secret


class Settings(GatewaySettings, WorkerSettings):
    """Every role at once: `gcr up --dev` runs the gateway and a worker in one process,
    and so do the tests."""
