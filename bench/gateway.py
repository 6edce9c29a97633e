"""Gateway benchmark: submit and poll under N concurrent clients, against a bare endpoint.

    python bench/gateway.py --clients 16 --requests 2000 --json out.json

Two servers run side by side as subprocesses under the same uvicorn settings (one
process each, loopback, no access log), on the same Redis, each under its own key
prefix (deleted at the end):
- the REAL gateway (`service.gateway.app`, auth disabled, rate limit 0, a queue cap it never
  reaches; no real worker, so submitted jobs stay queued: an idle heartbeat stands for
  one, since the gateway refuses jobs of modes no live worker serves);
- a BARE Starlette app doing the same Redis work with nothing around it:
  submit = ZCARD of the queued index (the gateway's queue-cap check), then the same
  MULTI pipeline as `JobStore.create` (HSET of the job's fields, EXPIRE, ZADD queued,
  ZADD all jobs, ZREMRANGEBYSCORE, XADD to the queue stream); poll = the same MULTI
  pipeline as `JobStore.get` (HGETALL, LRANGE rounds, ZRANK), answered by splicing
  the stored JSON values into one object.
The ratio gateway/bare is what the gateway's own work costs: validation, the job
document, pydantic serialisation, middleware, error handling.

Each measurement (target x operation) runs `--requests` requests (or stops after
`--max-seconds`) from `--clients` keep-alive connections, after a warm-up, and
alternates gateway and bare `--repeats` times so that drift in the machine's load
hits both alike; it reports the median throughput of the repeats and latency
percentiles over all of them. The load generator is a minimal HTTP/1.1 client
(bench.loadgen.HttpConnection), so that on a small machine the client is not what
limits either server. Poll requests read the jobs the same target created.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.common import Column, argument_parser, finish, print_targets, run_info  # noqa: E402
from bench.loadgen import HttpConnection, latency_percentiles, print_load_table  # noqa: E402
from bench.servers import gateway_server  # noqa: E402

TARGETS = ("gateway", "bare")
OPERATIONS = ("submit", "poll")
TARGET_RATIO = 0.5
IDLE_MODEL = "bench-idle"  # what the idle worker announces; the bare gateway queues to its stream


# --- the bare reference endpoint (runs in its own uvicorn process) ------------------------------


def bare_app() -> Any:
    """Starlette app doing the gateway's Redis work for submit and poll, and nothing else."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from gcr.types import GenerateRequest
    from service.jobs.connection import connect
    from service.jobs.keys import Keys
    from service.jobs.records import StoredJob
    from service.settings import Settings

    settings = Settings()
    keys = Keys(settings.redis_prefix)
    redis = connect(settings.redis_url)
    ttl = settings.result_ttl_s
    # The hash fields of a real queued job, encoded once: per request only id and time change.
    sample = StoredJob(
        id="x", status="queued", spec=GenerateRequest(prompt="p"), stage="queued", created_at=0.0, owner="anonymous"
    )
    dumped = sample.model_dump(mode="json", exclude={"rounds", "queue_position", "links"})
    template = {key: json.dumps(value) for key, value in dumped.items() if value is not None}

    async def submit(request: Request) -> Response:
        body = json.loads(await request.body())
        job_id = secrets.token_urlsafe(16)
        now = time.time()
        fields = {**template, "id": json.dumps(job_id), "created_at": json.dumps(now)}
        fields["spec"] = json.dumps({**json.loads(template["spec"]), "prompt": body["prompt"]})
        await redis.zcard(keys.queued_index())
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job(job_id), mapping=fields)
            pipe.expire(keys.job(job_id), ttl)
            pipe.zadd(keys.queued_index(), {job_id: 10**13 + int(now * 1000)})
            pipe.zadd(keys.all_jobs(), {job_id: now})
            pipe.zremrangebyscore(keys.all_jobs(), "-inf", now - ttl)
            pipe.xadd(keys.queue(IDLE_MODEL, "t2i", "normal"), {"job": job_id})
            await pipe.execute()
        location = f"{request.base_url}jobs/{job_id}"
        return JSONResponse({"id": job_id, "status": "queued", "links": {"self": location}}, status_code=202)

    async def poll(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.lrange(keys.rounds(job_id), 0, -1)
            pipe.zrank(keys.queued_index(), job_id)
            fields, rounds, rank = await pipe.execute()
        if not fields:
            return JSONResponse({"error": {"code": "not_found"}}, status_code=404)
        # The stored values are JSON already: splice them, do not decode them.
        members = [json.dumps(k.decode()).encode() + b":" + v for k, v in fields.items()]
        members.append(b'"rounds":[' + b",".join(rounds) + b"]")
        members.append(b'"queue_position":' + (b"null" if rank is None else str(rank).encode()))
        return Response(b"{" + b",".join(members) + b"}", media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b"ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await redis.aclose()

    routes = [
        Route("/generate", submit, methods=["POST"]),
        Route("/jobs/{job_id}", poll, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


# --- load ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement: `requests` requests of one operation against one target."""

    seconds: float
    latencies: list[float]
    errors: int
    bodies: list[bytes] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0


MakeRequest = Callable[[int], tuple[str, str, bytes]]
"""Request number -> (method, path, body)."""


async def load(
    port: int, make: MakeRequest, *, total: int, clients: int, max_seconds: float, expect: int, keep: bool = False
) -> Sample:
    """Send `total` requests from `clients` connections (or stop at `max_seconds`)."""
    counter = iter(range(total))
    latencies: list[float] = []
    bodies: list[bytes] = []
    errors = 0
    deadline = time.perf_counter() + max_seconds

    async def client() -> None:
        nonlocal errors
        async with HttpConnection("127.0.0.1", port) as conn:
            for index in counter:
                if time.perf_counter() > deadline:
                    return
                method, path, body = make(index)
                sent = time.perf_counter()
                status, payload = await conn.request(method, path, body)
                latencies.append(time.perf_counter() - sent)
                if status != expect:
                    errors += 1
                elif keep:
                    bodies.append(payload)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Sample(time.perf_counter() - started, latencies, errors, bodies)


def add_load_options(
    parser: argparse.ArgumentParser, *, clients: int, requests: int, max_seconds: float, alternating: str
) -> None:
    """How `load` is run: from how many connections, how many requests, how often, for how long at most."""
    parser.add_argument("--clients", type=int, default=clients, help=f"keep-alive connections (default {clients})")
    parser.add_argument("--requests", type=int, default=requests, help=f"requests per measurement (default {requests})")
    parser.add_argument("--repeats", type=int, default=2, help=f"alternations of {alternating} (default 2)")
    parser.add_argument("--max-seconds", type=float, default=max_seconds, help="cap on one measurement's duration")


def submit_request(tag: str) -> MakeRequest:
    def make(index: int) -> tuple[str, str, bytes]:
        body = {"prompt": f"gateway bench {tag} {index}: a lighthouse at dusk", "loop": {"max_rounds": 3}}
        return "POST", "/generate", json.dumps(body).encode()

    return make


def poll_request(ids: Sequence[str]) -> MakeRequest:
    def make(index: int) -> tuple[str, str, bytes]:
        return "GET", f"/jobs/{ids[index % len(ids)]}", b""

    return make


@dataclass
class Series:
    """All repeats of one (target, operation)."""

    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        latencies = sorted(x for s in self.samples for x in s.latencies)
        return {
            "requests": len(latencies),
            "errors": sum(s.errors for s in self.samples),
            "req_per_s": statistics.median(s.per_s for s in self.samples),
            "req_per_s_each": [s.per_s for s in self.samples],
            **latency_percentiles(latencies),
        }


async def _heartbeats(redis_url: str, prefix: str, first: asyncio.Event) -> None:
    from service.jobs.connection import connect
    from service.jobs.keys import Keys
    from service.jobs.registry import WorkerHeartbeat, WorkerRegistry

    client = connect(redis_url)
    registry = WorkerRegistry(client, Keys(prefix))
    beat = WorkerHeartbeat(id="bench-idle-worker", model=IDLE_MODEL, modes=["t2i"], generator="none")
    try:
        while True:
            await registry.heartbeat(beat, ttl_s=10)
            first.set()
            await asyncio.sleep(2)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def idle_worker(redis_url: str, prefix: str) -> AsyncIterator[None]:
    """Heartbeat as a worker that serves t2i and claims nothing, so the gateway admits the
    jobs: from its first heartbeat until the block ends."""
    first = asyncio.Event()
    heartbeat = asyncio.create_task(_heartbeats(redis_url, prefix, first))
    try:
        await asyncio.wait_for(first.wait(), timeout=10)
        yield
    finally:
        heartbeat.cancel()
        await asyncio.wait({heartbeat}, timeout=5)


async def measure(args: argparse.Namespace, ports: dict[str, int], prefix: str) -> dict[str, Any]:
    async with idle_worker(args.redis_url, prefix):
        return await _measure(args, ports)


async def _measure(args: argparse.Namespace, ports: dict[str, int]) -> dict[str, Any]:
    series = {(t, op): Series() for t in TARGETS for op in OPERATIONS}
    ids: dict[str, list[str]] = {t: [] for t in TARGETS}
    options = {"total": args.requests, "clients": args.clients, "max_seconds": args.max_seconds}
    for target in TARGETS:  # warm-up: connections, imports, caches; these jobs are polled later too
        warm = await load(
            ports[target], submit_request("warm"), **{**options, "total": args.warmup}, expect=202, keep=True
        )
        ids[target] += [json.loads(b)["id"] for b in warm.bodies]
        await load(ports[target], poll_request(ids[target]), **{**options, "total": args.warmup}, expect=200)
    for repeat in range(args.repeats):
        for target in TARGETS:
            sample = await load(ports[target], submit_request(f"r{repeat}"), **options, expect=202, keep=True)
            ids[target] += [json.loads(b)["id"] for b in sample.bodies]
            sample.bodies = []
            series[target, "submit"].samples.append(sample)
        for target in TARGETS:
            sample = await load(ports[target], poll_request(ids[target]), **options, expect=200)
            series[target, "poll"].samples.append(sample)
    result: dict[str, Any] = {}
    for op in OPERATIONS:
        gateway, bare = series["gateway", op].summary(), series["bare", op].summary()
        ratio = gateway["req_per_s"] / bare["req_per_s"] if bare["req_per_s"] else 0.0
        result[op] = {"gateway": gateway, "bare": bare, "ratio": ratio}
        result[f"{op}_ratio"] = ratio
    return result


def show(result: dict[str, Any]) -> None:
    rows = []
    for op in OPERATIONS:
        for target in TARGETS:
            rows.append({"op": op, "target": target, **result[op][target]})
        rows.append({"op": op, "target": "gateway / bare", "req_per_s": result[op]["ratio"]})
    columns = [Column("target", "target"), Column("req_per_s", "req/s (ratio)", "{:.2f}")]
    print_load_table("gateway vs bare endpoint", result, rows, columns)
    targets = [
        {"metric": f"{op} throughput, gateway / bare", "value": result[f"{op}_ratio"], "target": ">= 0.5"}
        for op in OPERATIONS
    ]
    for row in targets:
        row["ok"] = row["value"] >= TARGET_RATIO
    print_targets(targets)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    add_load_options(parser, clients=16, requests=2000, max_seconds=20.0, alternating="gateway and bare")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per target and operation")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.warmup, args.repeats) < 1:
        parser.error("--clients, --requests, --warmup and --repeats must be >= 1")
    return args


def run_loop(main: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """asyncio.run, on uvloop when installed (it comes with uvicorn[standard]): a cheaper client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prefix = f"gcr-bench-{uuid.uuid4().hex[:10]}"
    with (
        gateway_server(args.redis_url, prefix) as gateway,
        gateway_server(
            args.redis_url, f"{prefix}-bare", factory="bench.gateway:bare_app", name="bare endpoint"
        ) as bare,
    ):
        ports = {"gateway": gateway.port, "bare": bare.port}
        measured = run_loop(lambda: measure(args, ports, prefix))
    result = {
        **run_info("gateway", args.redis_url),
        "clients": args.clients,
        "requests": args.requests,
        "repeats": args.repeats,
        "warmup": args.warmup,
        **measured,
    }
    errors = sum(result[op][t]["errors"] for op in OPERATIONS for t in TARGETS)
    return finish(result, args.json, show, ok=not errors)


if __name__ == "__main__":
    sys.exit(main())
