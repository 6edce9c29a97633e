"""Fixtures for generator tests: tiny diffusers pipelines, built once per test session.

Register with `pytest_plugins = ("tests.generator_fixtures",)` in a test module.
Building all three kinds takes a few seconds on two cores; loading one takes
well under a second, so tests share the loaded generators too (calls only read
their weights).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from service.settings import Settings

if TYPE_CHECKING:
    from workers.generators.diffusers_backend import DiffusersGenerator

# Third-party noise raised while importing or loading diffusers/transformers that the
# project's `filterwarnings = error` would otherwise turn into failures. Kept narrow.
TORCH_STACK_WARNINGS = (
    "ignore:.*torch.jit.script.*is deprecated:DeprecationWarning",
    "ignore:.*torch_dtype.*is deprecated:FutureWarning",
)


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`GCR_CACHE_DIR` of this session: tiny pipelines are built here, once."""
    return tmp_path_factory.mktemp("gcr-cache")


@pytest.fixture(scope="session")
def generator_settings(tiny_cache_dir: Path) -> Callable[..., Settings]:
    """Settings for a worker's generator, on CPU, caching tiny pipelines for the session."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "cache_dir": tiny_cache_dir,
            "generator_device": "cpu",
            "generator_dtype": "float32",
            "max_batch": 4,
        }
        values.update(overrides)
        return Settings(**values)

    return make


def _load(settings: Settings) -> DiffusersGenerator:
    from workers.generators import load_generator
    from workers.generators.diffusers_backend import DiffusersGenerator

    generator = load_generator(settings)
    assert isinstance(generator, DiffusersGenerator)
    return generator


@pytest.fixture(scope="session")
def tiny_sd(generator_settings: Callable[..., Settings]) -> DiffusersGenerator:
    return _load(generator_settings(generator="tiny:sd"))


@pytest.fixture(scope="session")
def tiny_flux(generator_settings: Callable[..., Settings]) -> DiffusersGenerator:
    return _load(generator_settings(generator="tiny:flux"))


@pytest.fixture(scope="session")
def tiny_kontext(generator_settings: Callable[..., Settings]) -> DiffusersGenerator:
    return _load(generator_settings(generator="tiny:kontext"))
