"""The GPU kit is complete: gpu_validate runs on the device's packages plus the kit alone.

A CPU dry run of bench/README.md's device command, which runs bench/gpu_device.sh.
A fresh virtual environment holds only what the GPU machine has
(`bench.gpu_kit.DEVICE_BASE`, with a CPU torch standing in for its CUDA one, and
without the kit's packages); `bench/gpu_kit.py` downloads the kit for this machine's
Python; and bench/gpu_device.sh, given that environment's Python, installs it as on the
device (`--no-index --no-deps --target`) and runs `gpu_validate.py --tiny --device cpu`
from the repository root with `PYTHONPATH=<site>:.`, never the project's environment.

The stand-in environment is slow to build (torch), so it is kept under
`.cache/gpu-kit/` (ignored), keyed on its requirements and this Python; the kit is
downloaded and installed afresh each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_kit import DEVICE, DEVICE_BASE, KIT, canonical, locked_versions

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "gpu-kit"
LEFT_OUT = "diffusers"
"""The wheel the negative control leaves out: imported late (inside the loader), after torch."""


def pip(python: Path, *args: str, timeout_s: float = 600) -> None:
    completed = subprocess.run(
        [str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def stand_in_venv() -> Path:
    """A venv with the device's packages alone, built once per requirement list and Python."""
    torch_index = os.environ.get("TORCH_INDEX_URL", "")  # as scripts/setup honours it
    key_text = "\n".join([sys.version, torch_index, *DEVICE_BASE, "minus", *KIT])
    venv = CACHE / f"device-{hashlib.sha256(key_text.encode()).hexdigest()[:12]}"
    if (venv / "ready").is_file():
        return venv
    building = CACHE / f".building-{venv.name}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=120)
    python = building / "bin" / "python"
    torch, rest = DEVICE_BASE[0], DEVICE_BASE[1:]
    assert torch.startswith("torch=="), DEVICE_BASE
    index = ["--index-url", torch_index, "--extra-index-url", "https://pypi.org/simple"] if torch_index else []
    pip(python, "install", "-q", *index, torch)  # here, a CPU build from the machine's local wheels
    pip(python, "install", "-q", *rest)
    # Some of the device's dependencies pull in what the device lacks (typer 0.29 needs
    # pydantic); the device has none of the kit's packages, so neither does its stand-in.
    pip(python, "uninstall", "-q", "-y", *KIT)
    (building / "ready").write_text(key_text + "\n")
    try:
        building.rename(venv)  # `python -m pip` keeps working after the move; bin/ scripts would not
    except OSError:  # another run finished first
        shutil.rmtree(building, ignore_errors=True)
    for stale in CACHE.glob("device-*"):
        if stale != venv:
            shutil.rmtree(stale, ignore_errors=True)
    return venv


def run_device_script(venv: Path, wheels: list[Path], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """bench/gpu_device.sh as the device command runs it, with the stand-in's Python and
    `wheels` as the carried kit; the environment holds nothing of this process's Python."""
    kit = tmp_path / "carried"
    kit.mkdir()
    for wheel in wheels:
        shutil.copy(wheel, kit / wheel.name)
    out = tmp_path / "out"
    out.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONNOUSERSITE": "1",
        "PYTHON": str(venv / "bin" / "python"),
        "SITE": str(tmp_path / "site"),
        "KIT": str(kit),
        "OUT": str(out),
    }
    argv = [
        "bash",
        "bench/gpu_device.sh",
        "--tiny",
        "--device",
        "cpu",
        "--calls",
        "1",
        "--batches",
        "1",
        "--sizes",
        "64",
    ]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    """The kit for this machine's Python, made by bench/gpu_kit.py as for the device; and its report."""
    dest = tmp_path_factory.mktemp("kit") / "whl"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run(
        [sys.executable, "bench/gpu_kit.py", "--python-version", python_version, "--dest", str(dest)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr[-3000:]
    return sorted(dest.glob("*.whl")), made.stdout


@pytest.mark.timeout(900)  # cold: the stand-in venv is built (torch); warm, under a minute
def test_gpu_validate_runs_on_the_device_packages_and_the_kit_alone(
    kit: tuple[list[Path], str], tmp_path: Path
) -> None:
    wheels, report = kit
    assert "fits the 64 MiB" in report
    assert sorted(canonical(w.name.split("-")[0]) for w in wheels) == sorted(KIT)
    venv = stand_in_venv()
    ran = run_device_script(venv, wheels, tmp_path)
    assert ran.returncode == 0, ran.stdout[-5000:] + ran.stderr[-3000:]
    assert "GPU validation: PASS" in (tmp_path / "out" / "gpu_validate.log").read_text()
    result: dict[str, Any] = json.loads((tmp_path / "out" / "gpu_validate.json").read_text())
    assert result["ok"] and result["complete"] and "error" not in result
    assert [(row["size"], row["batch"]) for row in result["batches"]] == [(64, 1)]

    used: dict[str, dict[str, str]] = result["packages"]
    pins = locked_versions()
    for name in KIT:  # every carried wheel was imported, at the lock's version, from the kit
        assert name in used, f"{name} is carried but gpu_validate never imported it"
        assert used[name]["version"] == pins[name], (name, used[name])
        assert Path(used[name]["location"]) == (tmp_path / "site").resolve(), (name, used[name])
    for name, where in used.items():  # everything else came from the device's packages
        if name in KIT:
            continue
        assert name in DEVICE, f"gpu_validate imported {name}, which is neither carried nor on the device"
        assert Path(where["location"]).is_relative_to(venv.resolve()), (name, where)


@pytest.mark.timeout(900)
def test_a_wheel_left_out_of_the_kit_fails_the_dry_run(kit: tuple[list[Path], str], tmp_path: Path) -> None:
    """The negative control: without one wheel the same run stops on the missing module."""
    wheels = [w for w in kit[0] if canonical(w.name.split("-")[0]) != LEFT_OUT]
    assert len(wheels) == len(KIT) - 1
    ran = run_device_script(stand_in_venv(), wheels, tmp_path)
    assert ran.returncode != 0
    assert f"No module named '{LEFT_OUT}'" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-3000:]  # the log, via tee
