"""Running a uvicorn server inside this process, on its event loop or on a thread.

The dev stack, the stand-in critic, the test stack and the tests' own small servers
all start servers the same way: wait until uvicorn says it is listening (or report
why it stopped), and stop it with a bounded graceful shutdown, since open SSE
streams must not keep a process alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import uvicorn

START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server inside a process that owns its signals (the dev stack, tests).

    uvicorn's own `serve` takes SIGINT and SIGTERM for itself while it runs: it stopped
    the gateway (the port closed) and left the rest of `gcr up` running, and where the
    shell ignores SIGINT (a background job of a non-interactive shell) its re-raise after
    the shutdown did nothing either. Here the process decides: it stops this server, and
    everything else, through the block that started it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def config(app: Any, port: int, host: str = "127.0.0.1", **options: Any) -> uvicorn.Config:
    values: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": 3, **options}
    return uvicorn.Config(app, host=host, port=port, **values)


async def start(server: uvicorn.Server) -> asyncio.Task[None]:
    """Serve on this event loop; returns once it listens. Raises if it stops before."""
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if task.done():
            await task
            raise RuntimeError(f"the server on port {server.config.port} stopped before it listened")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {server.config.port} did not start in {START_TIMEOUT_S:g}s")
        await asyncio.sleep(0.01)
    return task


@asynccontextmanager
async def serving(app: Any, port: int | None = None, **options: Any) -> AsyncIterator[str]:
    """`app` on a loopback port of this event loop for the length of the block; yields its URL."""
    server = EmbeddedServer(config(app, port or free_port(), **options))
    task = await start(server)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        await task


@contextmanager
def serving_in_thread(server: uvicorn.Server, sockets: list[socket.socket] | None = None) -> Iterator[None]:
    """Run `server` on a thread of its own (it keeps answering while the caller's loop is busy)."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, name="gcr-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {server.config.port} did not start")
            time.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)
