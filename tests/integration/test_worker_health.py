"""The worker's liveness: /livez is answered by the event loop and asks the generator's
executor, and a stop signal while the model loads ends the worker at once, also as PID 1.

Real pieces throughout: the timed simulated generator behind the real scheduler, the
real HTTP server on loopback, and for the stop a real `gcr worker` process in a PID
namespace of its own (where it is PID 1, as in a container without an init).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from service.settings import Settings
from workers.generators.base import GenRequest
from workers.generators.simulated import SimulatedGenerator
from workers.health import HealthServer
from workers.scheduler import GenerationScheduler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def served() -> AsyncIterator[tuple[GenerationScheduler, str]]:
    # One step of 1.5 s: a call that makes no step for longer than the 0.3 s stall limit.
    scheduler = GenerationScheduler(SimulatedGenerator("sim:1.5", Settings(max_batch=1)), 1, 0.0)
    await scheduler.start()
    port = free_port()
    server = HealthServer(port, lambda: scheduler.alive(0.3), host="127.0.0.1")
    await server.start()
    try:
        yield scheduler, f"http://127.0.0.1:{port}"
    finally:
        await server.stop()
        await scheduler.stop()


async def test_livez_and_metrics_answer_while_the_loop_and_the_executor_work(
    served: tuple[GenerationScheduler, str],
) -> None:
    _, url = served
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        live = await http.get("/livez")
        assert live.status_code == 200, live.text
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and "gcr_generator_busy_seconds_total" in metrics.text
        assert (await http.get("/nope")).status_code == 404


async def test_livez_fails_while_a_generator_call_makes_no_step(served: tuple[GenerationScheduler, str]) -> None:
    scheduler, url = served
    call = asyncio.create_task(scheduler.generate([GenRequest(prompt="a cat", seed=1, steps=1)]))
    await asyncio.sleep(0.6)
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        live = await http.get("/livez")
        assert live.status_code == 503 and "made no step" in live.text
        [result] = await call
        assert result.image is not None
        assert (await http.get("/livez")).status_code == 200, "idle again once the call returns"


async def test_livez_does_not_answer_while_the_event_loop_is_blocked(served: tuple[GenerationScheduler, str]) -> None:
    """The old probe (/metrics from prometheus_client's own thread) answered here."""
    _, url = served

    def probe() -> int | str:
        try:
            return httpx.get(f"{url}/livez", timeout=0.5).status_code
        except httpx.TimeoutException:
            return "timeout"

    prober = asyncio.get_running_loop().run_in_executor(None, probe)
    time.sleep(1.2)  # noqa: ASYNC251 - blocking the loop is the point
    assert await prober == "timeout"


async def test_livez_fails_once_the_executor_is_shut_down() -> None:
    scheduler = GenerationScheduler(SimulatedGenerator("sim:0", Settings()), 1, 0.0)
    await scheduler.start()
    assert (await scheduler.alive(1.0))[0]
    await scheduler.stop()
    ok, reason = await scheduler.alive(1.0)
    assert not ok and "shut down" in reason


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
@pytest.mark.timeout(60)
def test_a_worker_stopped_while_loading_exits_at_once_even_as_pid_1() -> None:
    """PID 1 ignores a signal it has no handler for: before its model loads, the worker had
    none, so a stop waited the whole grace period. Loading here hangs (as a long download
    does) because the generator's loader is made to block."""
    driver = (
        "import asyncio, logging, threading, service.cli.main as cli, workers.generators as g\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "g.load_generator = lambda settings: threading.Event().wait()\n"
        "print('loading', flush=True)\n"
        "asyncio.run(cli.run_worker(cli.WorkerSettings(generator='sim:0', redis_url='redis://127.0.0.1:1/0')))\n"
    )
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", driver],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "loading"
        time.sleep(1.0)  # into the load
        # unshare forwards nothing: signal the namespace's PID 1 (the worker) itself.
        [child] = [
            int(pid)
            for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        ]
        started = time.monotonic()
        os.kill(child, signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
        assert time.monotonic() - started < 5
        assert proc.returncode == 128 + signal.SIGTERM, output
        assert "SIGTERM while loading the model" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def test_the_metrics_port_listens_on_this_host_only_unless_told() -> None:
    assert Settings().worker_metrics_host == "127.0.0.1"
    async def alive() -> tuple[bool, str]:
        return True, "ok"

    server = HealthServer(free_port(), alive)
    await server.start()
    try:
        assert server._server is not None
        assert {sock.getsockname()[0] for sock in server._server.sockets} == {"127.0.0.1"}
    finally:
        await server.stop()
