"""The wire contract shared by the gateway, the worker and the CLI.

HTTP bodies, the job document, rounds, critiques and events all live here: what clients
send and see. What clients send forbids unknown fields. The service stores a job as a
record that extends the document (`service.jobs.records`); the document tolerates unknown
top-level fields, but its `spec` is the client's request and stays strict: add spec
fields with defaults, and roll out gateways before relying on them.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    model_serializer,
)

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
# A model name as requests, workers and stream keys carry it: no whitespace, no glob characters.
MODEL_NAME = r"^[^\s\x00-\x1f\x7f*?\[\]]{1,200}$"
MODES: tuple[str, ...] = ("t2i", "edit")

Mode = Literal["t2i", "edit"]
Priority = Literal["high", "normal", "low"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "expired"})
StopReason = Literal[
    "accepted", "max_rounds", "no_improvement", "deadline", "cancelled", "no_refinement", "failed", "unclaimed"
]
Stage = Literal["queued", "generating", "critiquing", "refining"]
Strategy = Literal["rewrite", "edit", "auto"]
STRATEGIES: tuple[str, ...] = ("rewrite", "edit", "auto")
Action = Literal["generate", "edit"]
WebhookEventName = Literal["start", "round", "completed"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEventName, ...] = ("completed",)

# Dimension keys of a critique. t2i has the first three (text_rendering may be N/A);
# edit adds image_faithfulness.
TEXT_FAITHFULNESS = "text_faithfulness"
IMAGE_FAITHFULNESS = "image_faithfulness"
PHYSICAL_QUALITY = "physical_quality"
TEXT_RENDERING = "text_rendering"
DIMENSIONS: tuple[str, ...] = (TEXT_FAITHFULNESS, IMAGE_FAITHFULNESS, PHYSICAL_QUALITY, TEXT_RENDERING)

SCORE_MIN = 1.0
SCORE_MAX = 4.0
SCORE_DECIMALS = 4


def _rounded(value: float) -> float:
    return round(value, SCORE_DECIMALS)


Score = Annotated[float, PlainSerializer(_rounded, return_type=float, when_used="json")]
"""A score as JSON carries it: 4 decimals (0.42, not 0.41999999999999993). The mean that
makes an overall is computed in full; only what is written out is rounded."""
MAX_SEED = 2**32 - 1


def source_image_problem(mode: str, has_source: bool) -> str | None:
    """Why a source image does not fit the mode (an edit needs one, text-to-image takes none);
    None when it does. The one rule, for jobs and critiques alike."""
    if mode == "edit" and not has_source:
        return "mode `edit` needs a source_image"
    if mode == "t2i" and has_source:
        return "mode `t2i` takes no source_image; use mode `edit` to edit an image"
    return None


def known_dimensions(scores: dict[str, float]) -> dict[str, float]:
    """Validator: every key is a dimension name."""
    unknown = sorted(set(scores) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"unknown dimension(s) {unknown}; known: {list(DIMENSIONS)}")
    return scores


class ClientBody(BaseModel):
    """Base of everything a client sends: unknown fields are an error, not ignored, and types
    are strict: a boolean is not a number, "3" is not 3 and "yes" is not true (a client that
    sends them has a bug we should not guess around); no NaN or infinity either."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def blank(text: str) -> bool:
    """No visible character: only spaces, and the invisible ones (zero-width spaces and
    joiners, byte-order marks, control characters) that `str.strip` leaves."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc", "Zs") for ch in text)


def _visible(value: str) -> str:
    if blank(value):
        raise ValueError("is blank (no visible character)")
    return value


class GenerationParams(ClientBody):
    """How each image is generated. `None` means the loaded model's own default; once a
    worker starts the job, the stored spec shows every value it used."""

    width: Annotated[int, Field(ge=16, le=2048, multiple_of=16)] | None = None
    height: Annotated[int, Field(ge=16, le=2048, multiple_of=16)] | None = None
    steps: Annotated[int, Field(ge=1, le=200)] | None = None
    guidance_scale: Annotated[float, Field(ge=0, le=50)] | None = None
    true_cfg_scale: Annotated[float, Field(ge=0, le=50)] | None = Field(
        None, description="Qwen-Image's real CFG; needs a negative prompt (a space is enough)."
    )
    negative_prompt: Annotated[str, Field(max_length=4000)] | None = None
    max_sequence_length: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        None, description="Text tokens of FLUX's T5 encoder (FLUX.1-schnell: at most 256)."
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="Base seed of the job; drawn at submit time when absent and echoed in the job."
    )


class LoopParams(ClientBody):
    """When to stop, and how to refine. Defaults are explained in docs/loop.md."""

    max_rounds: int = Field(3, ge=1, le=20, description="Generate-critique rounds at most.")
    threshold: float = Field(0.75, ge=0, le=1, description="Accept when the overall score (0-1) reaches this.")
    min_scores: Annotated[
        dict[str, Annotated[float, Field(ge=SCORE_MIN, le=SCORE_MAX)]], AfterValidator(known_dimensions)
    ] = Field(default_factory=dict, description="Per-dimension minimum (1-4 scale) also required for acceptance.")
    candidates_per_round: int = Field(1, ge=1, le=8, description="Images per round, distinct seeds, all critiqued.")
    patience: int | None = Field(
        2, ge=1, le=20, description="Stop after this many rounds without a better best; null: never."
    )
    deadline_s: float | None = Field(None, gt=0, le=86_400, description="Wall-clock budget of the job's rounds.")
    seed_policy: Literal["fixed", "vary"] = Field("fixed", description="`fixed`: same seeds every round.")
    refine_from: Literal["latest", "best"] = Field("latest", description="Whose refined request drives the next round.")
    history: bool = Field(False, description="Append earlier refinement comments to the next prompt.")
    strategy: Strategy = Field(
        "rewrite",
        description="How later rounds refine (docs/loop.md): `rewrite` regenerates from the refined request; "
        "`edit` edits the best image so far on the edit model, instructed by the critique; `auto` chooses "
        "per round: edit when the best so far scores at least `edit_above`, else rewrite.",
    )
    edit_model: str | None = Field(
        None,
        pattern=MODEL_NAME,
        description="The model `edit` rounds run on; default: the fleet's default edit model (the job's own "
        "model for an edit job). The stored job shows the one it was routed to.",
    )
    edit_above: float = Field(
        0.5, ge=0, le=1, description="`auto` edits when the best overall so far is at least this, else rewrites."
    )


class GenerateRequest(ClientBody):
    """Body of `POST /generate`."""

    prompt: Annotated[str, AfterValidator(_visible)] = Field(
        min_length=1, description="The instruction; every round is judged against it."
    )
    mode: Mode = "t2i"
    model: str | None = Field(
        None,
        pattern=MODEL_NAME,
        description="The generator model (GET /v1/models lists the served ones); default: the fleet's "
        "default for the mode. The stored job shows the model it was routed to.",
    )
    source_image: str | None = Field(
        None, description="Edit mode: the source image, base64 (or a data: URI) of a PNG, JPEG or WebP."
    )
    generation: GenerationParams = Field(default_factory=GenerationParams)
    loop: LoopParams = Field(default_factory=LoopParams)
    priority: Priority = "normal"
    previews: bool = Field(
        False, description="Send low-resolution `preview` events of the latents while denoising (the studio does)."
    )
    callback_url: Annotated[str, Field(max_length=2000, pattern=r"^https?://")] | None = Field(
        None, description="POSTed a signed JSON summary when the job ends (public http(s) URLs only)."
    )
    webhook_events_filter: Annotated[list[WebhookEventName], Field(min_length=1, max_length=3)] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS),
        description="Which events POST to callback_url (Replicate's filter): `start`, `round` (each finished "
        "round), `completed` (the job ended). Default: completed only.",
    )


class CritiqueRequest(ClientBody):
    """Body of `POST /critique`: judge one client-supplied image."""

    instruction: Annotated[str, AfterValidator(_visible)] = Field(min_length=1)
    image: str = Field(description="The image to judge, base64 or a data: URI.")
    source_image: str | None = Field(None, description="Edit mode: the source image.")
    mode: Mode | None = Field(None, description="Default: `edit` when a source image is given, else `t2i`.")


# --- What the critic returns -----------------------------------------------------


class DimensionScore(BaseModel):
    """One judged dimension. `score` is None when the critic answered N/A."""

    score: Score | None
    justification: str = ""
    clamped: bool = Field(False, description="The written score was outside [1,4] and was clamped.")


class Critique(BaseModel):
    """A structured critique from the reward model."""

    dimensions: dict[str, DimensionScore]
    overall: Score = Field(ge=0, le=1, description="Mean of the non-null scores mapped by (mean - 1) / 3.")
    analysis: str = ""
    summary: str = ""
    refinement_comments: str = ""
    refined_request: str | None = None
    raw: str = ""
    model: str = ""
    latency_ms: float = 0.0
    usage: dict[str, int] | None = None
    reasked: bool = Field(
        False, description="The first answer could not be read; this one answers the (constrained) re-ask."
    )

    def score(self, dimension: str) -> float | None:
        entry = self.dimensions.get(dimension)
        return entry.score if entry else None


def clamp_score(value: float) -> float:
    return min(SCORE_MAX, max(SCORE_MIN, value))


def overall_score(scores: list[float | None]) -> float:
    """The paper's normalisation: clamp to [1,4], mean of the non-null, map to [0,1]."""
    present = [clamp_score(s) for s in scores if s is not None]
    if not present:
        raise ValueError("no dimension score to average")
    return (sum(present) / len(present) - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)


