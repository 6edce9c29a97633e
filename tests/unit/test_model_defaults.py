"""Per-model generation defaults: the table, how a model is recognised, and what a job gets."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from service.settings import Settings
from workers.generators.base import GenRequest
from workers.generators.diffusers_backend import DiffusersGenerator
from workers.generators.model_defaults import job_defaults, known_models, lookup


def test_the_models_the_issue_names_get_their_published_defaults() -> None:
    schnell = lookup("black-forest-labs/FLUX.1-schnell")
    assert schnell is not None
    assert (schnell.steps, schnell.guidance_scale, schnell.max_sequence_length) == (4, 0.0, 256)
    dev = lookup("black-forest-labs/FLUX.1-dev")
    assert dev is not None and (dev.steps, dev.guidance_scale) == (28, 3.5)
    kontext = lookup("black-forest-labs/FLUX.1-Kontext-dev")
    assert kontext is not None and (kontext.steps, kontext.guidance_scale) == (28, 2.5)
    qwen = lookup("Qwen/Qwen-Image-Edit-2509")
    assert qwen is not None and (qwen.steps, qwen.true_cfg_scale, qwen.negative_prompt) == (40, 4.0, " ")
    assert {"stabilityai/stable-diffusion-xl-base-1.0", "stable-diffusion-v1-5/stable-diffusion-v1-5"} <= set(
        known_models()
    )
    assert all(lookup(model) and lookup(model).source for model in known_models())  # type: ignore[union-attr]


def test_local_folders_are_recognised(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / "741f7c3"
    snapshot.mkdir(parents=True)
    assert lookup(str(snapshot)).model == "black-forest-labs/FLUX.1-schnell"  # type: ignore[union-attr]
    named = tmp_path / "FLUX.1-Kontext-dev"
    named.mkdir()
    assert lookup(str(named)).model == "black-forest-labs/FLUX.1-Kontext-dev"  # type: ignore[union-attr]
    declared = tmp_path / "my-finetune"
    declared.mkdir()
    (declared / "gcr_defaults.json").write_text(json.dumps({"defaults_of": "black-forest-labs/flux.1-schnell"}))
    assert lookup(str(declared)).model == "black-forest-labs/FLUX.1-schnell"  # type: ignore[union-attr]
    assert lookup("BLACK-FOREST-LABS/flux.1-schnell") is not None
    assert lookup(str(tmp_path / "something-else")) is None
    assert lookup("org/unknown-model") is None


def test_a_folders_own_file_wins_over_the_table(tmp_path: Path) -> None:
    folder = tmp_path / "FLUX.1-schnell"
    folder.mkdir()
    (folder / "gcr_defaults.json").write_text(json.dumps({"steps": 2, "width": 512}))
    values = job_defaults(str(folder))
    assert (values["steps"], values["width"], values["guidance_scale"], values["max_sequence_length"]) == (
        2,
        512,
        0.0,
        256,
    )


class FluxPipeline:
    """Stands in for diffusers' FluxPipeline with its real call signature (no weights)."""

    vae_scale_factor = 8
    default_sample_size = 128

    def __call__(self, **kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]))] * len(kwargs["prompt"]))


@pytest.fixture
def flux_signature() -> None:
    from diffusers import FluxPipeline as Real

    FluxPipeline.__call__.__signature__ = inspect.signature(Real.__call__)  # type: ignore[attr-defined]


@pytest.mark.usefixtures("flux_signature")
def test_schnell_jobs_get_4_steps_guidance_0_and_256_tokens() -> None:
    settings = Settings(generator_device="cpu")
    schnell = DiffusersGenerator(settings, "black-forest-labs/FLUX.1-schnell", pipeline=FluxPipeline())
    resolved = schnell.resolve(GenRequest(prompt="a fox", seed=1))
    assert (resolved.steps, resolved.guidance_scale, resolved.extra["max_sequence_length"]) == (4, 0.0, 256)
    assert (resolved.width, resolved.height) == (1024, 1024)
    # what the request sets wins, 0 included
    mine = schnell.resolve(
        GenRequest(prompt="a fox", seed=1, steps=8, guidance_scale=0.0, extra={"max_sequence_length": 128})
    )
    assert (mine.steps, mine.guidance_scale, mine.extra["max_sequence_length"]) == (8, 0.0, 128)
    # an unknown Flux model keeps the pipeline's own defaults, as before
    other = DiffusersGenerator(settings, "someone/flux-finetune", pipeline=FluxPipeline())
    plain = other.resolve(GenRequest(prompt="a fox", seed=1))
    assert (plain.steps, plain.guidance_scale) == (28, 3.5) and "max_sequence_length" not in plain.extra


def test_gcr_model_defaults_prints_json_without_loading_weights() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "model-defaults", "black-forest-labs/FLUX.1-schnell", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    values = json.loads(result.stdout)
    assert values["steps"] == 4 and values["guidance_scale"] == 0 and values["max_sequence_length"] <= 256
    unknown = subprocess.run(
        [sys.executable, "-m", "service.cli", "model-defaults", "org/unknown"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 0 and "pipeline's own defaults" in unknown.stdout
