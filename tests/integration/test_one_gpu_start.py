"""On one GPU the worker loads its model only once the critic answers
(GCR_CRITIC_WAIT_BEFORE_LOAD, set by deploy/one-gpu.env): after a host reboot both
containers start at once, and vLLM profiling while the worker loads would count the
worker's memory as its own (vllm-project/vllm#55827).

A real `gcr worker` process (the simulated generator) against a real HTTP server that
starts answering late; a SIGTERM while it waits ends it at once.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.unit.test_deploy_files import ONE_GPU_ENV, read_env_file

ROOT = Path(__file__).resolve().parents[2]


class Models(http.server.BaseHTTPRequestHandler):
    """What the worker probes: `GET {critic}/models` answers 200 once vLLM is up."""

    def do_GET(self) -> None:
        body = b'{"object": "list", "data": []}'
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def waiting_worker(redis_url: str, redis_prefix: str, critic_port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        cwd=ROOT,
        env={
            **os.environ,
            "GCR_REDIS_URL": redis_url,
            "GCR_REDIS_PREFIX": redis_prefix,
            "GCR_GENERATOR": "sim:0.01",
            "GCR_CRITIC_BASE_URL": f"http://127.0.0.1:{critic_port}/v1",
            "GCR_CRITIC_WAIT_BEFORE_LOAD": "true",
            "GCR_LOG_FORMAT": "text",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], text: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} not seen in:\n{''.join(lines)}")


def test_the_one_gpu_env_file_makes_the_worker_wait() -> None:
    assert read_env_file(ONE_GPU_ENV)["GCR_CRITIC_WAIT_BEFORE_LOAD"] == "true"


@pytest.mark.timeout(60)
def test_the_worker_loads_only_once_the_critic_answers(redis_url: str, redis_prefix: str) -> None:
    port = free_port()
    proc = waiting_worker(redis_url, redis_prefix, port)
    server = None
    try:
        before = read_until(proc, "waiting for the critic", 30)
        time.sleep(6)  # vLLM still loading: nothing answers, nothing is loaded
        assert proc.poll() is None
        assert not any("loaded generator" in line for line in before)
        up_at = time.monotonic()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Models)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        after = read_until(proc, "loaded generator", 30)
        assert time.monotonic() >= up_at
        assert not any("loaded generator" in line for line in after[:-1])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        if server is not None:
            server.shutdown()
            server.server_close()


@pytest.mark.timeout(60)
def test_the_waiting_worker_stops_on_sigterm(redis_url: str, redis_prefix: str) -> None:
    proc = waiting_worker(redis_url, redis_prefix, free_port())
    read_until(proc, "waiting for the critic", 30)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - started < 5
