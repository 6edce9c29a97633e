"""The real `vllm serve` (vLLM's CPU build) on the tiny random-weight Qwen3-VL critic.

One server for the whole package (it takes 20-60 s to start and 3.5 GB), started with
the arguments `docker-compose.yml` gives vLLM (`service.cli.vllm_dev`); the restart
test brings it back with the Kubernetes manifest's. It is stopped when the package's
last test ends, so the rest of the suite never shares the CPU with it.

`pytestmark = VLLM` in each module: CI installs vLLM (scripts/setup-vllm), so only a
local run without it skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli.vllm_dev import VLLM_VENV, VllmServer, deployed_args, serve_args
from service.servers import free_port
from workers.critics.tiny_model import SERVED_NAME, build_tiny_critic

LOGS = Path(__file__).resolve().parents[1] / "artifacts" / "vllm"

VLLM = [
    pytest.mark.vllm,
    # The first test of the package also waits for the server to start.
    pytest.mark.timeout(420),
    pytest.mark.skipif(
        not (VLLM_VENV / "bin" / "vllm").exists() and not os.environ.get("CI"),
        reason="needs vLLM's CPU build (./scripts/setup-vllm; CI installs it)",
    ),
]


@pytest.fixture(scope="package")
def tiny_critic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_critic(tmp_path_factory.mktemp("critic") / "tiny-qwen3-vl")


def start_vllm(model: Path, name: str, *, source: str = "compose", replace: dict[str, str] | None = None) -> VllmServer:
    """A `vllm serve` of `model` with a deployment's arguments (`source`), ready to answer."""
    args = serve_args(deployed_args(source), model, free_port(), SERVED_NAME, replace)  # type: ignore[arg-type]
    server = VllmServer(args, LOGS / f"{name}.log")
    server.run_until_ready()
    return server


@pytest.fixture(scope="package")
def vllm(tiny_critic: Path) -> Iterator[VllmServer]:
    """The package's server, as docker-compose.yml starts vLLM (xgrammar for structured outputs)."""
    server = start_vllm(tiny_critic, "compose")
    yield server
    server.stop()
