"""Shared fixtures: a real Redis (own key prefix per test), the stand-in critic over
real HTTP, and an in-process stack (gateway under uvicorn on loopback + worker)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis as redis_sync

from service.jobs.connection import delete_prefix
from service.servers import free_port
from tests.stack import Stack
from workers.critics.standin import running_standin

REDIS_URL = os.environ.get("GCR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis_sync.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis_sync.RedisError as exc:
        pytest.fail(f"no Redis at {REDIS_URL} ({exc}); .ci/run starts one, or set GCR_TEST_REDIS_URL")
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; only its keys are deleted afterwards."""
    prefix = f"gcr-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefix(redis_url, prefix)


@pytest.fixture
def standin_url() -> Iterator[str]:
    with running_standin() as url:
        yield url


@pytest.fixture
async def stack(redis_url: str, redis_prefix: str, standin_url: str) -> AsyncIterator[Stack]:
    async with Stack(redis_url, redis_prefix, standin_url) as running:
        yield running


@pytest.fixture
def own_redis() -> Iterator[tuple[str, tuple[Callable[[], None], Callable[[], None]]]]:
    """A redis-server with AOF (appendfsync always) that the test can kill and restart."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; scripts/ensure-redis installs it")
    port = free_port()
    folder = tempfile.mkdtemp(prefix="gcr-aof-")
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        folder,
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]
    procs: list[subprocess.Popen[bytes]] = []
    url = f"redis://127.0.0.1:{port}/0"

    def start() -> None:
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_sync.Redis.from_url(url).ping()
                return
            except redis_sync.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill() -> None:
        procs[-1].kill()
        procs[-1].wait()

    start()
    yield url, (start, kill)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shutil.rmtree(folder, ignore_errors=True)