# --- The job document --------------------------------------------------------------


class JobError(BaseModel):
    """A job's failure, stored as data."""

    code: str
    message: str
    retryable: bool = False


class Candidate(BaseModel):
    index: int
    seed: int
    image_url: str | None = Field(None, description="Absolute link to its PNG; null when it made no image.")
    overall: Score | None = None
    critique: Critique | None = None
    error: JobError | None = None


class RoundTimings(BaseModel):
    queue_wait_ms: float = 0.0
    generate_ms: float = 0.0
    critique_ms: float = 0.0


class ImageRef(BaseModel):
    """One candidate's image of an earlier round."""

    round: int
    candidate: int


class TokenUsage(BaseModel):
    """Tokens the reward model read and wrote (vLLM's `usage`), summed over critiques."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
        )

    @classmethod
    def of(cls, usage: dict[str, int] | None) -> TokenUsage:
        """From an OpenAI-style `usage` block (missing counts are 0)."""
        usage = usage or {}
        prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=int(usage.get("total_tokens", prompt + completion)),
        )


class PromptFit(BaseModel):
    """How much of a round's text the generator's text encoder reads, measured with the
    pipeline's own tokenizer (the one that reads the most: T5 in FLUX, CLIP in SD)."""

    encoder: str = Field(description="The tokenizer's class, e.g. `T5TokenizerFast`, `CLIPTokenizer`.")
    limit: int = Field(description="Tokens the encoder reads, special tokens included.")
    tokens: int = Field(description="Tokens of the text the round was asked to generate from.")
    cut: bool = Field(
        False, description="The text was longer than the encoder reads: the round's `prompt` is the part it read."
    )
    dropped: str | None = Field(None, description="The words left out when `cut`.")


