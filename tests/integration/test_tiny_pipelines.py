"""Tiny random-weight pipelines: built from configs, saved, loaded back by path offline
through the same `from_pretrained` path a real model id takes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from service.errors import GeneratorError
from service.settings import Settings
from workers.generators import load_generator
from workers.generators.base import GenRequest
from workers.generators.diffusers_backend import DiffusersGenerator
from workers.generators.tiny import build_tiny_pipeline, ensure_tiny_pipeline

pytest_plugins = ("tests.generator_fixtures",)

EXPECTED_CLASS = {"sd": "StableDiffusionPipeline", "flux": "FluxPipeline", "kontext": "FluxKontextPipeline"}


@pytest.mark.parametrize("kind", ["sd", "flux", "kontext"])
def test_tiny_folder_is_a_diffusers_folder_naming_its_pipeline(kind: str, tiny_cache_dir: Path) -> None:
    folder = ensure_tiny_pipeline(kind, tiny_cache_dir)
    assert folder == tiny_cache_dir / f"tiny-{kind}"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == EXPECTED_CLASS[kind]
    assert index.get("safety_checker", [None])[0] is None
    assert (folder / "gcr_defaults.json").is_file()
    # built once: a second call reuses the folder as it is
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_pipeline(kind, tiny_cache_dir) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


def test_build_is_deterministic(tmp_path: Path, tiny_cache_dir: Path) -> None:
    again = build_tiny_pipeline("flux", tmp_path / "flux")
    reference = ensure_tiny_pipeline("flux", tiny_cache_dir)
    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert (again / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_half_written_folder_is_not_taken_for_a_pipeline(tmp_path: Path) -> None:
    # what a build killed half-way used to leave: the folder without its index
    (tmp_path / "tiny-sd" / "unet").mkdir(parents=True)
    folder = ensure_tiny_pipeline("sd", tmp_path)
    assert (folder / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")], "staging folder left behind"


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_flux"])
def test_t2i_folders_serve_t2i(fixture: str, request: pytest.FixtureRequest) -> None:
    generator: DiffusersGenerator = request.getfixturevalue(fixture)
    assert generator.modes == frozenset({"t2i"})
    assert generator.name == f"tiny:{fixture.removeprefix('tiny_')}"
    [image] = generator.generate([GenRequest(prompt="a red cube", seed=1, width=48, height=32)])
    assert isinstance(image, Image.Image)
    assert image.size == (48, 32)
    assert image.mode == "RGB"


def test_t2i_defaults_come_from_the_folder(tiny_flux: DiffusersGenerator) -> None:
    resolved = tiny_flux.resolve(GenRequest(prompt="x", seed=0))
    assert (resolved.width, resolved.height, resolved.steps) == (32, 32, 4)
    assert resolved.guidance_scale == 3.5  # FluxPipeline's own default
    assert resolved.negative_prompt is None  # true CFG is off (1.0): no negative prompt added
    with pytest.raises(GeneratorError, match="does not do 'edit'"):
        tiny_flux.resolve(GenRequest(prompt="x", seed=0, mode="edit"))


def test_kontext_folder_serves_edit_at_the_source_aspect(tiny_kontext: DiffusersGenerator) -> None:
    assert tiny_kontext.modes == frozenset({"edit"})
    source = Image.new("RGB", (96, 48), (200, 30, 30))
    request = GenRequest(prompt="make it blue", seed=3, mode="edit", source_image=source)
    resolved = tiny_kontext.resolve(request)
    # long edge capped (64 in the tiny folder), sides rounded down to 16, aspect kept
    assert (resolved.width, resolved.height) == (64, 32)
    [image] = tiny_kontext.generate([request])
    assert image.size == (64, 32)
    with pytest.raises(GeneratorError, match="source image"):
        tiny_kontext.resolve(GenRequest(prompt="x", seed=0, mode="edit"))
    with pytest.raises(GeneratorError, match="does not do 't2i'"):
        tiny_kontext.resolve(GenRequest(prompt="x", seed=0))


def test_kontext_batch_takes_one_source_per_request(tiny_kontext: DiffusersGenerator) -> None:
    red = Image.new("RGB", (64, 64), (220, 20, 20))
    blue = Image.new("RGB", (64, 64), (20, 20, 220))
    requests = [
        GenRequest(prompt="same", seed=5, mode="edit", source_image=red),
        GenRequest(prompt="same", seed=5, mode="edit", source_image=blue),
    ]
    first, second = tiny_kontext.generate(requests)
    assert first.size == second.size == (64, 64)
    assert first.tobytes() != second.tobytes(), "each request must be conditioned on its own source"


def test_other_image_taking_pipelines_load_as_img2img_edits(
    tmp_path: Path, tiny_cache_dir: Path, generator_settings: Callable[..., Settings]
) -> None:
    folder = tmp_path / "sd-img2img"
    shutil.copytree(ensure_tiny_pipeline("sd", tiny_cache_dir), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"}))
    generator = load_generator(generator_settings(generator=str(folder)))
    assert type(generator.pipeline).__name__ == "StableDiffusionImg2ImgPipeline"  # type: ignore[attr-defined]
    assert generator.modes == frozenset({"edit"})
    source = Image.new("RGB", (80, 40), (0, 128, 255))
    # img2img has no width/height: the backend resizes the source to the resolved size
    [image] = generator.generate([GenRequest(prompt="x", seed=0, mode="edit", source_image=source)])
    assert image.size == (64, 32)


def test_extras_are_filtered_by_the_allowlist_and_the_pipeline(tiny_flux: DiffusersGenerator) -> None:
    resolved = tiny_flux.resolve(GenRequest(prompt="x", seed=0, extra={"max_sequence_length": 64, "clip_skip": 2}))
    assert dict(resolved.extra) == {"max_sequence_length": 64}  # FluxPipeline has no clip_skip
    with pytest.raises(GeneratorError, match="not allowed"):
        tiny_flux.resolve(GenRequest(prompt="x", seed=0, extra={"callback_on_step_end": None}))
    [image] = tiny_flux.generate([GenRequest(prompt="x", seed=0, extra={"max_sequence_length": 64})])
    assert image.size == (32, 32)


def test_attention_backend_is_applied_when_known(generator_settings: Callable[..., Settings]) -> None:
    generator = load_generator(generator_settings(generator="tiny:flux", attention_backend="native"))
    [image] = generator.generate([GenRequest(prompt="x", seed=0)])
    assert image.size == (32, 32)
    with pytest.raises(GeneratorError) as caught:
        load_generator(generator_settings(generator="tiny:flux", attention_backend="no-such-backend"))
    assert "\n" not in str(caught.value)


def test_an_unloadable_model_fails_at_construction_with_one_line(
    tmp_path: Path, generator_settings: Callable[..., Settings]
) -> None:
    with pytest.raises(GeneratorError) as missing:
        load_generator(generator_settings(generator=str(tmp_path / "no" / "such" / "model")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]}')
    with pytest.raises(GeneratorError) as unloadable:
        load_generator(generator_settings(generator=str(broken)))
    for caught in (missing, unloadable):
        message = str(caught.value)
        assert message and "\n" not in message, message
    assert "broken" in str(unloadable.value)


def test_cpu_offload_without_cuda_is_refused(generator_settings: Callable[..., Settings]) -> None:
    with pytest.raises(GeneratorError, match="CUDA"):
        load_generator(generator_settings(generator="tiny:sd", cpu_offload=True))
