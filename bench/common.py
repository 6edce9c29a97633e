"""Shared pieces of the benchmarks: server subprocesses, a lean HTTP load client, output.

The servers a benchmark measures against (the gateway, the stand-in critic, the bare
reference endpoint) run as subprocesses under uvicorn on loopback, each as it would
in production: its own process and event loop, so that the process being measured
does not share its interpreter lock with them. They are started from `ROOT` so
`python -m uvicorn bench.common:gateway_app --factory` finds this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

# NOTE: redis is imported inside the functions that use it. bench/gpu_validate.py uses
# this module's output helpers on the GPU machine, which has no redis package (see
# bench/gpu_kit.py: every top-level import here is a wheel to carry there).

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
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
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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


# --- a lean HTTP/1.1 load client ----------------------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams.

    A load generator that shares two cores with the server it measures must cost as
    little CPU per request as possible; a full client (httpx) spends several times
    more than this on each request and would cap the measured throughput itself.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> HttpConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None, "use `async with`"
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + body)
        header = await self._reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if fields.get("transfer-encoding", "").lower() == "chunked":
            return status, await self._read_chunked()
        return status, await self._reader.readexactly(int(fields.get("content-length", "0")))

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


# --- reporting ---------------------------------------------------------------------------------


def machine_info(redis_url: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    import redis as redis_sync

    redis_version = "unknown"
    with contextlib.suppress(redis_sync.RedisError):
        client = redis_sync.Redis.from_url(redis_url)
        redis_version = str(client.info("server").get("redis_version", "unknown"))
        client.close()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpus_usable": usable,
        "redis_version": redis_version,
        # Other work on a small machine moves the numbers: this says how busy it was.
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


@dataclass(frozen=True)
class Column:
    """One column of a results table: a key of the row dicts and how to show it."""

    key: str
    title: str
    fmt: str = "{}"


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column.title, justify="right" if column.fmt != "{}" else "left")
    for row in rows:
        table.add_row(*(_cell(column, row.get(column.key)) for column in columns))
    Console().print(table)


def _cell(column: Column, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    try:
        return column.fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def write_json(path: Path | None, data: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