class Round(BaseModel):
    """One finished round: written to Redis before the next round starts."""

    index: int
    prompt: str = Field(
        description="The text the generator received: a prompt, or an edit's instruction (when `prompt_fit.cut`, "
        "the part of the refinement its text encoder reads)."
    )
    prompt_fit: PromptFit | None = Field(
        None, description="How much of the text the generator's encoder reads; null for generators without one."
    )
    action: Action = Field("generate", description="`generate` from text, or `edit` an image.")
    model: str | None = Field(None, description="The model the round ran on.")
    edited_from: ImageRef | None = Field(
        None, description="The image an `edit` round edited; null when it edited the job's source image."
    )
    reason: str | None = Field(None, description="Why the round took its action (the strategy's rule).")
    candidates: list[Candidate]
    chosen: int | None = Field(
        None, description="Index of the round's best candidate; null when no candidate could be judged."
    )
    overall: Score | None = None
    delta: Score | None = Field(None, description="This round's overall minus the best before it.")
    timings: RoundTimings = Field(default_factory=RoundTimings)
    critic_usage: TokenUsage | None = Field(
        None, description="Tokens the reward model read and wrote for this round's critiques, failed ones included."
    )
    started_at: float
    finished_at: float


class BestCandidate(BaseModel):
    round: int
    candidate: int
    overall: Score
    prompt: str
    image_url: str | None = None


