"""OpenAI's images API over a gcr job: request shapes in, answers and stream events out.

The routes (`service/gateway/routers/openai_compat.py`) do the I/O; this module turns OpenAI's
request into a `GenerateRequest` and a finished (or finishing) job into OpenAI's answer.

Requests take OpenAI's fields, vLLM-Omni's diffusion extras (`seed`,
`num_inference_steps`, `guidance_scale`, `negative_prompt`, which the `openai` package
sends through `extra_body`) and gcr's own extra `gcr` ({loop, generation, priority}).

Streaming (`stream=true`, `partial_images` N in 0..3) sends one `partial_image` event
per finished round, carrying that round's chosen image, at most N of them, then
`completed` with the best image of all rounds. Which rounds, when the number of rounds
is not known in advance (the loop may stop early: accepted, no improvement, deadline):

- a round is sent the moment it finishes when it is among the last N rounds the job
  can run (its index >= max_rounds - N): no later round can need its slot;
- earlier rounds are held back, since a later round may take the slot;
- if the job ends before any round of that window was sent, the last N rounds it ran
  are sent, oldest first, just before `completed`.

So a client gets at most N partial images, always the most recent rounds, always in
round order, each as early as that can be known. Every event also carries `gcr`: the
round, its score, the job id.
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gcr.types import GenerateRequest, JobDocument, TokenUsage
from service.errors import InvalidInput
from service.gateway.bodies import validation_error

ResponseFormat = Literal["b64_json", "url"]
OutputFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# vLLM-Omni's names for the generation settings gcr keeps in `gcr.generation`.
OMNI_EXTRAS: dict[str, str] = {
    "seed": "seed",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale",
    "negative_prompt": "negative_prompt",
}


class GcrOptions(BaseModel):
    """gcr's own settings, in the request's extra field `gcr`."""

    model_config = ConfigDict(extra="forbid")
    loop: dict[str, Any] = Field(default_factory=dict)
    generation: dict[str, Any] = Field(default_factory=dict)
    priority: Literal["high", "normal", "low"] = "normal"


class ImageGenerationRequest(BaseModel):
    """OpenAI's `POST /images/generations` body (fields gcr has no use for are ignored); strict
    types as in gcr's own bodies (`gcr.types.ClientBody`): `stream: "yes"` is not true."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=8)
    size: str | None = Field(None, description="WIDTHxHEIGHT (multiples of 16), or `auto`.")
    response_format: ResponseFormat = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0-100.")
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3, description="Rounds streamed as `partial_image` events.")
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    gcr: GcrOptions = Field(default_factory=GcrOptions)


def _size(size: str | None) -> dict[str, int]:
    if size is None or size == "auto":
        return {}
    # ASCII digits only: `str.isdigit` also takes '²', which `int` then refuses.
    match = _SIZE.match(size.strip().lower())
    if match is None:
        raise InvalidInput(f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024) or auto", field="size")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def _generation(body: ImageGenerationRequest) -> dict[str, Any]:
    generation = dict(body.gcr.generation)
    for extra, name in OMNI_EXTRAS.items():
        value = getattr(body, extra)
        if value is None:
            continue
        if name in generation and generation[name] != value:
            raise InvalidInput(f"{extra} and gcr.generation.{name} disagree; send one of them", field=extra)
        generation[name] = value
    for name, value in _size(body.size).items():
        if name in generation and generation[name] != value:
            raise InvalidInput(f"size and gcr.generation.{name} disagree; send one of them", field="size")
        generation[name] = value
    return generation


def job_request(body: ImageGenerationRequest, mode: str) -> GenerateRequest:
    """The gcr job an OpenAI request asks for (validated like `POST /generate`'s body)."""
    if body.stream and body.n > 1:
        raise InvalidInput("stream with n > 1 is not supported: stream one image, or drop stream", field="n")
    if body.response_format == "url" and body.output_format != "png":
        raise InvalidInput(
            "response_format url links the stored PNG; use b64_json for jpeg or webp", field="output_format"
        )
    loop = dict(body.gcr.loop)
    asked = loop.get("candidates_per_round")
    if isinstance(asked, int) and not isinstance(asked, bool):
        loop["candidates_per_round"] = max(asked, body.n)
    elif "candidates_per_round" not in loop and body.n > 1:
        loop["candidates_per_round"] = body.n
    # Anything else (null, a string) is left for the model's validation to name.
    spec = {
        "prompt": body.prompt,
        "mode": mode,
        "model": body.model,
        "generation": _generation(body),
        "loop": loop,
        "priority": body.gcr.priority,
    }
    try:
        return GenerateRequest.model_validate(spec)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def encode(png: bytes, output_format: OutputFormat, compression: int | None) -> bytes:
    """The stored PNG in the format asked for (`compression`: jpeg/webp quality, default 100)."""
    if output_format == "png":
        return png
    from PIL import Image  # the gateway image has Pillow (uploads are checked with it)

    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        quality = 100 if compression is None else compression
        image.convert("RGB").save(out, format=output_format.upper(), quality=quality)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def usage(doc: JobDocument) -> dict[str, Any]:
    """OpenAI's `usage`, counted as the tokens the reward model read and wrote over all of the
    job's critiques, failed ones included (a diffusion generator spends no tokens). The critic
    reports no split of its input between text and image, so `input_tokens_details.text_tokens`
    holds it all."""
    spent = sum((r.critic_usage or TokenUsage() for r in doc.rounds), TokenUsage())
    read, wrote = spent.prompt_tokens, spent.completion_tokens
    return {
        "input_tokens": read,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": read},
        "output_tokens": wrote,
        "total_tokens": read + wrote,
    }


def size_of(doc: JobDocument) -> str:
    g = doc.spec.generation
    return f"{g.width}x{g.height}" if g.width and g.height else "auto"


class PartialPlan:
    """Which finished rounds become `partial_image` events (the rule in this module's docstring)."""

    def __init__(self, partial_images: int, max_rounds: int) -> None:
        self.n = partial_images
        self.window_start = max_rounds - partial_images
        self.sent = 0
        self.held: list[int] = []

    def on_round(self, index: int) -> list[int]:
        """The rounds to send now that round `index` finished."""
        if self.n == 0:
            return []
        if index >= self.window_start and self.sent < self.n:
            self.sent += 1
            return [index]
        self.held = [*self.held, index][-self.n :]
        return []

    def at_end(self) -> list[int]:
        """The held rounds to send before `completed` (only if none was sent live)."""
        if self.sent:
            return []
        self.sent = len(self.held)
        return self.held


def stream_event(
    kind: Literal["partial_image", "completed"],
    mode: str,
    image: bytes,
    body: ImageGenerationRequest,
    size: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One event in OpenAI's shape (`image_generation.*`, or `image_edit.*` for edits)."""
    prefix = "image_edit" if mode == "edit" else "image_generation"
    return {
        "type": f"{prefix}.{kind}",
        "b64_json": b64(image),
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": body.output_format,
        "quality": "auto",
        "size": size,
        **extra,
    }
