"""The simulated generator (benchmarks, fast tests) and the torch-free backend selection."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from service.errors import GenerationInterrupted, GeneratorError
from service.settings import Settings
from tests.interpreter import modules_loaded_by
from workers.generators import load_generator
from workers.generators.base import GenRequest, StepHooks
from workers.generators.simulated import SimulatedGenerator, parse_spec


def _settings(**overrides: object) -> Settings:
    return Settings(**{"generator": "sim:0", "max_batch": 4, **overrides})  # type: ignore[arg-type]


def test_load_generator_picks_the_simulator() -> None:
    generator = load_generator(_settings(generator="sim:0.01:0.005", max_batch=3))
    assert isinstance(generator, SimulatedGenerator)
    assert generator.name == "sim:0.01:0.005"
    assert generator.modes == frozenset({"t2i", "edit"})
    assert generator.max_batch == 3


def test_an_unset_generator_is_refused_with_the_setting_named() -> None:
    with pytest.raises(GeneratorError, match="GCR_GENERATOR is not set"):
        load_generator(_settings(generator=None))


def test_an_unknown_tiny_kind_is_refused() -> None:
    with pytest.raises(GeneratorError, match="tiny:sd"):
        load_generator(_settings(generator="tiny:nope"))


@pytest.mark.parametrize("spec", ["sim:", "sim:x", "sim:1:2:3", "sim:-1", "sim:1:nan"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(GeneratorError, match="bad simulated generator"):
        parse_spec(spec)


def test_spec_parsing() -> None:
    assert parse_spec("sim:1.5") == (1.5, 0.0)
    assert parse_spec("sim:2:0.25") == (2.0, 0.25)


def test_a_call_takes_its_simulated_time() -> None:
    generator = SimulatedGenerator("sim:0.05:0.05", _settings())
    started = time.monotonic()
    generator.generate([GenRequest(prompt=str(i), seed=i) for i in range(3)])
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 1.0  # 0.05 + 0.05 * (3 - 1)


def test_images_are_deterministic_and_depend_on_prompt_and_seed() -> None:
    generator = SimulatedGenerator("sim:0", _settings())
    a1, b, c = generator.generate(
        [GenRequest(prompt="a cat", seed=1), GenRequest(prompt="a dog", seed=1), GenRequest(prompt="a cat", seed=2)]
    )
    [a2] = generator.generate([GenRequest(prompt="a cat", seed=1)])
    assert a1.tobytes() == a2.tobytes()
    assert a1.tobytes() != b.tobytes() and a1.tobytes() != c.tobytes()
    assert a1.size == (64, 64) and a1.mode == "RGB"
    colours = a1.getcolors(maxcolors=64 * 64)
    assert colours is not None
    background_pixels = max(colours)[0]
    assert 64 * 64 - background_pixels > 50, "the prompt's words are drawn"


def test_sizes_follow_the_request_and_the_source() -> None:
    generator = SimulatedGenerator("sim:0", _settings(edit_max_edge=512))
    [t2i] = generator.generate([GenRequest(prompt="x", seed=0, width=96, height=48)])
    assert t2i.size == (96, 48)
    source = Image.new("RGB", (1000, 700))
    resolved = generator.resolve(GenRequest(prompt="x", seed=0, mode="edit", source_image=source))
    assert (resolved.width, resolved.height) == (512, 352)  # long edge ≤ 512, multiples of 16
    [edit] = generator.generate([resolved])
    assert edit.size == (512, 352)
    with pytest.raises(GeneratorError, match="source image"):
        generator.resolve(GenRequest(prompt="x", seed=0, mode="edit"))


def test_steps_are_reported_in_order() -> None:
    generator = SimulatedGenerator("sim:0", _settings())
    seen: list[tuple[int, int]] = []
    generator.generate([GenRequest(prompt="x", seed=0, steps=3)], StepHooks(on_step=lambda s, t: seen.append((s, t))))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_interrupt_stops_at_the_next_step() -> None:
    generator = SimulatedGenerator("sim:10", _settings())  # would take 10 s if not interrupted
    seen: list[int] = []
    started = time.monotonic()
    with pytest.raises(GenerationInterrupted, match="after step 1 of 100"):
        generator.generate(
            [GenRequest(prompt="x", seed=0, steps=100)],
            StepHooks(on_step=lambda step, _total: seen.append(step), interrupt=lambda: len(seen) >= 1),
        )
    assert seen == [1]
    assert time.monotonic() - started < 1.0


def test_batches_over_the_limit_and_unknown_extras_are_refused() -> None:
    generator = SimulatedGenerator("sim:0", _settings(max_batch=2))
    with pytest.raises(GeneratorError, match="exceed"):
        generator.generate([GenRequest(prompt="x", seed=i) for i in range(3)])
    with pytest.raises(GeneratorError, match="not allowed"):
        generator.resolve(GenRequest(prompt="x", seed=0, extra={"latents": 1}))


def test_importing_the_generators_package_needs_no_torch() -> None:
    # The gateway imports this package for its types and runs without torch.
    code = (
        "import workers.generators, workers.generators.simulated, workers.generators.oom;"
        "from service.settings import Settings;"
        "workers.generators.load_generator(Settings(generator='sim:0'))"
    )
    assert modules_loaded_by(code, ("torch", "diffusers")) == []
