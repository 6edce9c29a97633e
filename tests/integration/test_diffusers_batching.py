"""The diffusers backend's batching contract, on tiny pipelines and at its seams:
batched = alone, progress, interrupt, OOM splitting, and the Qwen-Image-Edit rules."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gcr.types import PromptFit
from service.errors import GenerationInterrupted, GeneratorError, GeneratorOutOfMemory
from service.settings import Settings
from workers.generators.base import NO_HOOKS, GenRequest, StepHooks
from workers.generators.diffusers_backend import DiffusersGenerator, translate_error
from workers.generators.oom import generate_splitting_on_oom
from workers.generators.simulated import SimulatedGenerator

pytest_plugins = ("tests.generator_fixtures",)


def _max_pixel_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


# --- batched equals alone ---------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_flux", "tiny_sd"])
def test_an_image_from_a_batch_equals_the_same_seed_alone(fixture: str, request: pytest.FixtureRequest) -> None:
    generator: DiffusersGenerator = request.getfixturevalue(fixture)
    batch = [GenRequest(prompt=f"a lighthouse, take {i}", seed=100 + i) for i in range(3)]
    batched = generator.generate(batch)
    alone = generator.generate([batch[1]])[0]
    # Tolerance: at most one 8-bit level. The batched matmuls may be blocked differently
    # by BLAS than the single-row ones, which can change a float32 sum in its last bit and
    # flip one rounding to uint8; a wrong seed or prompt pairing changes pixels wholesale.
    # (On the CPUs this was written on the images are identical.)
    assert _max_pixel_diff(batched[1], alone) <= 1
    assert _max_pixel_diff(batched[0], batched[2]) > 8, "distinct seeds must give distinct images"


# --- progress and interrupt ----------------------------------------------------------------


def _count_forward_calls(module: torch.nn.Module) -> tuple[list[int], Any]:
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda _module, _args: calls.append(1))
    return calls, handle


def test_progress_arrives_in_order_for_every_step(tiny_flux: DiffusersGenerator) -> None:
    seen: list[tuple[int, int]] = []
    tiny_flux.generate(
        [GenRequest(prompt="p", seed=1, steps=5), GenRequest(prompt="q", seed=2, steps=5)],
        StepHooks(on_step=lambda step, total: seen.append((step, total))),
    )
    assert seen == [(step, 5) for step in range(1, 6)]


def test_interrupt_stops_within_one_step(tiny_flux: DiffusersGenerator) -> None:
    seen: list[int] = []
    calls, handle = _count_forward_calls(tiny_flux.pipeline.transformer)
    try:
        with pytest.raises(GenerationInterrupted, match="step 2 of 8"):
            tiny_flux.generate(
                [GenRequest(prompt="p", seed=1, steps=8)],
                StepHooks(on_step=lambda step, _total: seen.append(step), interrupt=lambda: len(seen) >= 2),
            )
    finally:
        handle.remove()
    assert seen == [1, 2]
    assert len(calls) == 2, "the denoiser must not run after the interrupting step"
    # the pipeline is usable afterwards (the interrupt flag is reset by the next call)
    [image] = tiny_flux.generate([GenRequest(prompt="p", seed=1, steps=2)])
    assert image.size == (32, 32)


def test_interrupt_before_the_first_step_runs_nothing(tiny_flux: DiffusersGenerator) -> None:
    calls, handle = _count_forward_calls(tiny_flux.pipeline.transformer)
    try:
        with pytest.raises(GenerationInterrupted):
            tiny_flux.generate([GenRequest(prompt="p", seed=1)], StepHooks(interrupt=lambda: True))
    finally:
        handle.remove()
    assert calls == []


# --- OOM ------------------------------------------------------------------------------------


class _OomAbove:
    """A generator that runs out of memory above `limit` requests, or on a `huge` prompt at any size."""

    def __init__(self, settings: Settings, limit: int) -> None:
        self._inner = SimulatedGenerator("sim:0", settings)
        self.name, self.modes, self.max_batch = "oom-above", self._inner.modes, self._inner.max_batch
        self.runtime = self._inner.runtime
        self.limit = limit
        self.calls: list[int] = []

    def resolve(self, request: GenRequest) -> GenRequest:
        return self._inner.resolve(request)

    def fit_prompt(self, request: GenRequest) -> tuple[str, PromptFit] | None:
        return None

    def generate(self, requests: Sequence[GenRequest], hooks: StepHooks = NO_HOOKS) -> list[Image.Image]:
        self.calls.append(len(requests))
        if len(requests) > self.limit or any(r.prompt == "huge" for r in requests):
            raise GeneratorOutOfMemory("CUDA out of memory (simulated)")
        return self._inner.generate(requests, hooks)


def _requests(prompts: Sequence[str]) -> list[GenRequest]:
    return [GenRequest(prompt=p, seed=i) for i, p in enumerate(prompts)]


def test_oom_splits_the_batch_until_every_request_has_its_image(
    generator_settings: Callable[..., Settings],
) -> None:
    generator = _OomAbove(generator_settings(), limit=1)
    requests = _requests(["a", "b", "c", "d"])
    results = generate_splitting_on_oom(generator, requests)
    assert generator.calls == [4, 2, 1, 1, 2, 1, 1]
    expected = SimulatedGenerator("sim:0", generator_settings()).generate(requests)
    assert [r.tobytes() for r in results if isinstance(r, Image.Image)] == [e.tobytes() for e in expected]


def test_oom_at_batch_one_fails_only_that_request(generator_settings: Callable[..., Settings]) -> None:
    generator = _OomAbove(generator_settings(), limit=4)
    results = generate_splitting_on_oom(generator, _requests(["a", "huge", "c"]))
    assert isinstance(results[0], Image.Image) and isinstance(results[2], Image.Image)
    assert isinstance(results[1], GeneratorOutOfMemory)
    assert "out of memory" in results[1].message


def test_other_errors_fail_the_whole_call_without_splitting(generator_settings: Callable[..., Settings]) -> None:
    class Broken(_OomAbove):
        def generate(self, requests: Sequence[GenRequest], *args: Any, **kwargs: Any) -> list[Image.Image]:
            self.calls.append(len(requests))
            raise GeneratorError("pipeline call failed: ValueError: bad")

    generator = Broken(generator_settings(), limit=4)
    results = generate_splitting_on_oom(generator, _requests(["a", "b", "c"]))
    assert generator.calls == [3]
    assert all(isinstance(r, GeneratorError) and r.message.endswith("bad") for r in results)
    assert generate_splitting_on_oom(generator, []) == []


def test_cuda_oom_inside_the_pipeline_is_split_by_the_real_backend(tiny_flux: DiffusersGenerator) -> None:
    requests = _requests(["a harbour", "a forest", "a desert"])
    reference = tiny_flux.generate(requests)

    def oom_above_one(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs["hidden_states"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = tiny_flux.pipeline.transformer.register_forward_pre_hook(oom_above_one, with_kwargs=True)
    try:
        with pytest.raises(GeneratorOutOfMemory):
            tiny_flux.generate(requests)
        results = generate_splitting_on_oom(tiny_flux, requests)
    finally:
        handle.remove()
    assert len(results) == 3
    for result, expected in zip(results, reference, strict=True):
        assert isinstance(result, Image.Image)
        assert _max_pixel_diff(result, expected) <= 1  # see the batched-equals-alone test


def test_exceptions_are_translated_at_the_boundary() -> None:
    assert isinstance(translate_error(torch.cuda.OutOfMemoryError("CUDA out of memory")), GeneratorOutOfMemory)
    assert isinstance(translate_error(RuntimeError("CUDA error: out of memory\nmore")), GeneratorOutOfMemory)
    plain = translate_error(ValueError("height must be divisible by 16\nTraceback..."))
    assert type(plain) is GeneratorError
    assert plain.message == "pipeline call failed: ValueError: height must be divisible by 16"


# --- Qwen-Image-Edit-2509 rules, at the seam ------------------------------------------------


class QwenImageEditPlusPipeline:
    """Stands in for diffusers' class of that name: same name, same `__call__` signature;
    records its calls and, like the real one, refuses more than one prompt."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def __call__(self, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(kwargs)
        self._interrupt = False
        prompts = kwargs["prompt"]
        if isinstance(prompts, list) and len(prompts) > 1:
            raise ValueError("QwenImageEditPlusPipeline currently only supports batch_size=1")
        for step in range(kwargs["num_inference_steps"]):
            if self.interrupt:
                continue
            kwargs["callback_on_step_end"](self, step, 1000 - step, {})
        return SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]))])


