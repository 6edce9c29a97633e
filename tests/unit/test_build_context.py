"""The images' build context holds everything the wheels need.

The Dockerfile builds two wheels from `COPY . .`, i.e. from whatever .dockerignore lets
through: gcr-sdk (sdk/pyproject.toml, the `gcr` package) and gcr-service (the root
pyproject.toml: service/ and workers/). This copies exactly that context (the rules
applied by docker-py's `exclude_paths`, the implementation of .dockerignore that
Docker's Python SDK builds with), builds both wheels from it as the Dockerfile does, and
checks that they hold every package and data file the two pyproject files declare and
the console script's module. The cheap guard; scripts/test-containers builds and runs
the images.
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
SERVICE = tomllib.loads((ROOT / "pyproject.toml").read_text())
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


def build_wheels(context: Path, into: Path) -> dict[str, zipfile.ZipFile]:
    """`pip wheel --no-deps ./sdk .`, as the Dockerfile's wheel stage runs it."""
    out = into / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(out), "./sdk", "."],
        cwd=context,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"the wheels do not build from the image's context:\n{done.stderr[-3000:]}"
    return {
        name: zipfile.ZipFile(next(out.glob(f"{name.replace('-', '_')}-*.whl"))) for name in ("gcr-sdk", "gcr-service")
    }


def declared_packages() -> dict[str, list[str]]:
    include = SERVICE["tool"]["setuptools"]["packages"]["find"]["include"]
    # sdk/hatch_build.py puts ../gcr into gcr-sdk's wheels
    return {
        "gcr-service": sorted(find_packages(where=str(ROOT), include=include)),
        "gcr-sdk": ["gcr", *(f"gcr.{q}" for q in find_packages(str(ROOT / "gcr")))],
    }


def missing_from(wheels: dict[str, zipfile.ZipFile]) -> list[str]:
    """Packages, package data and the console script's module that the wheels lack."""
    missing = []
    for distribution, packages in declared_packages().items():
        names = set(wheels[distribution].namelist())
        missing += [p for p in packages if f"{p.replace('.', '/')}/__init__.py" not in names]
    service = set(wheels["gcr-service"].namelist())
    for package, patterns in SERVICE["tool"]["setuptools"]["package-data"].items():
        folder = ROOT / package.replace(".", "/")
        for pattern in patterns:
            for path in folder.glob(pattern):
                if path.is_file() and str(path.relative_to(ROOT)) not in service:
                    missing.append(str(path.relative_to(ROOT)))
    for target in SERVICE["project"]["scripts"].values():
        module = target.split(":")[0].replace(".", "/") + ".py"
        if module not in service:
            missing.append(module)
    return missing


@pytest.mark.timeout(180)
def test_the_wheels_built_from_the_image_context_hold_every_declared_package(tmp_path: Path) -> None:
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text())
    wheels = build_wheels(build_context(rules, tmp_path), tmp_path)
    declared = declared_packages()
    assert "gcr" in declared["gcr-sdk"] and {"service", "workers"} <= set(declared["gcr-service"])
    assert missing_from(wheels) == []
    # the SDK's wheel is the SDK alone
    assert {name.split("/")[0] for name in wheels["gcr-sdk"].namelist()} <= {
        "gcr",
        "LICENSE",
        "gcr_sdk-0.1.0.dist-info",
    }
    # the context is an allow-list: no tests, caches or local settings reach the builder
    for wheel in wheels.values():
        assert not any(fnmatch(n, p) for n in wheel.namelist() for p in ("tests/*", "*.env", ".venv/*"))


@pytest.mark.timeout(180)
def test_a_dockerignore_without_the_sdk_fails_the_build(tmp_path: Path) -> None:
    """The defect this guards against: `!gcr/` missing, so the images had no SDK and the
    gateway died at start with ModuleNotFoundError: gcr. Now the wheel stage fails."""
    rules = [rule for rule in dockerignore_rules((ROOT / ".dockerignore").read_text()) if rule != "!gcr/"]
    with pytest.raises(AssertionError, match=r"Forced include not found: .*context/gcr"):
        build_wheels(build_context(rules, tmp_path), tmp_path)


@pytest.mark.timeout(180)
def test_a_dockerignore_without_a_service_package_fails_the_guard(tmp_path: Path) -> None:
    rules = [rule for rule in dockerignore_rules((ROOT / ".dockerignore").read_text()) if rule != "!workers/"]
    wheels = build_wheels(build_context(rules, tmp_path), tmp_path)
    assert "workers" in missing_from(wheels)
