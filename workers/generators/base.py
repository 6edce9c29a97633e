"""The generator protocol: a batch of requests in, one image per request out.

Backends run in the worker's single GPU executor thread (blocking calls, never on
the event loop). The scheduler groups requests whose `batch_key` is equal into one
call of at most `max_batch` requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gcr.types import PromptFit
from service.errors import GeneratorError

if TYPE_CHECKING:
    from PIL import Image

Mode = str  # "t2i" | "edit"; kept as str so this module imports nothing from the gateway

# Extra pipeline kwargs a client or operator may pass through; anything else is refused.
ALLOWED_EXTRA_KWARGS: frozenset[str] = frozenset({"max_sequence_length", "clip_skip", "eta"})

PreviewSink = Callable[[int, int, str], None]
"""Called from the executor thread with (step, total, a JPEG data URI) of one request's latents."""

StepCallback = Callable[[int, int], None]
"""Called from the executor thread after each denoising step with (step, total)."""

InterruptCheck = Callable[[], bool]
"""Polled from the executor thread; True stops the running call at the next step, and
`generate` then raises `GenerationInterrupted`."""


@dataclass(frozen=True)
class StepHooks:
    """What one `generate` call reports its steps to and polls for a stop."""

    on_step: StepCallback | None = None
    interrupt: InterruptCheck | None = None

    def step(self, step: int, total: int) -> None:
        if self.on_step is not None:
            self.on_step(step, total)

    def interrupted(self) -> bool:
        return self.interrupt is not None and self.interrupt()


NO_HOOKS = StepHooks()


@dataclass(frozen=True)
class GenRequest:
    """One image to make. Unset fields (None) take the backend's defaults."""

    prompt: str
    seed: int
    mode: Mode = "t2i"
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    source_image: Image.Image | None = field(default=None, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict)
    preview: PreviewSink | None = field(default=None, compare=False)
    """Where live previews of this request's latents go, if anywhere (backends without latents ignore it)."""

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys may share one pipeline call."""
        source_size = self.source_image.size if self.source_image is not None else None
        return (
            self.mode,
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.true_cfg_scale,
            self.negative_prompt is not None,
            source_size,
            tuple(sorted(self.extra.items())),
        )


class Generator(Protocol):
    """What the worker needs from a backend."""

    name: str
    """Model id or path, shown in /readyz and recorded on jobs."""

    modes: frozenset[str]
    """`t2i`, `edit`, or both."""

    max_batch: int
    """Most requests one `generate` call accepts; 1 for pipelines that cannot batch."""

    runtime: dict[str, Any]
    """Where it runs, for heartbeats: device, dtype, torch and CUDA versions."""

    def resolve(self, request: GenRequest) -> GenRequest:
        """Fill the backend's defaults (size, steps, guidance), so that batch keys compare resolved values."""
        ...

    def generate(self, requests: Sequence[GenRequest], hooks: StepHooks = NO_HOOKS) -> list[Image.Image]:
        """Blocking: make one image per request, in order. Raises `GeneratorError`
        (`GeneratorOutOfMemory` on CUDA OOM, `GenerationInterrupted` when `hooks.interrupt` stopped it)."""
        ...

    def fit_prompt(self, request: GenRequest) -> tuple[str, PromptFit] | None:
        """The request's prompt as the backend's text encoder reads it, and how it fits
        (`workers.generators.prompt_fit`); None for a backend that reads any length."""
        ...


def resolve_batch(generator: Generator, requests: Sequence[GenRequest]) -> list[GenRequest]:
    """The checks every backend's `generate` starts with: within `max_batch`, defaults filled."""
    if len(requests) > generator.max_batch:
        raise GeneratorError(f"{len(requests)} requests exceed this generator's batch of {generator.max_batch}")
    return [generator.resolve(r) for r in requests]