class WebhookStatus(BaseModel):
    state: Literal["pending", "delivered", "failed"]
    attempts: int = 0
    last_error: str | None = None
    delivered_at: float | None = None


class JobSummary(BaseModel):
    rounds_used: int
    generator_calls: int
    critic_calls: int
    first_round_overall: Score | None = None
    best_overall: Score | None = None
    gain: Score | None = Field(None, description="Best overall minus round 1's overall.")
    critic_usage: TokenUsage | None = Field(None, description="The rounds' critic tokens, summed.")


class JobDocument(BaseModel):
    """Everything known about a job: what `GET /jobs/{id}` returns."""

    id: str
    status: JobStatus
    spec: GenerateRequest
    stage: Stage | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    rounds: list[Round] = Field(default_factory=list)
    best: BestCandidate | None = None
    stop_reason: StopReason | None = None
    error: JobError | None = None
    summary: JobSummary | None = None
    webhook: WebhookStatus | None = None
    attempts: int = 0
    worker: str | None = None
    critic_model: str | None = None
    generator_model: str | None = None
    cancel_requested: bool = False
    queue_position: int | None = Field(None, description="0-based position among queued jobs, while queued.")
    links: dict[str, str] = Field(default_factory=dict)


class JobList(BaseModel):
    jobs: list[JobDocument]


class SubmitResponse(BaseModel):
    id: str
    status: JobStatus
    links: dict[str, str]


class ErrorBody(BaseModel):
    """Every error answer of the API has this shape."""

    code: str
    message: str
    field: str | None = None
    retryable: bool = False
    choices: list[str] | None = Field(
        None, description="Only on `unknown_model`: the names that would be accepted (the served models)."
    )
    request_id: str | None = Field(
        None, description="Only on internal errors: the id the gateway's log has the failure under."
    )

    @model_serializer(mode="wrap")
    def _omit_absent_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """`choices` and `request_id` appear only where an error has them; every other field always does."""
        data: dict[str, Any] = handler(self)
        for name in ("choices", "request_id"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class ErrorResponse(BaseModel):
    error: ErrorBody


class OpenAIErrorBody(BaseModel):
    """OpenAI's error object, as /v1 answers it (gcr's `retryable` and extras beside it)."""

    message: str
    type: str = Field(description="`invalid_request_error`, `authentication_error`, `rate_limit_error`, ...")
    param: str | None = None
    code: str | None = None
    retryable: bool = False


class OpenAIErrorResponse(BaseModel):
    """Every error answer on /v1 has this shape."""

    error: OpenAIErrorBody


# --- Events -------------------------------------------------------------------------

EventType = Literal["status", "stage", "progress", "preview", "round", "error", "end"]


class JobEvent(BaseModel):
    """One event of a job's stream; SSE sends `type` as the event name and this as data.

    Every event has this shape, `end` and `error` included: `end` (the stream's last)
    carries `status` (and `stop_reason`); `error` (the stream could not go on) carries
    `code` and `message` and is followed by `end`."""

    type: EventType
    job_id: str
    at: float
    data: dict[str, Any] = Field(default_factory=dict)
