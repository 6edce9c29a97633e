"""`SimulatedGenerator`: a timed stand-in for the GPU, for benchmarks and fast tests.

`GCR_GENERATOR=sim:SECONDS[:PER_IMAGE]` makes each call take
`SECONDS + PER_IMAGE * (batch - 1)` of wall time, slept rather than computed: it
models time spent on the GPU, which costs the worker's CPU nothing, so a benchmark
of the orchestration is not disturbed by it. The images are deterministic: a
background colour from a hash of (prompt, seed) with the prompt's words and the seed
written on it, so a test can see what was asked for. No torch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from service.errors import GenerationInterrupted, GeneratorError
from workers.generators.base import (
    ALLOWED_EXTRA_KWARGS,
    NO_HOOKS,
    GenRequest,
    StepHooks,
    resolve_batch,
)
from workers.generators.sizing import edit_size

if TYPE_CHECKING:
    from gcr.types import PromptFit
    from service.settings import WorkerSettings

PREFIX = "sim:"
DEFAULT_SIZE = 64
DEFAULT_STEPS = 4


def parse_spec(spec: str) -> tuple[float, float]:
    """`sim:SECONDS[:PER_IMAGE]` → (seconds per call, extra seconds per image beyond the first)."""
    parts = spec.removeprefix(PREFIX).split(":")
    try:
        if not 1 <= len(parts) <= 2:
            raise ValueError("expected sim:SECONDS or sim:SECONDS:PER_IMAGE")
        values = [float(p) for p in parts]
        if any(v < 0 or v != v for v in values):
            raise ValueError("times must be numbers >= 0")
    except ValueError as exc:
        raise GeneratorError(f"bad simulated generator {spec!r}: {exc}") from exc
    return values[0], values[1] if len(values) == 2 else 0.0


class SimulatedGenerator:
    """Sleeps like a GPU and draws the prompt: the `Generator` protocol without a model."""

    modes = frozenset({"t2i", "edit"})

    def __init__(self, spec: str, settings: WorkerSettings) -> None:
        self.seconds, self.per_image = parse_spec(spec)
        self.name = spec
        self.max_batch = settings.max_batch
        self.runtime: dict[str, Any] = {"device": "none (simulated generator)"}
        self._edit_max_edge = settings.edit_max_edge

    def fit_prompt(self, request: GenRequest) -> tuple[str, PromptFit] | None:
        """It draws any prompt whole: no text encoder, no limit."""
        return None

    def resolve(self, request: GenRequest) -> GenRequest:
        """Fill the size (64x64 for t2i, the source's for edits, as the real backend) and steps."""
        if request.mode not in self.modes:
            raise GeneratorError(f"{self.name} does not do {request.mode!r}")
        unknown = set(request.extra) - ALLOWED_EXTRA_KWARGS
        if unknown:
            raise GeneratorError(f"extra pipeline arguments not allowed: {sorted(unknown)}")
        if request.mode == "edit":
            if request.source_image is None:
                raise GeneratorError("an edit request needs a source image")
            width, height = edit_size(request.source_image.size, self._edit_max_edge, request.width, request.height)
        else:
            width, height = request.width or DEFAULT_SIZE, request.height or DEFAULT_SIZE
        return dataclasses.replace(request, width=width, height=height, steps=request.steps or DEFAULT_STEPS)

    def generate(self, requests: Sequence[GenRequest], hooks: StepHooks = NO_HOOKS) -> list[Image.Image]:
        """Sleep the call's simulated time in steps, then draw one image per request."""
        if not requests:
            return []
        resolved = resolve_batch(self, requests)
        steps = resolved[0].steps or DEFAULT_STEPS
        step_s = (self.seconds + self.per_image * (len(resolved) - 1)) / steps
        for step in range(1, steps + 1):
            if hooks.interrupted():
                raise GenerationInterrupted(f"interrupted after step {step - 1} of {steps}")
            time.sleep(step_s)
            hooks.step(step, steps)
        return [render(r) for r in resolved]


def render(request: GenRequest) -> Image.Image:
    """The deterministic picture of a (resolved) request."""
    width, height = request.width or DEFAULT_SIZE, request.height or DEFAULT_SIZE
    digest = hashlib.sha256(f"{request.prompt}\0{request.seed}".encode()).digest()
    background = (digest[0], digest[1], digest[2])
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    ink = (0, 0, 0) if luminance > 128 else (255, 255, 255)
    # The default bitmap font is about 6 px per character and 11 px per line.
    columns = max(4, width // 6)
    lines = [*textwrap.wrap(request.prompt, columns), f"seed {request.seed}"]
    draw.multiline_text((2, 2), "\n".join(lines), fill=ink, spacing=1)
    return image
