"""How the tests and `gcr up --dev --critic vllm` start the real `vllm serve`: with the
deployments' own arguments, changed only by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from service.cli import vllm_dev
from service.cli.main import main
from service.cli.vllm_dev import GPU_ONLY_FLAGS, VllmMissing, deployed_args, serve_args


def _flags(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    rest = iter(args[1:])
    for flag in rest:
        out[flag] = None if flag == "--enforce-eager" else next(rest)
    return out


def test_compose_and_kubernetes_start_vllm_alike() -> None:
    compose, k8s = deployed_args("compose"), deployed_args("k8s")
    assert compose == k8s  # model, served name and every flag: neither file drifts from the other


def test_the_deployed_arguments_name_the_structured_outputs_backend() -> None:
    flags = _flags(deployed_args("compose"))
    assert json.loads(flags["--structured-outputs-config"] or "{}") == {"backend": "xgrammar"}


def test_serve_args_change_only_model_name_address_and_gpu_flags(tmp_path: Path) -> None:
    deployed = deployed_args("compose")
    args = serve_args(deployed, tmp_path, 8123, "tiny")
    assert args[0] == str(tmp_path)
    flags, original = _flags(args), _flags(deployed)
    assert flags.pop("--served-model-name") == "tiny" and flags.pop("--port") == "8123"
    assert flags.pop("--host") == "127.0.0.1"
    assert "--enforce-eager" in flags and flags.pop("--enforce-eager") is None
    assert not set(GPU_ONLY_FLAGS) & set(flags)
    for flag in ("--served-model-name", "--port", "--host", *GPU_ONLY_FLAGS):
        original.pop(flag, None)
    assert flags == original  # context length, image limits, backend: as deployed


def test_serve_args_replace_a_flag_by_name(tmp_path: Path) -> None:
    args = serve_args(deployed_args("compose"), tmp_path, 1, "tiny", {"--max-model-len": "3072"})
    assert _flags(args)["--max-model-len"] == "3072"


def test_a_missing_vllm_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_dev, "VLLM_VENV", tmp_path / "none")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(VllmMissing, match=r"\./scripts/setup-vllm"):
        vllm_dev.vllm_binary()
    result = CliRunner().invoke(main, ["up", "--dev", "--critic", "vllm", "--port", "0"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: vLLM is not installed: install it with ./scripts/setup-vllm "
        "(vLLM's CPU build in .tools/vllm, ~3.5 min)"
    ]
