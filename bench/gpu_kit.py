"""The wheels `bench/gpu_validate.py` needs on the GPU machine, downloaded here to be carried there.

    python bench/gpu_kit.py                                       # .whl/ for the device: CPython 3.12, x86-64
    python bench/gpu_kit.py --python-version 3.11 --dest DIR      # the same kit for this machine (the CI dry run)

The device that sessions are sometimes lent (../shared/MACHINE.md; the device tool's
KINDS.md) runs Python 3.12 with torch, transformers, huggingface_hub, safetensors,
numpy, pillow, httpx, prometheus-client, requests and more installed, and cannot reach
any registry. What gpu_validate imports beyond that is `KIT`: found by running it in a
virtual environment of the device's packages alone, which tests/e2e/test_gpu_kit.py
rebuilds and re-runs in CI. That test fails when a module is missing, when a carried
wheel goes unimported, and when the run imports a package outside `KIT` that is not
in `DEVICE`.

Versions come from the project's lock, constraints/lock.txt, so the device runs what
the worker image ships. The wheels in DEST are replaced as a whole (two versions of a
package stop `pip install --no-deps`). It prints each wheel's size and the total beside
the working tree's, and exits 1 when both together exceed what one device call carries
(64 MiB). bench/README.md gives the command that installs and runs them on the device.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints" / "lock.txt"
DEST = ROOT / ".whl"
"""Where the device command takes the wheels from (ignored by git, named in `carry`)."""
MIB = 1024**2
CARRY_LIMIT = 64 * MIB
"""What one device call carries: the working tree and the carried paths together."""

KIT = (
    "annotated-types",  # pydantic
    "diffusers",  # the pipelines (FluxPipeline, the tiny test pipeline)
    "httpx-sse",  # gcr (the SDK package holds the error codes service.errors reads)
    "pydantic",  # service.settings
    "pydantic-core",  # pydantic
    "pydantic-settings",  # service.settings
    "python-dotenv",  # pydantic-settings imports it at import time
    "typing-inspection",  # pydantic
)
"""What gpu_validate imports that the device lacks. The device has no redis: bench/common
imports it only inside the functions that talk to Redis."""

DEVICE_BASE = (
    # Versions seen on the device (KINDS.md's pip list, 2026-11) where one is given, except:
    # torch is this machine's CPU build (the device's is 2.11+cu130), and numpy 2.5.2 has no
    # wheel for Python 3.11, so the lock's. The rest are the lock's versions.
    "torch==2.13.0",
    "transformers==5.17.0",
    "huggingface-hub==1.33.0",
    "tokenizers==0.23.2",
    "sentencepiece==0.2.2",
    "safetensors==0.8.0",
    "accelerate==1.15.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "httpx==0.28.1",
    "prometheus-client==0.26.0",
    "rich==15.0.0",
    "pyyaml==6.0.4",
    "requests==2.34.2",
)
"""Requirements of a CPU stand-in for the device's Python: the packages MACHINE.md lists
(with requests, which KINDS.md lists and diffusers imports), installed with their
dependencies; then `KIT` is uninstalled again (typer 0.29 pulls in pydantic; the device's
older typer does not)."""

DEVICE = frozenset(
    {
        # Each one is in KINDS.md's list of the device's packages (read there 2026-11-17).
        "accelerate",
        "annotated-doc",
        "anyio",
        "certifi",
        "charset-normalizer",
        "click",
        "filelock",
        "fsspec",
        "h11",
        "hf-xet",
        "httpcore",
        "httpx",
        "huggingface-hub",
        "idna",
        "jinja2",
        "markdown-it-py",
        "markupsafe",
        "mdurl",
        "mpmath",
        "networkx",
        "numpy",
        "packaging",
        "pillow",
        "prometheus-client",
        "psutil",
        "pygments",
        "pyyaml",
        "regex",
        "requests",
        "rich",
        "safetensors",
        "sentencepiece",
        "setuptools",
        "shellingham",
        "sympy",
        "tokenizers",
        "torch",
        "tqdm",
        "transformers",
        "typer",
        "typing-extensions",
        "urllib3",
    }
)
"""Packages on the device that gpu_validate may import, directly or through another."""

PLATFORMS_GLIBC = "2.28"
"""Newest glibc the wheels may need (manylinux_2_N with N up to this). The device's is not
read yet; 2.28 is what the device tool's recipe names, and every wheel in the kit has a
build for it."""


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """`name==version` lines of a uv/pip-compile lock, by canonical name."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def kit_requirements(lock: Path = LOCK) -> list[str]:
    """`name==version` for each wheel of the kit; every one must be in the lock."""
    pins = locked_versions(lock)
    missing = [name for name in KIT if name not in pins]
    if missing:
        raise SystemExit(f"{lock} pins no version of {', '.join(missing)}: re-lock, or take it out of KIT")
    return [f"{name}=={pins[name]}" for name in KIT]


