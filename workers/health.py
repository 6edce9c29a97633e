"""The worker's HTTP port: `/metrics` for Prometheus and `/livez` for the liveness probe.

Both are answered by the worker's own event loop, so an answer proves the loop runs:
a loop blocked by a stray synchronous call, or a process whose only live thread is a
metrics thread, does not answer and is restarted. `/livez` also asks the generator's
executor (`GenerationScheduler.alive`): idle, it must run a no-op; busy, its call must
have made a denoising step within `GCR_WORKER_STALL_S`. A hung GPU call fails it.

h11 (already installed with httpx) speaks HTTP/1.1; asyncio streams do the I/O. Not
prometheus_client's server, which answers from a thread of its own whatever the loop
does, and not uvicorn, whose `serve()` takes over SIGTERM from the worker's drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger("gcr.worker")

LivenessCheck = Callable[[], Awaitable[tuple[bool, str]]]
READ_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 16 * 1024


class HealthServer:
    """Serves `/metrics` and `/livez` on `port` from the running event loop."""

    def __init__(self, port: int, alive: LivenessCheck, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.alive = alive
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                request = await _read_request(conn, reader)
            if request is None:
                return
            status, content_type, body = await self._answer(request)
            headers = [("content-type", content_type), ("content-length", str(len(body))), ("connection", "close")]
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        except (TimeoutError, ConnectionError, h11.RemoteProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, request: h11.Request) -> tuple[int, str, bytes]:
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            return 405, "text/plain; charset=utf-8", b"GET only\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/livez":
            ok, reason = await self.alive()
            if not ok:
                log.error("liveness check failed: %s", reason)
            return (200 if ok else 503), "text/plain; charset=utf-8", f"{reason}\n".encode()
        return 404, "text/plain; charset=utf-8", b"not found: /metrics or /livez\n"


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(4096))
        elif isinstance(event, h11.Request):
            return event
        else:
            return None  # closed before a request: a TCP probe
