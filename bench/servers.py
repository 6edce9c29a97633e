"""The servers a benchmark measures against, as subprocesses: the gateway, the stand-in
critic, the bare reference endpoint.

Each runs under uvicorn on loopback, as it would in production: its own process and
event loop, so that the process being measured does not share its interpreter lock
with them. They are started from `ROOT` so `python -m uvicorn bench.servers:gateway_app
--factory` finds this package.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from bench.common import ROOT

STARTUP_TIMEOUT_S = 30.0


# --- uvicorn factories (zero-argument: uvicorn --factory calls them in the subprocess) ------


def gateway_app() -> Any:
    """The real gateway, configured from `GCR_*` variables like `gcr serve`."""
    from service.gateway.app import create_app
    from service.settings import Settings

    return create_app(Settings())


# --- server subprocesses ----------------------------------------------------------------------


def uvicorn_argv(factory: str, port: int, *, access_log: bool = False) -> list[str]:
    """`python -m uvicorn FACTORY --factory` on loopback, one process, quiet unless asked."""
    argv = [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "warning"]
    if not access_log:
        argv.append("--no-access-log")
    return argv


@contextlib.contextmanager
def server_process(
    name: str, argv: Sequence[str], health_url: str, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server subprocess until the block ends; waits until `health_url` answers."""
    log: IO[bytes] = tempfile.TemporaryFile()  # closed in finally
    proc = subprocess.Popen(
        list(argv), cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        with httpx.Client(timeout=1.0) as poller:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer {health_url} in {STARTUP_TIMEOUT_S:.0f}s:\n{_tail(log)}")
                try:
                    if poller.get(health_url).status_code < 500:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        reap(proc, 10)
        log.close()


def reap(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """Wait for a process told to stop; kill it once `grace_s` seconds have passed."""
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Server:
    """A server subprocess on a loopback port."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def gateway_server(
    redis_url: str, prefix: str, *, factory: str = "bench.servers:gateway_app", name: str = "gateway", **env: str
) -> Iterator[Server]:
    """The gateway (or an app that stands for it) under uvicorn on a free port, its Redis keys
    under `prefix`; they are deleted once it stopped."""
    from service.jobs.connection import delete_prefix
    from service.servers import free_port

    port = free_port()
    try:
        with server_process(
            name,
            uvicorn_argv(factory, port),
            f"http://127.0.0.1:{port}/healthz",
            env=gateway_env(redis_url, prefix, **env),
        ) as process:
            yield Server(port, process)
    finally:
        delete_prefix(redis_url, prefix)


@contextlib.contextmanager
def standin_critic(latency_s: float, score: float) -> Iterator[Server]:
    """The stand-in critic (`gcr dev standin-critic`) in a subprocess: it answers every
    critique with `score` after `latency_s` seconds."""
    from service.servers import free_port
    from workers.critics.standin_config import StandinConfig

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gcr-bench-") as tmp:
        config = Path(tmp) / "standin.json"
        config.write_text(json.dumps(StandinConfig(latency_s=latency_s, default=score).model_dump(mode="json")))
        argv = [
            sys.executable,
            "-m",
            "service.cli",
            "dev",
            "standin-critic",
            "--port",
            str(port),
            "--config",
            str(config),
        ]
        with server_process("stand-in critic", argv, f"http://127.0.0.1:{port}/health") as process:
            yield Server(port, process)


def _tail(log: IO[bytes], chars: int = 3000) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]


def gateway_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """`GCR_*` for a benchmark gateway: no auth, no rate limit, a queue that never fills."""
    return {
        "GCR_REDIS_URL": redis_url,
        "GCR_REDIS_PREFIX": prefix,
        "GCR_AUTH_DISABLED": "true",
        "GCR_RATE_LIMIT_PER_S": "0",
        "GCR_QUEUE_MAX": str(10**9),
        "GCR_LOG_FORMAT": "text",
        **extra,
    }
