"""Open streams benchmark: POST /generate and GET /jobs/{id} latency with 1,000 event
streams held open on the same gateway, beside the same load on the idle gateway.

    python bench/streams.py --streams 1000 --json streams.json

One real gateway (`gcr serve`'s app under uvicorn, a subprocess, one process, loopback)
on the configured Redis under a key prefix of its own (deleted at the end), with its
default Redis pool (200 connections). An idle heartbeat stands for a worker, so the
gateway admits jobs, and nothing runs them: their event streams stay quiet, which is
what a job waiting in the queue or on a long critique looks like.

1. `--streams` jobs are submitted.
2. Idle: `--requests` submits and `--requests` polls are timed from `--clients`
   keep-alive connections.
3. With streams: one `GET /jobs/{id}/events` stream per job is opened (each its own
   connection, status 200 checked) and held while the same submits and polls are
   timed again; then the streams are closed. Steps 2 and 3 alternate `--repeats`
   times, so that drift in the machine's load hits both alike; percentiles are over
   all repeats of a phase.
4. With the last streams still open, `--probe` of the jobs are cancelled: their
   streams must deliver `end` within 5 s (the streams were live, not stuck).
The run fails (exit 1) on any 5xx, a stream not opened with 200 or closed early, a probe
that does not end, or a p95 with streams above 2x the idle one. It stops by itself: each phase is
capped by `--max-seconds`, the whole run by `--deadline`. `ulimit -n` is raised to the
hard limit first (one socket per stream on each side).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.common import Column, argument_parser, finish, print_targets, run_info  # noqa: E402
from bench.gateway import add_load_options, idle_worker, load, poll_request, run_loop, submit_request  # noqa: E402
from bench.loadgen import HttpConnection, latency_percentiles, print_load_table  # noqa: E402
from bench.servers import gateway_server  # noqa: E402

TARGET_FACTOR = 2.0
PROBE_END_S = 5.0


def raise_open_files(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < needed:
        raise SystemExit(f"ulimit -n is {soft}; {needed} open files are needed (raise the hard limit)")
    return soft


class Stream:
    """One open `GET /jobs/{id}/events` on its own connection, read in the background."""

    def __init__(self, port: int, job_id: str) -> None:
        self.port, self.job_id = port, job_id
        self.status = 0
        self.ended = asyncio.Event()
        self.pings = 0
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(
            f"GET /jobs/{self.job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        if self.status == 200:
            self._task = asyncio.create_task(self._drain(reader))

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                if line.startswith(b":"):
                    self.pings += 1
                elif line.startswith(b"event: end"):
                    self.ended.set()
                    return

    @property
    def reading(self) -> bool:
        """The connection is open and the server has not closed it."""
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


def summary(samples: Sequence[Any]) -> dict[str, Any]:
    latencies = sorted(x for sample in samples for x in sample.latencies)
    return {
        "requests": len(latencies),
        "errors": sum(sample.errors for sample in samples),
        **latency_percentiles(latencies),
        "max_ms": 1000 * latencies[-1] if latencies else 0.0,
    }


async def timed_load(args: argparse.Namespace, port: int, ids: list[str], tag: str) -> dict[str, Any]:
    options = {"total": args.requests, "clients": args.clients, "max_seconds": args.max_seconds}
    return {
        "submit": await load(port, submit_request(tag), **options, expect=202),
        "poll": await load(port, poll_request(ids), **options, expect=200),
    }


async def open_streams(args: argparse.Namespace, port: int, ids: list[str]) -> list[Stream]:
    streams = [Stream(port, job_id) for job_id in ids]
    for start in range(0, len(streams), args.open_batch):
        await asyncio.gather(*(s.open() for s in streams[start : start + args.open_batch]))
    return streams


async def measure(args: argparse.Namespace, port: int, prefix: str) -> dict[str, Any]:
    streams: list[Stream] = []
    samples: dict[str, dict[str, list[Any]]] = {phase: {"submit": [], "poll": []} for phase in ("idle", "with_streams")}
    opened, refused, survived, open_s, pings = 0, [], 0, [], 0
    try:
        async with asyncio.timeout(args.deadline), idle_worker(args.redis_url, prefix):
            # The jobs the streams follow; their submits warm the gateway up too.
            made = await load(port, submit_request("job"), total=args.streams, clients=args.clients,
                              max_seconds=args.deadline, expect=202, keep=True)  # fmt: skip
            ids = [json.loads(body)["id"] for body in made.bodies]
            if len(ids) < args.streams:
                raise RuntimeError(f"only {len(ids)} of {args.streams} jobs were accepted")
            # Idle and with streams alternate, so that drift in the machine's load hits both alike.
            for repeat in range(args.repeats):
                for op, sample in (await timed_load(args, port, ids, f"idle{repeat}")).items():
                    samples["idle"][op].append(sample)
                started = time.perf_counter()
                streams = await open_streams(args, port, ids)
                open_s.append(time.perf_counter() - started)
                refused += [s.status for s in streams if s.status != 200]
                opened += sum(1 for s in streams if s.status == 200)
                for op, sample in (await timed_load(args, port, ids, f"streams{repeat}")).items():
                    samples["with_streams"][op].append(sample)
                survived += sum(1 for s in streams if s.status == 200 and not s.ended.is_set() and s.reading)
                pings += sum(s.pings for s in streams)
                if repeat < args.repeats - 1:
                    await asyncio.gather(*(s.close() for s in streams))
                    streams = []

            # Probes: cancelling a job must end its stream at once.
            probes = streams[: args.probe]
            async with HttpConnection("127.0.0.1", port) as conn:
                for probe in probes:
                    await conn.request("DELETE", f"/jobs/{probe.job_id}")
            ended = await asyncio.gather(
                *(asyncio.wait_for(p.ended.wait(), PROBE_END_S) for p in probes), return_exceptions=True
            )
            probes_ended = sum(1 for e in ended if e is True)
    finally:
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
    return {
        **{phase: {op: summary(s) for op, s in by_op.items()} for phase, by_op in samples.items()},
        "repeats": args.repeats,
        "streams_opened": opened,
        "streams_refused": refused[:10],
        "streams_open_after_load": survived,
        "open_s": open_s,
        "keepalives_seen": pings,
        "probes": len(probes),
        "probes_ended": probes_ended,
    }


def verdict(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for op in ("submit", "poll"):
        idle, busy = result["idle"][op]["p95_ms"], result["with_streams"][op]["p95_ms"]
        factor = busy / idle if idle else float("inf")
        rows.append({"metric": f"{op} p95 with streams / idle", "value": factor, "target": "<= 2", "ok": factor <= 2})
    errors = sum(result[phase][op]["errors"] for phase in ("idle", "with_streams") for op in ("submit", "poll"))
    rows.append({"metric": "requests not 2xx (5xx included)", "value": errors, "target": "0", "ok": errors == 0})
    expected = result["streams"] * result["repeats"]
    opened, survived = result["streams_opened"], result["streams_open_after_load"]
    rows.append({"metric": "streams opened with 200", "value": opened, "target": str(expected),
                 "ok": opened == expected})  # fmt: skip
    rows.append({"metric": "streams still open after the load", "value": survived, "target": str(expected),
                 "ok": survived == expected})  # fmt: skip
    rows.append(
        {"metric": "cancelled jobs whose stream ended", "value": result["probes_ended"],
         "target": str(result["probes"]), "ok": result["probes_ended"] == result["probes"]}
    )  # fmt: skip
    return rows


def show(result: dict[str, Any]) -> None:
    rows = [
        {"phase": phase, "op": op, **result[phase][op]}
        for op in ("submit", "poll")
        for phase in ("idle", "with_streams")
    ]
    columns = [Column("phase", "phase"), Column("requests", "requests", "{:d}"), Column("max_ms", "max ms", "{:.1f}")]
    print_load_table(f"one gateway, {result['streams']} open event streams vs idle", result, rows, columns)
    print_targets(
        [{**row, "value": f"{row['value']:.2f}" if isinstance(row["value"], float) else row["value"]}
         for row in result["targets"]],
        value_fmt="{}",
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--streams", type=int, default=1000, help="event streams held open (default 1000)")
    add_load_options(parser, clients=8, requests=1000, max_seconds=30.0, alternating="idle and with streams")
    parser.add_argument("--probe", type=int, default=20, help="jobs cancelled at the end to check their streams")
    parser.add_argument("--open-batch", type=int, default=100, help="streams opened at once (default 100)")
    parser.add_argument("--deadline", type=float, default=300.0, help="cap on the whole run, in seconds")
    parser.add_argument(
        "--check-latency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail (exit 1) when a p95 with streams is above 2x idle (default on; the smoke test turns it off)",
    )
    args = parser.parse_args(argv)
    if min(args.streams, args.clients, args.requests, args.open_batch, args.repeats) < 1 or args.probe < 0:
        parser.error("--streams, --clients, --requests, --open-batch and --repeats must be >= 1")
    args.probe = min(args.probe, args.streams)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_open_files(2 * args.streams + 200)  # both ends of each stream live on this host
    prefix = f"gcr-bench-{uuid.uuid4().hex[:10]}"
    limit = str(args.streams + 100)  # the gateway's stream limits must admit the whole run
    with gateway_server(
        args.redis_url, prefix, GCR_MAX_OPEN_STREAMS=limit, GCR_MAX_OPEN_STREAMS_PER_KEY=limit
    ) as gateway:
        measured = run_loop(lambda: measure(args, gateway.port, prefix))
    result: dict[str, Any] = {
        **run_info("streams", args.redis_url),
        "streams": args.streams,
        "clients": args.clients,
        "requests": args.requests,
        "open_files_limit": nofile,
        **measured,
    }
    result["targets"] = verdict(result)
    checked = [row for row in result["targets"] if args.check_latency or "p95" not in row["metric"]]
    result["ok"] = all(row["ok"] for row in checked)
    return finish(result, args.json, show, ok=result["ok"])


if __name__ == "__main__":
    sys.exit(main())
