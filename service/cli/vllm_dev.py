"""A real `vllm serve` on this machine, serving the tiny Qwen3-VL critic.

For the tests and `gcr up --dev --critic vllm`: vLLM's CPU build (`.tools/vllm`, made
by `scripts/setup-vllm`) runs with the arguments the deployments give it, read from
`docker-compose.yml` or the Kubernetes manifest (so that what is tested cannot drift
from what is deployed), with three changes, each by name:
- the model (a path or hub id there) is the tiny critic's folder, served under
  `SERVED_NAME` so that no job records a random model as RationalRewards;
- the flags that only mean something on a GPU (`GPU_ONLY_FLAGS`) are dropped;
- `--host` and `--port` are loopback and a free port, and `--enforce-eager` is added
  (on this model it serves as fast and starts ~30 s sooner than with torch.compile).

The weights are random: this proves the protocol and the server (templates, one or two
images, limits, structured outputs, restarts), never a judgment.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO / ".tools" / "vllm"
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S_FILE = REPO / "deploy" / "k8s" / "critic" / "vllm.yaml"
INSTALL_HINT = "install it with ./scripts/setup-vllm (vLLM's CPU build in .tools/vllm, ~3.5 min)"

GPU_ONLY_FLAGS = ("--gpu-memory-utilization",)
"""Flags of the deployments that only mean something on a GPU; each takes one value."""

Source = Literal["compose", "k8s"]

# The CPU build's own settings: a KV cache of 1 GiB (the default takes far more), the
# loopback address, and no hub.
_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
_DEFAULT = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}")


class VllmMissing(RuntimeError):
    """vLLM is not installed where this looks for it."""


def vllm_binary() -> Path:
    """The `vllm` command of `.tools/vllm`, else the one on PATH; `VllmMissing` says how to install it."""
    local = VLLM_VENV / "bin" / "vllm"
    if local.exists():
        return local
    found = shutil.which("vllm")
    if found is None:
        raise VllmMissing(f"vLLM is not installed: {INSTALL_HINT}")
    return Path(found)


def deployed_args(source: Source = "compose") -> list[str]:
    """What `vllm serve` is given in `docker-compose.yml` (its `command`, with each
    `${VAR:-default}` at its default) or in the Kubernetes manifest (the container's `args`)."""
    import yaml  # the dev extra: this runs from a clone, beside its deploy files

    if source == "compose":
        if not COMPOSE_FILE.exists():
            raise VllmMissing(f"{COMPOSE_FILE} is missing: the real-vLLM dev stack runs from a clone of gcr")
        command = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["vllm"]["command"]
        return [_DEFAULT.sub(lambda m: m[1], str(item)) for item in command]
    for document in yaml.safe_load_all(K8S_FILE.read_text()):
        if document and document.get("kind") == "Deployment":
            container = document["spec"]["template"]["spec"]["containers"][0]
            return [str(item) for item in container["args"]]
    raise ValueError(f"{K8S_FILE} has no Deployment")


def serve_args(
    deployed: list[str], model_dir: Path, port: int, served_name: str, replace: dict[str, str] | None = None
) -> list[str]:
    """`deployed` (model first, then flags with their values) for this machine: see the module docstring.
    `replace` sets flags to other values (a test's smaller limits), adding the missing ones."""
    flags: dict[str, str | None] = {}
    rest = iter(deployed[1:])
    for flag in rest:
        if not flag.startswith("--"):
            raise ValueError(f"unexpected argument {flag!r} in vLLM's deployed arguments")
        value = None if flag == "--enforce-eager" else next(rest)
        if flag not in GPU_ONLY_FLAGS:
            flags[flag] = value
    flags.update(
        {
            "--served-model-name": served_name,
            "--host": "127.0.0.1",
            "--port": str(port),
            "--enforce-eager": None,
            **(replace or {}),
        }
    )
    args = [str(model_dir)]
    for flag, value in flags.items():
        args += [flag] if value is None else [flag, value]
    return args


@dataclass
class VllmServer:
    """One `vllm serve` process; `start`, `wait_ready`, `kill` (SIGKILL, as a crash), `stop`."""

    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def port(self) -> int:
        return int(self.args[self.args.index("--port") + 1])

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base (GCR_CRITIC_BASE_URL)."""
        return f"{self.root_url}/v1"

    def start(self) -> None:
        binary = vllm_binary()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, **_CPU_ENV}
        self.started_at = time.monotonic()
        # Its own process group: vLLM's engine runs in child processes, which a kill must reach.
        self.proc = subprocess.Popen(
            [str(binary), "serve", *self.args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Until `GET /health` answers 200; returns the seconds since `start`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited before it was ready; its log: {self.log_path}\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.root_url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve was not ready within {timeout_s:g} s; its log: {self.log_path}")

    def run_until_ready(self) -> float:
        """`start`, then `wait_ready` (its seconds); stopped again if it never gets ready."""
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or an OOM kill would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGKILL:
            self.proc.wait(20)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