def _real_qwen_signature() -> inspect.Signature:
    from diffusers import QwenImageEditPlusPipeline as Real

    return inspect.signature(Real.__call__)


@pytest.fixture
def real_qwen_signature() -> None:
    """The backend reads the pipeline's parameters from its class: give the stand-in the real ones."""
    QwenImageEditPlusPipeline.__call__.__signature__ = _real_qwen_signature()  # type: ignore[attr-defined]


@pytest.fixture
def qwen(
    generator_settings: Callable[..., Settings], real_qwen_signature: None
) -> tuple[DiffusersGenerator, QwenImageEditPlusPipeline]:
    stand_in = QwenImageEditPlusPipeline()
    generator = DiffusersGenerator(
        generator_settings(max_batch=4, edit_max_edge=1024), "Qwen/Qwen-Image-Edit-2509", pipeline=stand_in
    )
    return generator, stand_in


def _edit(size: tuple[int, int] = (1200, 900), **fields: Any) -> GenRequest:
    return GenRequest(prompt="make the sky pink", seed=42, mode="edit", source_image=Image.new("RGB", size), **fields)


def test_qwen_edit_plus_takes_one_request_per_call(qwen: tuple[DiffusersGenerator, Any]) -> None:
    generator, _ = qwen
    assert generator.max_batch == 1
    assert generator.modes == frozenset({"edit"})
    with pytest.raises(GeneratorError, match="exceed"):
        generator.generate([_edit(), _edit()])


