"""The GPU kit's pieces that need no download, and gpu_validate's estimate-beside-peak rows.

The kit itself is proven complete by tests/e2e/test_gpu_kit.py."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_kit import DEST, KIT, canonical, kit_requirements, locked_versions, platforms
from bench.gpu_validate import int_list, with_estimates
from workers.generators.memory import GIB, MemoryEstimate

ROOT = Path(__file__).resolve().parents[2]


def test_each_wheel_of_the_kit_is_pinned_at_the_locks_version() -> None:
    lock = locked_versions()
    assert lock["diffusers"] and lock["pydantic-settings"]  # canonical names, as the lock spells them or not
    assert kit_requirements() == [f"{name}=={lock[name]}" for name in KIT]


def test_a_kit_package_missing_from_the_lock_is_an_error(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("pydantic==2.14.4\n    # via gcr\nPydantic_Core==2.50.5\n")
    assert locked_versions(lock) == {"pydantic": "2.14.4", "pydantic-core": "2.50.5"}
    with pytest.raises(SystemExit, match="pins no version of annotated-types, diffusers"):
        kit_requirements(lock)


def test_platform_tags_go_up_to_the_given_glibc_and_no_further() -> None:
    tags = platforms("2.28")
    assert "manylinux_2_28_x86_64" in tags and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags
    with pytest.raises(SystemExit):
        platforms("2.5")


def test_canonical_names() -> None:
    assert canonical("Pydantic_Settings") == canonical("pydantic.settings") == "pydantic-settings"


def test_each_row_gets_the_estimate_for_its_own_batch_and_size() -> None:
    params = {"transformer": 1_000_000_000}
    small = MemoryEstimate(params, 2, 1, 1024**2 / 1e6).total / GIB
    big = MemoryEstimate(params, 2, 4, 2048**2 / 1e6).total / GIB
    rows: list[dict[str, Any]] = [
        {"size": 1024, "batch": 1, "device_peak_gib": small - 0.1},
        {"size": 2048, "batch": 4, "device_peak_gib": big + 0.1},
        {"size": 2048, "batch": 4, "device_peak_gib": None},  # on the CPU: nothing to compare
    ]
    out = with_estimates(rows, params, 2)
    assert [r["estimate_gib"] for r in out] == [small, big, big]
    assert [r["estimate_covers_peak"] for r in out] == [True, False, None]


def test_batch_and_size_lists() -> None:
    assert int_list("1,4") == [1, 4]
    for bad in ("", "0", "1,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad)


def test_the_readme_device_command_is_what_the_dry_run_runs_and_fits_the_tool() -> None:
    readme = (ROOT / "bench" / "README.md").read_text()
    command = re.search(r"^\| `command` \| `(.+)` \|$", readme, flags=re.MULTILINE)
    carry = re.search(r"^\| `carry` \| `(.+)` \|$", readme, flags=re.MULTILINE)
    assert command and carry
    assert len(command.group(1)) <= 2000  # the device tool's limit on a command
    assert "bash bench/gpu_device.sh" in command.group(1)
    # What is carried is where gpu_kit.py puts the wheels and gpu_device.sh takes them from.
    assert [ROOT / path for path in json.loads(carry.group(1))] == [DEST]
    assert "KIT=${KIT:-.whl}" in (ROOT / "bench" / "gpu_device.sh").read_text()
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()  # ignored: it travels only as carried
