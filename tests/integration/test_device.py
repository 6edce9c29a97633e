"""A worker told to use a GPU never falls back to the CPU in silence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.errors import DeviceUnavailable
from tests.e2e.test_edit_and_critique import run_cli
from workers.generators import loading

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")


def test_cuda_without_a_gpu_names_the_torch_build_and_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "DRIVER_VERSION_FILE", Path("/nonexistent"))
    with pytest.raises(DeviceUnavailable) as caught:
        loading.resolve_device("cuda")
    message = caught.value.message
    assert "GCR_GENERATOR_DEVICE=cuda" in message and f"torch {torch.__version__}" in message
    if torch.version.cuda is None:
        assert "CPU-only build" in message and "TORCH_INDEX_URL" in message
    assert "no NVIDIA driver visible" in message


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version = tmp_path / "version"
    version.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n"
        "GCC version:  gcc version 12.3.0\n"
    )
    monkeypatch.setattr(loading, "DRIVER_VERSION_FILE", version)
    assert loading.driver_version() == "580.65.06"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    assert loading.driver_version() == "535.104.05"


def test_auto_still_runs_on_the_cpu_for_development() -> None:
    assert loading.resolve_device("auto") == "cpu"


def test_a_cuda_worker_without_a_gpu_exits_with_one_line(tmp_path: Path) -> None:
    result = run_cli(
        ["worker"],
        GCR_GENERATOR="tiny:sd",
        GCR_GENERATOR_DEVICE="cuda",
        GCR_CACHE_DIR=str(tmp_path),
        GCR_LOG_FORMAT="text",
        GCR_REDIS_URL="redis://127.0.0.1:9/0",
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: GCR_GENERATOR_DEVICE=cuda but no GPU is usable") and "torch" in last
    assert "Traceback" not in result.stderr
