"""The SDK stands alone: its wheel, installed into an empty virtualenv, pulls httpx,
httpx-sse and pydantic (and what they need) and nothing of the server, and runs a job
against a live stack from there, where `service` and `workers` cannot be imported.

Real wheel (sdk/pyproject.toml built by pip), real venv, real pip from the package
index, real gateway and worker on loopback.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
SERVER_STACK = {"fastapi", "redis", "torch", "diffusers", "click", "uvicorn", "starlette", "pydantic-settings"}

# Run by the venv's own Python: the closure of gcr-sdk's requirements whose markers hold
# there (pip's vendored `packaging` reads them; the venv has nothing else).
CLOSURE = """
import importlib.metadata as md, json
from pip._vendor.packaging.requirements import Requirement
def wanted(current):
    for text in md.requires(current) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            yield requirement.name.lower().replace("_", "-")
seen, todo = set(), ["gcr-sdk"]
while todo:
    current = todo.pop()
    if current not in seen:
        seen.add(current)
        todo += list(wanted(current))
installed = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
direct = sorted(Requirement(r).name for r in md.requires("gcr-sdk") or [])
print(json.dumps({"closure": sorted(seen), "installed": sorted(installed), "direct": direct}))
"""

JOB = """
import importlib.util, sys
import gcr
assert importlib.util.find_spec("service") is None and importlib.util.find_spec("workers") is None
client = gcr.Client(sys.argv[1])
job = client.generate("a red cube on a table", loop={"max_rounds": 2, "threshold": 1.0}, wait=120)
png = client.best_image(job.id)
print(job.status, len(job.rounds), png[:8] == b"\\x89PNG\\r\\n\\x1a\\n", gcr.__file__)
"""


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.timeout(300)
async def test_the_sdk_wheel_installs_alone_and_runs_a_job(stack: Stack, tmp_path: Path) -> None:
    await stack.start_worker(generator="sim:0.05")
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    await asyncio.to_thread(
        run, sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT / "sdk"), cwd=tmp_path
    )
    [wheel] = wheels.glob("gcr_sdk-*.whl")
    await asyncio.to_thread(run, sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = str(venv / "bin" / "python")
    lock = str(ROOT / "constraints" / "lock.txt")
    await asyncio.to_thread(run, python, "-m", "pip", "install", "-q", "-c", lock, str(wheel), cwd=tmp_path)

    report = json.loads(await asyncio.to_thread(run, python, "-c", CLOSURE, cwd=tmp_path))
    assert report["direct"] == ["httpx", "httpx-sse", "pydantic"]
    extra = set(report["installed"]) - set(report["closure"]) - {"pip", "setuptools"}
    assert extra == set(), f"installed beyond the SDK's own dependencies: {extra}"
    assert not SERVER_STACK & set(report["installed"])

    process = await asyncio.create_subprocess_exec(
        python,
        "-c",
        JOB,
        stack.url,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode == 0, err.decode()[-3000:]
    status, rounds, is_png, where = out.decode().split()
    assert (status, rounds, is_png) == ("succeeded", "2", "True")
    assert where.startswith(str(venv))  # the installed wheel, not the repository's gcr/
