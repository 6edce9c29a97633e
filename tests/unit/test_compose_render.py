"""Every supported compose combination, rendered by the engines users run it with.

`docker compose config` (Docker Compose v2, >= 2.24.4) and `podman-compose config` each
merge the files, apply `!reset`/`!override` and substitute variables. Each tool that
is installed renders every combination of tests/unit/test_deploy_files.py, and what it
renders must agree with the merge those wiring tests check: the same services, images,
commands, dependencies, environment and GPUs. Where a tool is missing its tests skip
and say so (podman-compose needs the podman binary, which CI installs in
scripts/test-containers, run first by .ci/run; scripts/test fetches Docker Compose's
binary where Docker's is missing).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy_files import COMBINATIONS, ROOT, active, gpu_ids, load_combination, services


def _podman_compose() -> list[str] | None:
    if shutil.which("podman") is None:
        return None
    return [sys.executable, "-m", "podman_compose"]


def _docker_compose() -> list[str] | None:
    """Docker Compose v2: the `docker compose` plugin, or its standalone binary
    (scripts/test puts one on PATH where Docker's own is missing)."""
    for tool in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(tool[0]) is None:
            continue
        probe = subprocess.run([*tool, "version", "--short"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2."):
            return tool
    return None


TOOLS = {"podman-compose": _podman_compose, "docker compose": _docker_compose}


def render(tool: list[str], combination: str) -> dict[str, Any]:
    paths, env_file = COMBINATIONS[combination]
    args = [*tool]
    if env_file is not None:
        args += ["--env-file", str(env_file)]
    for path in paths:
        args += ["-f", str(path)]
    done = subprocess.run([*args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(tool)} cannot read {combination}:\n{done.stderr[-2000:]}"
    rendered = yaml.safe_load(done.stdout)
    assert isinstance(rendered, dict)
    return rendered


def _environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def _words(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [str(part) for part in value] if isinstance(value, list) else str(value).split()


def facts(service: dict[str, Any]) -> dict[str, Any]:
    """What a service runs and needs, in a form both tools and our merge agree on."""
    return {
        "image": service.get("image"),
        "entrypoint": _words(service.get("entrypoint")),
        "command": _words(service.get("command")),
        "depends_on": sorted(service.get("depends_on") or []),
        "environment": _environment(service),
        "gpus": gpu_ids(service),
        "volumes": sorted(
            str(v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}").split(":")[1]
            for v in service.get("volumes") or []
        ),
    }


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
@pytest.mark.parametrize("tool_name", sorted(TOOLS))
def test_each_engine_renders_what_the_wiring_tests_check(tool_name: str, combination: str) -> None:
    tool = TOOLS[tool_name]()
    if tool is None:
        pytest.skip(f"{tool_name} is not installed here")
    rendered = services(render(tool, combination))
    ours = load_combination(combination)
    # Docker leaves out services of inactive profiles; podman-compose lists them all.
    assert active(ours) <= set(rendered) <= set(services(ours))
    for name in active(ours):
        assert facts(rendered[name]) == facts(services(ours)[name]), f"{tool_name}, {combination}: {name}"


def test_podman_compose_refuses_a_nested_mapping_under_override(tmp_path: Path) -> None:
    """Why the overlays never put a mapping under `!override`: the trap this file guards."""
    tool = _podman_compose()
    if tool is None:
        pytest.skip("podman-compose needs podman, which is not installed here")
    overlay = tmp_path / "overlay.yml"
    overlay.write_text(
        "services:\n  worker:\n    depends_on: !override\n      redis:\n        condition: service_healthy\n"
    )
    done = subprocess.run(
        [*tool, "-f", str(ROOT / "docker-compose.yml"), "-f", str(overlay), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "AttributeError" in done.stderr
