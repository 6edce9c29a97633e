"""Generator backends, chosen by `GCR_GENERATOR`.

- `sim:SECONDS[:PER_IMAGE]` → `SimulatedGenerator` (benchmarks, fast tests; no torch);
- `tiny:sd`, `tiny:flux`, `tiny:kontext` → a random-weight pipeline built once into
  `GCR_CACHE_DIR`, then loaded by path through `DiffusersGenerator` like any model;
- anything else → `DiffusersGenerator` on that model id or local folder.

torch and diffusers are imported only when a diffusers backend is chosen, so the
gateway (which imports this package for its types) runs without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.errors import GeneratorError
from workers.generators.base import Generator

if TYPE_CHECKING:
    from service.settings import WorkerSettings

TINY_PREFIX = "tiny:"


def load_generator(settings: WorkerSettings) -> Generator:
    """Build the generator `settings.generator` names. Raises `GeneratorError` with a one-line reason."""
    spec = settings.generator
    if not spec:
        raise GeneratorError(
            "GCR_GENERATOR is not set: give a diffusers model id or folder, tiny:sd|flux|kontext, or sim:SECONDS"
        )
    if spec.startswith("sim:"):
        from workers.generators.simulated import SimulatedGenerator

        return SimulatedGenerator(spec, settings)

    from workers.generators.diffusers_backend import DiffusersGenerator

    if spec.startswith(TINY_PREFIX):
        from workers.generators.tiny import KINDS, ensure_tiny_pipeline

        kind = spec.removeprefix(TINY_PREFIX)
        if kind not in KINDS:
            raise GeneratorError(f"unknown tiny pipeline {spec!r}; expected one of tiny:{', tiny:'.join(KINDS)}")
        try:
            folder = ensure_tiny_pipeline(kind, settings.cache_dir)
        except (OSError, ImportError) as exc:
            raise GeneratorError(f"cannot build {spec} in {settings.cache_dir}: {exc}") from exc
        return DiffusersGenerator(settings, str(folder), name=spec)
    return DiffusersGenerator(settings, spec)


__all__ = ["Generator", "load_generator"]