def test_qwen_true_cfg_gets_a_space_as_negative_prompt(qwen: tuple[DiffusersGenerator, Any]) -> None:
    generator, _ = qwen
    resolved = generator.resolve(_edit())
    assert resolved.true_cfg_scale == 4.0  # the pipeline's default, as upstream RationalRewards uses
    assert resolved.negative_prompt == " "
    assert resolved.steps == 40
    assert (resolved.width, resolved.height) == (1024, 768)  # long edge ≤ 1024, multiples of 16
    assert generator.resolve(_edit(true_cfg_scale=1.0)).negative_prompt is None
    assert generator.resolve(_edit(negative_prompt="blurry")).negative_prompt == "blurry"


def test_qwen_call_passes_the_source_and_only_known_arguments(qwen: tuple[DiffusersGenerator, Any]) -> None:
    generator, stand_in = qwen
    source = Image.new("RGB", (640, 480), (1, 2, 3))
    request = GenRequest(prompt="add a hat", seed=7, mode="edit", source_image=source, steps=3)
    steps: list[int] = []
    [image] = generator.generate([request], StepHooks(on_step=lambda step, _total: steps.append(step)))
    [call] = stand_in.calls
    assert call["image"].tobytes() == source.tobytes()  # one image, not a list (a list = several references)
    assert call["negative_prompt"] == [" "] and call["true_cfg_scale"] == 4.0
    assert (call["width"], call["height"]) == (640, 480) == image.size
    assert len(call["generator"]) == 1 and call["num_inference_steps"] == 3
    assert set(call) <= set(_real_qwen_signature().parameters)
    assert "guidance_scale" not in call  # None by default: only guidance-distilled variants take it
    assert steps == [1, 2, 3]


def test_a_pipeline_without_interrupt_support_is_stopped_by_the_callback(
    generator_settings: Callable[..., Settings], real_qwen_signature: None
) -> None:
    class NoInterruptEdit(QwenImageEditPlusPipeline):
        interrupt = False  # a plain attribute: not honoured as diffusers does

    stand_in = NoInterruptEdit()
    generator = DiffusersGenerator(generator_settings(), "stand-in", pipeline=stand_in)
    steps: list[int] = []
    with pytest.raises(GenerationInterrupted, match="step 1 of 5"):
        generator.generate(
            [_edit(steps=5)], StepHooks(on_step=lambda step, _total: steps.append(step), interrupt=lambda: bool(steps))
        )
    assert steps == [1]


# --- an out-of-memory decode keeps the denoising ---------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_flux", "tiny_sd"])
def test_an_oom_in_the_vae_decode_decodes_the_denoised_latents_one_by_one(
    fixture: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator: DiffusersGenerator = request.getfixturevalue(fixture)
    requests = _requests(["a harbour", "a forest"])
    reference = generator.generate(requests)
    vae = generator.pipeline.vae
    real_decode = vae.decode
    decoded_batches: list[int] = []

    def decode_oom_once(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        decoded_batches.append(z.shape[0])
        if len(decoded_batches) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_decode(z, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode_oom_once)
    steps: list[int] = []
    images = generator.generate(requests, StepHooks(on_step=lambda step, _total: steps.append(step)))

    assert steps == list(range(1, len(steps) + 1)), "denoised once, not again"
    assert decoded_batches == [2, 1, 1]  # the pipeline's decode, then ours, image by image
    for image, expected in zip(images, reference, strict=True):
        assert _max_pixel_diff(image, expected) <= 1


def test_large_images_decode_in_tiles_and_batches_image_by_image(tiny_flux: DiffusersGenerator) -> None:
    from workers.generators.decoding import prepare_vae

    vae = tiny_flux.pipeline.vae
    prepare_vae(tiny_flux.pipeline, 1024, 1024)
    assert vae.use_slicing and not vae.use_tiling
    prepare_vae(tiny_flux.pipeline, 2048, 1536)
    assert vae.use_slicing and vae.use_tiling
    prepare_vae(tiny_flux.pipeline, 32, 32)
    assert not vae.use_tiling
