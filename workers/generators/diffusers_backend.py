"""`DiffusersGenerator`: the `Generator` protocol over one diffusers pipeline.

Decisions, in one place:

- One pipeline call per batch: a list of prompts and one seeded CPU `torch.Generator`
  per image. CPU generators draw the same noise on every device, so an image
  depends on its seed alone, never on which batch it shared.
- Modes: a pipeline whose `__call__` takes `image` edits (`{"edit"}`), any other
  makes images from text (`{"t2i"}`).
- Defaults filled by `resolve` (so batch keys compare real values), each from the
  first that sets it: the request; the folder's `gcr_defaults.json` (the tiny test
  pipelines use it); the per-model table (`model_defaults`: FLUX.1-schnell gets 4
  steps, guidance 0, 256 text tokens); then the pipeline itself. There, t2i size =
  the pipeline's native size (`default_sample_size` or the UNet's `sample_size`, times
  the VAE scale); edit size = the source's, long edge ≤ `edit_max_edge`, sides
  rounded down to 16 (upstream RationalRewards); steps = 40 for Qwen-Image
  (upstream RationalRewards), 28 for Flux (BFL's default), 30 otherwise;
  `guidance_scale` / `true_cfg_scale` = the pipeline's signature defaults.
- Real CFG (`true_cfg_scale`, Qwen-Image and Flux) only runs when a negative prompt is
  given, so a request with `true_cfg_scale > 1` and none gets a single space.
- `QwenImageEditPlusPipeline` refuses more than one prompt per call (diffusers ≥ 0.37),
  so that backend's `max_batch` is 1.
- `FluxKontextPipeline` rescales its output to `max_area` (1 megapixel by default)
  whatever height/width it is given, and snaps the SOURCE image to the nearest of its
  preferred training resolutions (`_auto_resize`). We pass `max_area = width*height` so
  the output keeps the resolved size, and leave `_auto_resize` on for real models (BFL's
  recommendation); the tiny test folder switches it off via `gcr_defaults.json`.
- Interrupt: the step callback sets `pipe._interrupt` (diffusers pipelines then skip
  the remaining steps, still decode, and free their offload hooks); a pipeline without
  that property is stopped by an exception raised from the callback. Either way the
  call raises `GenerationInterrupted` and returns no images.
- Errors: CUDA OOM → `GeneratorOutOfMemory` (the caller may split the batch), any
  other exception from the pipeline → `GeneratorError` with a one-line reason. An OOM
  in the VAE decode, after the last denoising step, is not one: the denoised latents
  are decoded again one image at a time (`decoding`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from service.errors import GcrError, GenerationInterrupted, GeneratorError, GeneratorOutOfMemory
from workers.generators.base import (
    ALLOWED_EXTRA_KWARGS,
    NO_HOOKS,
    GenRequest,
    StepHooks,
    resolve_batch,
)
from workers.generators.decoding import can_decode, decode_one_by_one, prepare_vae
from workers.generators.loading import FolderDefaults, load_pipeline, one_line, runtime_info, takes_image
from workers.generators.model_defaults import ModelDefaults, lookup
from workers.generators.previews import preview_data_uri
from workers.generators.prompt_fit import ReadingEncoder, fit_prompt, reading_encoder
from workers.generators.sizing import edit_size

if TYPE_CHECKING:
    from PIL import Image

    from gcr.types import PromptFit
    from service.settings import WorkerSettings

log = logging.getLogger(__name__)

# Pipelines that accept only one prompt per call.
SINGLE_PROMPT_PIPELINES: frozenset[str] = frozenset({"QwenImageEditPlusPipeline"})

NEGATIVE_PROMPT_FOR_TRUE_CFG = " "


def default_steps(pipeline_class: str) -> int:
    """Denoising steps when neither the request nor the model folder says."""
    if pipeline_class.startswith("QwenImage"):
        return 40
    if pipeline_class.startswith("Flux"):
        return 28
    return 30


class _StopRequested(Exception):
    """Raised from the step callback to stop a pipeline that has no `interrupt` property."""


class DiffusersGenerator:
    """Any diffusers text-to-image or edit pipeline behind the `Generator` protocol.

    `pipeline` injects an already built pipeline object instead of loading `model`;
    it exists so the model-specific rules can be tested with a stand-in object whose
    class name and `__call__` signature mimic the real pipeline's.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        model: str | None = None,
        *,
        name: str | None = None,
        pipeline: Any | None = None,
        defaults: FolderDefaults | None = None,
        model_defaults: ModelDefaults | None = None,
    ) -> None:
        model = model or settings.generator
        if pipeline is None:
            if not model:
                raise GeneratorError("no model given to the diffusers backend")
            defaults = defaults or FolderDefaults.read(model)
            pipeline = load_pipeline(settings, model)
        self._pipe = pipeline
        self._defaults = defaults or FolderDefaults()
        if model_defaults is None and model:
            model_defaults = lookup(self._defaults.defaults_of or model)
        self._known = model_defaults or ModelDefaults(model="")
        self._class = type(pipeline).__name__
        self._params = inspect.signature(type(pipeline).__call__).parameters
        self._fit_encoders: dict[int | None, ReadingEncoder | None] = {}
        """`fit_prompt`'s encoder per sequence length, made once."""
        self._edit_max_edge = min(settings.edit_max_edge, self._defaults.max_edge or settings.edit_max_edge)
        self.name = name or model or self._class
        self.modes = frozenset({"edit"}) if takes_image(type(pipeline)) else frozenset({"t2i"})
        self.max_batch = 1 if self._class in SINGLE_PROMPT_PIPELINES else settings.max_batch
        self.runtime = runtime_info(pipeline)
        self._preview_every = settings.preview_every_steps

    @property
    def pipeline(self) -> Any:
        """The underlying diffusers pipeline (read-only: benchmarks and tests inspect it)."""
        return self._pipe

    # --- defaults -------------------------------------------------------------------

    def resolve(self, request: GenRequest) -> GenRequest:
        """Fill size, steps, guidance and the negative prompt; refuse what this model cannot do."""
        if request.mode not in self.modes:
            raise GeneratorError(f"{self.name} does not do {request.mode!r} (it does {sorted(self.modes)})")
        unknown = set(request.extra) - ALLOWED_EXTRA_KWARGS
        if unknown:
            raise GeneratorError(f"extra pipeline arguments not allowed: {sorted(unknown)}")
        # Allowed extras this pipeline has no parameter for mean nothing to it; dropping
        # them keeps them out of the batch key.
        extra = {k: v for k, v in request.extra.items() if k in self._params}

        if request.mode == "edit":
            if request.source_image is None:
                raise GeneratorError("an edit request needs a source image")
            width, height = edit_size(request.source_image.size, self._edit_max_edge, request.width, request.height)
        else:
            native = self._native_size()
            width = request.width or self._defaults.width or self._known.width or native
            height = request.height or self._defaults.height or self._known.height or native

        steps = request.steps or self._defaults.steps or self._known.steps or default_steps(self._class)
        guidance = _first(request.guidance_scale, self._defaults.guidance_scale, self._known.guidance_scale)
        if guidance is None:
            guidance = self._signature_default("guidance_scale")
        true_cfg = _first(request.true_cfg_scale, self._known.true_cfg_scale)
        if true_cfg is None:
            true_cfg = self._signature_default("true_cfg_scale")
        negative = request.negative_prompt
        if negative is None and true_cfg is not None and true_cfg > 1 and "negative_prompt" in self._params:
            # Real CFG runs only with a negative prompt; without real CFG one means nothing.
            negative = _first(self._known.negative_prompt, NEGATIVE_PROMPT_FOR_TRUE_CFG)
        if self._known.max_sequence_length and "max_sequence_length" in self._params:
            extra.setdefault("max_sequence_length", self._known.max_sequence_length)
        return dataclasses.replace(
            request,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            true_cfg_scale=true_cfg,
            negative_prompt=negative,
            extra=extra,
        )

    def fit_prompt(self, request: GenRequest) -> tuple[str, PromptFit] | None:
        """The prompt as this pipeline's widest text encoder reads it (`prompt_fit`)."""
        sequence_length = request.extra.get("max_sequence_length") or self._known.max_sequence_length
        if sequence_length not in self._fit_encoders:
            encoder = reading_encoder(self._pipe, self._params, sequence_length)
            # A tokenizer of its own: this runs on the event loop while the pipeline calls its
            # tokenizer on the generator's thread, and a Rust-backed tokenizer keeps truncation
            # and padding as shared state (a call without them left the pipeline's unpadded).
            self._fit_encoders[sequence_length] = (
                None if encoder is None else dataclasses.replace(encoder, tokenizer=copy.deepcopy(encoder.tokenizer))
            )
        encoder = self._fit_encoders[sequence_length]
        return None if encoder is None else fit_prompt(encoder, request.prompt)

    def _native_size(self) -> int:
        vae_scale = int(getattr(self._pipe, "vae_scale_factor", 8))
        sample = getattr(self._pipe, "default_sample_size", None)
        if sample is None and getattr(self._pipe, "unet", None) is not None:
            sample = self._pipe.unet.config.sample_size
        if isinstance(sample, int):
            return sample * vae_scale
        return 1024

    def _signature_default(self, param: str) -> float | None:
        parameter = self._params.get(param)
        if parameter is None or not isinstance(parameter.default, int | float):
            return None
        return float(parameter.default)

    # --- generation -----------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest], hooks: StepHooks = NO_HOOKS) -> list[Image.Image]:
        """Make one image per request in ONE pipeline call. Raises `GeneratorError`."""
        if not requests:
            return []
        resolved = resolve_batch(self, requests)
        first_key = resolved[0].batch_key()
        if any(r.batch_key() != first_key for r in resolved[1:]):
            raise GeneratorError("requests in one call must share one batch key")
        if hooks.interrupted():
            raise GenerationInterrupted("interrupted before the first step")

        kwargs = self._call_kwargs(resolved)
        first = resolved[0]
        assert first.width is not None and first.height is not None
        prepare_vae(self._pipe, first.width, first.height)
        # The pipeline's own count wins: img2img runs fewer steps (strength), 2nd-order schedulers more.
        total = first.steps or 1
        interrupted_at: int | None = None
        denoised: Any = None  # the last step's latents: decoded again here if the decode runs out of memory
        cooperative = isinstance(getattr(type(self._pipe), "interrupt", None), property)

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal interrupted_at, total, denoised
            total = getattr(pipe, "_num_timesteps", None) or total
            if step + 1 >= total:
                denoised = tensors.get("latents")
            elif (step + 1) % self._preview_every == 0 and "latents" in tensors:
                self._send_previews(resolved, tensors["latents"], step + 1, total)
            hooks.step(step + 1, total)
            if hooks.interrupted():
                interrupted_at = step + 1
                if not cooperative:
                    raise _StopRequested
                pipe._interrupt = True
            return tensors

        kwargs["callback_on_step_end"] = step_end
        try:
            output = self._pipe(**kwargs)
            images = list(output.images)
        except _StopRequested:
            images = []
        except GcrError:
            raise
        except Exception as exc:
            error = translate_error(exc)
            if not (isinstance(error, GeneratorOutOfMemory) and denoised is not None and can_decode(self._pipe)):
                raise error from exc
            log.warning("out of GPU memory after denoising; decoding the %d image(s) one by one", len(resolved))
            images = self._decode_after_oom(denoised, first.width, first.height)
        if interrupted_at is not None:
            raise GenerationInterrupted(f"interrupted after step {interrupted_at} of {total}")
        if len(images) != len(resolved):
            raise GeneratorError(f"{self._class} returned {len(images)} images for {len(resolved)} requests")
        return images

    def _send_previews(self, requests: Sequence[GenRequest], latents: Any, step: int, total: int) -> None:
        """Previews for the requests that asked; a failure here never costs the generation."""
        for index, request in enumerate(requests):
            if request.preview is None or request.width is None or request.height is None:
                continue
            try:
                uri = preview_data_uri(self._pipe, latents, index, request.width, request.height)
            except Exception as exc:  # a preview is a nicety: log it, generate on
                log.warning("no preview for %s: %s", self._class, one_line(exc))
                return
            if uri is not None:
                request.preview(step, total, uri)

    def _decode_after_oom(self, latents: Any, width: int, height: int) -> list[Image.Image]:
        from workers.generators.oom import free_cuda_cache

        free_cuda_cache()
        try:
            return decode_one_by_one(self._pipe, latents, width, height)
        except Exception as exc:
            raise translate_error(exc) from exc

    def _call_kwargs(self, requests: Sequence[GenRequest]) -> dict[str, Any]:
        import torch

        first = requests[0]
        assert first.width is not None and first.height is not None  # resolve() filled them
        wanted: dict[str, Any] = {
            "prompt": [r.prompt for r in requests],
            "generator": [torch.Generator("cpu").manual_seed(r.seed) for r in requests],
            "num_images_per_prompt": 1,
            "output_type": "pil",
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.steps,
            "max_area": first.width * first.height,
            **self._defaults.pipeline_kwargs,
            **first.extra,
        }
        if first.guidance_scale is not None:
            wanted["guidance_scale"] = first.guidance_scale
        if first.true_cfg_scale is not None:
            wanted["true_cfg_scale"] = first.true_cfg_scale
        if first.negative_prompt is not None:
            wanted["negative_prompt"] = [r.negative_prompt or "" for r in requests]
        if first.mode == "edit":
            sources = [_source(r, self._params) for r in requests]
            # A list given to QwenImageEditPlus means several references for ONE image.
            wanted["image"] = sources[0] if len(sources) == 1 else sources
        return {k: v for k, v in wanted.items() if k in self._params}


def _first(*values: Any) -> Any:
    """The first value that is not None (0 and "" are values: guidance 0 is a choice)."""
    return next((v for v in values if v is not None), None)


def _source(request: GenRequest, params: Any) -> Image.Image:
    assert request.source_image is not None and request.width and request.height
    image = request.source_image.convert("RGB")
    # Pipelines without width/height (img2img) make an image the size of their input.
    if "width" not in params or "height" not in params:
        image = image.resize((request.width, request.height))
    return image


def translate_error(exc: BaseException) -> GeneratorError:
    """A torch/diffusers exception as ours: CUDA OOM → `GeneratorOutOfMemory`, else `GeneratorError`."""
    oom_type: type[BaseException] | None
    try:
        import torch

        oom_type = torch.cuda.OutOfMemoryError
    except (ImportError, AttributeError):
        oom_type = None
    if (oom_type is not None and isinstance(exc, oom_type)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    ):
        return GeneratorOutOfMemory(f"out of GPU memory: {one_line(exc)}")
    return GeneratorError(f"pipeline call failed: {one_line(exc)}")