def platforms(glibc: str) -> list[str]:
    """pip's --platform values for x86-64 Linux up to `glibc` (pip matches each tag exactly)."""
    major, minor = (int(part) for part in glibc.split("."))
    if major != 2 or minor < 17:
        raise SystemExit(f"--glibc {glibc}: expected 2.17 or newer")
    tags = [f"manylinux_2_{n}_x86_64" for n in range(minor, 16, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def wheel_name(path: Path) -> str:
    """The canonical distribution name of a wheel file (its name up to the first dash)."""
    return canonical(path.name.split("-", 1)[0])


def download(dest: Path, python_version: str, glibc: str = PLATFORMS_GLIBC) -> list[Path]:
    """Download the kit's wheels for CPython `python_version` on x86-64 Linux into `dest`,
    replacing the wheels there; returns them, one per package of `KIT`."""
    requirements = kit_requirements()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        argv += ["--implementation", "cp", "--python-version", python_version]
        for tag in platforms(glibc):
            argv += ["--platform", tag]
        subprocess.run([*argv, "--dest", tmp, *requirements], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        got = sorted(wheel_name(w) for w in wheels)
        if got != sorted(KIT):
            raise SystemExit(f"expected one wheel of each of {sorted(KIT)}, pip saved {[w.name for w in wheels]}")
        for old in dest.glob("*.whl"):
            old.unlink()
        for wheel in wheels:
            shutil.move(wheel, dest / wheel.name)
    return sorted(dest / w.name for w in wheels)


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what a device call sends besides `carry`: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    paths = {root / name.decode() for name in listed.split(b"\0") if name}
    return sum(path.stat().st_size for path in paths if path.is_file() and not path.is_symlink())


def report(wheels: Sequence[Path], tree: int) -> bool:
    """Print the sizes; whether kit and tree fit in one call's carry."""
    kit = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / MIB:8.2f} MiB  {wheel.name}")
    print(f"{kit / MIB:8.2f} MiB  kit ({len(wheels)} wheels)")
    print(f"{tree / MIB:8.2f} MiB  working tree (tracked and untracked-not-ignored files)")
    fits = kit + tree <= CARRY_LIMIT
    verdict = "fits" if fits else "is OVER"
    print(f"{(kit + tree) / MIB:8.2f} MiB  together: {verdict} the {CARRY_LIMIT // MIB} MiB a device call carries")
    return fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST, help="folder for the wheels (default .whl/)")
    parser.add_argument("--python-version", default="3.12", help="target CPython, e.g. 3.12 (device), 3.11 (here)")
    parser.add_argument("--glibc", default=PLATFORMS_GLIBC, help="newest manylinux glibc the wheels may need")
    args = parser.parse_args(argv)
    wheels = download(args.dest.resolve(), args.python_version, args.glibc)
    return 0 if report(wheels, tree_bytes()) else 1


if __name__ == "__main__":
    sys.exit(main())
