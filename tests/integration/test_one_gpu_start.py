"""On one GPU the worker waits for vLLM's /health before it loads (deploy/compose.one-gpu.yml):
after a host reboot both containers start at once, and vLLM profiling while the worker
loads would count the worker's memory as its own (vllm-project/vllm#55827).

The overlay's own entrypoint script runs here in `sh`, as the container runs it, with a
stand-in `gcr` on PATH and a real HTTP server that starts answering /health late."""

from __future__ import annotations

import http.server
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.unit.test_deploy_files import ONE_GPU


class ComposeLoader(yaml.SafeLoader):  # type: ignore[misc]  # types-PyYAML is not installed
    """Reads compose's `!override` and `!reset` tags as the plain values they carry."""


ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node))
ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def entrypoint_script() -> str:
    entrypoint = yaml.load(ONE_GPU.read_text(), Loader=ComposeLoader)["services"]["worker"]["entrypoint"]
    assert entrypoint[:2] == ["sh", "-c"]
    script: str = entrypoint[2]
    return script.replace("$$", "$")  # compose's escape for a literal $, as compose reads it


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(60)
def test_the_one_gpu_worker_loads_only_once_vllm_answers_health(tmp_path: Path) -> None:
    fake = tmp_path / "gcr"
    fake.write_text(f"#!/bin/sh\necho \"gcr $1 started at $({sys.executable} -c 'import time; print(time.time())')\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {
        **os.environ,
        "PATH": f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "VLLM_HEALTH_URL": f"http://127.0.0.1:{port}/health",
    }
    proc = subprocess.Popen(
        ["sh", "-c", entrypoint_script()], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    server = None
    try:
        time.sleep(6)  # vLLM still loading: nothing answers
        assert proc.poll() is None, proc.communicate()
        up_at = time.time()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if server is not None:
            server.shutdown()
            server.server_close()
    assert proc.returncode == 0, err
    assert "waiting for vLLM" in err
    assert out.startswith("gcr worker started at ")
    assert float(out.split()[-1]) >= up_at


@pytest.mark.timeout(30)
def test_the_waiting_worker_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        ["sh", "-c", entrypoint_script()],
        env={
            **os.environ,
            "VLLM_HEALTH_URL": "http://127.0.0.1:9/health",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    started = time.monotonic()
    proc.terminate()
    proc.communicate(timeout=10)
    assert proc.returncode == 143 and time.monotonic() - started < 8  # at most one probe and the trap
