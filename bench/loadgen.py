"""The load side of the benchmarks: a lean HTTP/1.1 client, and latency percentiles."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from bench.common import Column, print_table


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


def latency_percentiles(sorted_latencies: Sequence[float]) -> dict[str, float]:
    """p50, p95 and p99 of already sorted latencies (seconds), in milliseconds."""
    return {f"p{q}_ms": 1000 * percentile(sorted_latencies, q) for q in (50, 95, 99)}


LATENCY_COLUMNS = (
    Column("p50_ms", "p50 ms", "{:.2f}"),
    Column("p95_ms", "p95 ms", "{:.2f}"),
    Column("p99_ms", "p99 ms", "{:.2f}"),
)
"""`latency_percentiles` in a results table."""


def print_load_table(
    subject: str, result: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]
) -> None:
    """A table of load results, titled with its subject and how the load ran (the options
    `bench.gateway.add_load_options` gives): the operation, `columns`, the latency
    percentiles and the errors."""
    load = f"{result['clients']} clients, {result['requests']} requests x {result['repeats']} repeats per measurement"
    title = f"{subject}: {load}, loopback"
    print_table(
        title, [Column("op", "operation"), *columns, *LATENCY_COLUMNS, Column("errors", "errors", "{:d}")], rows
    )
