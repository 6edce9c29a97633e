"""The images' build context holds everything the wheel needs.

The Dockerfile builds the project wheel from `COPY . .`, i.e. from whatever
.dockerignore lets through. This copies exactly that context (the rules applied by
docker-py's `exclude_paths`, the implementation of .dockerignore that Docker's Python
SDK builds with), builds the wheel from it as the Dockerfile does, and checks that the
wheel holds every package and data file pyproject.toml declares and the console
script's module. The cheap guard; scripts/test-containers builds and runs the images.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SKIP = {".git", ".venv", ".tools", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}


def dockerignore_rules(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def build_context(rules: list[str], into: Path) -> Path:
    """Copy the files of the repository that the rules let into a build context."""
    context = into / "context"
    context.mkdir()
    for relative in exclude_paths(str(ROOT), rules):
        if SKIP.intersection(Path(relative).parts):
            continue
        source = ROOT / relative
        if source.is_file():
            target = context / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return context


def build_wheel(context: Path, into: Path) -> zipfile.ZipFile:
    """`pip wheel --no-deps .`, as the Dockerfile's wheel stage runs it."""
    out = into / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(out), str(context)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"the wheel does not build from the image's context:\n{done.stderr[-3000:]}"
    [wheel] = out.glob("gcr-*.whl")
    return zipfile.ZipFile(wheel)


def declared_packages() -> list[str]:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(find_packages(where=str(ROOT), include=include))


def missing_from(wheel: zipfile.ZipFile) -> list[str]:
    """Packages, package data and the console script's module that the wheel lacks."""
    names = set(wheel.namelist())
    missing = [p for p in declared_packages() if f"{p.replace('.', '/')}/__init__.py" not in names]
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        folder = ROOT / package.replace(".", "/")
        for pattern in patterns:
            for path in folder.glob(pattern):
                if path.is_file() and str(path.relative_to(ROOT)) not in names:
                    missing.append(str(path.relative_to(ROOT)))
    for target in PYPROJECT["project"]["scripts"].values():
        module = target.split(":")[0].replace(".", "/") + ".py"
        if module not in names:
            missing.append(module)
    return missing


@pytest.mark.timeout(180)
def test_the_wheel_built_from_the_image_context_holds_every_declared_package(tmp_path: Path) -> None:
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text())
    wheel = build_wheel(build_context(rules, tmp_path), tmp_path)
    assert {"gcr", "service", "workers"} <= set(declared_packages())
    assert missing_from(wheel) == []
    # the context is an allow-list: no tests, caches or local settings reach the builder
    assert not any(fnmatch(name, pattern) for name in wheel.namelist() for pattern in ("tests/*", "*.env", ".venv/*"))


@pytest.mark.timeout(180)
def test_a_dockerignore_without_the_sdk_fails_the_guard(tmp_path: Path) -> None:
    """The defect this guards against: `!gcr/` missing, so the wheel has no SDK and the
    package is gone."""
    rules = [rule for rule in dockerignore_rules((ROOT / ".dockerignore").read_text()) if rule != "!gcr/"]
    wheel = build_wheel(build_context(rules, tmp_path), tmp_path)
    missing = missing_from(wheel)
    assert "gcr" in missing and any(m.startswith("gcr/") for m in missing), missing
