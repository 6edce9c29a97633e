"""Orchestration benchmark: many GCR jobs over one simulated GPU and one simulated critic.

    python bench/orchestration.py --jobs 16 --rounds 3 --t-gen 1.0 --t-critic 1.0 --json out.json

What runs, all on loopback:
- Redis (the one at `--redis-url`; every key under a fresh `gcr-bench-*` prefix,
  deleted at the end);
- the REAL gateway (`service.gateway.app`) under uvicorn, in a subprocess, as `gcr serve` runs it;
- the stand-in critic (`workers.critics.standin`, an OpenAI-compatible HTTP server) in a
  subprocess, answering each critique after `--t-critic` seconds (its `latency_s`);
- the REAL worker (`workers.worker.Worker`, with its claim loop, scheduler, runner,
  heartbeats and Redis writes) in THIS process, so that the benchmark can watch its
  generator calls, on `SimulatedGenerator` (`sim:T_GEN:PER_IMAGE`): a call of b images
  takes `t_gen + per_image * (b - 1)` seconds.
Jobs are submitted through the gateway's HTTP API and polled there until they end. Every
job runs exactly `--rounds` rounds (threshold 1.0, patience off; the stand-in scores 0.5).

Why a timed wait models the stages faithfully: the GPU and vLLM do their work on other
chips (or machines); what they cost the worker's CPU is waiting for a result, which is
exactly what a sleep in the executor thread (generator) or in the critic server (an
HTTP request that answers late) costs. What is measured is therefore the orchestration
around them: claiming, scheduling, batching, Redis writes, events, HTTP to the critic.

Two runs of the same kind of job:
1. concurrent: `--jobs` J jobs, worker with max_inflight_jobs=J and `--max-batch` B;
2. sequential baseline: `--seq-jobs` jobs (default min(J, 4)) with max_inflight_jobs=1
   and max_batch=1: one job at a time, generate then critique (a naive loop). Its rate is
   also computed as 1 / (t_gen + t_critic) rounds/s.

Definitions (one candidate per round, so rounds/s = images/s):
- window: from the start of the first generator call to the end of the last one. The
  first call cannot start before a job asks for it, and after the last call only the
  critiques of the last rounds are left, with nothing for the GPU to do whatever the
  scheduler does; the window leaves out that fill and drain of a finite batch of jobs.
- busy_fraction: seconds inside generator calls (timed in the executor thread, where
  a GPU would be busy) over the window.
- rounds_per_s: the sustained rate, start to start: the rounds of every generator call
  but the last, over the time from the first call's start to the last call's start.
  That span holds whole cycles of generate and critique in both runs, so neither the
  fill nor the drain of a finite batch of jobs biases it (rounds over the window
  would leave the last critiques out, favouring the run that idles the GPU more).
  The end-to-end rate (first submit to last job finished) is reported beside it.
- speedup_vs_sequential: rounds_per_s over the sequential run's.
- ratio_to_bound: rounds_per_s over 1 / max(t_gen per image at the batch sizes
  reached (over the same calls), t_critic / max_inflight_critiques).
- overhead per round: a job's time in the worker (started_at → finished_at) minus the
  simulated stage times it waited for, over its rounds; from the sequential run, where
  nothing else competes (and, for the concurrent run, minus its GPU queueing too).
- gpu_idle_with_work: time inside the window when the generator was idle while a
  request waited for it: what the scheduler itself costs (its batch window included).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Column,
    add_simulation_options,
    argument_parser,
    finish,
    from_options,
    print_targets,
    run_info,
)
from bench.servers import gateway_server, standin_critic  # noqa: E402
from gcr import AsyncClient  # noqa: E402
from gcr.types import JobDocument, PromptFit  # noqa: E402
from service.critic.client import OpenAICritic  # noqa: E402
from service.settings import Settings  # noqa: E402
from workers.critics.standin_config import StandinConfig  # noqa: E402
from workers.generators.base import NO_HOOKS, Generator, GenRequest, StepHooks  # noqa: E402
from workers.generators.simulated import SimulatedGenerator  # noqa: E402
from workers.worker import Worker, connect_worker  # noqa: E402

if TYPE_CHECKING:
    from PIL import Image

SIMULATION_NOTE = (
    "simulation: generator and critic are timed waits (GPU and vLLM time costs this machine's CPU "
    "nothing but the wait); measured is the orchestration around them"
)
STANDIN_SCORE = 0.5  # below the threshold of 1.0, so every job runs all its rounds
WORKER_START_TIMEOUT_S = 20.0
POLL_S = 0.5
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})


# --- watching the generator --------------------------------------------------------------------


@dataclass
class Call:
    """One generator call as the executor thread saw it."""

    start: float
    end: float
    arrivals: list[float]  # when each request was handed to the scheduler
    prompts: list[str]


class RecordingGenerator:
    """A `Generator` that times each call and each request's arrival, then delegates.

    The scheduler calls `resolve` once per request when it is queued, and `generate`
    in its executor thread, so these two hooks see exactly what a GPU would.
    """

    def __init__(self, inner: Generator) -> None:
        self.inner = inner
        self.name = inner.name
        self.modes = inner.modes
        self.max_batch = inner.max_batch
        self.runtime = inner.runtime
        self.calls: list[Call] = []
        # Keyed by id() of the resolved request; the request is kept so its id stays unique.
        self._arrivals: dict[int, tuple[GenRequest, float]] = {}

    def fit_prompt(self, request: GenRequest) -> tuple[str, PromptFit] | None:
        return self.inner.fit_prompt(request)

    def resolve(self, request: GenRequest) -> GenRequest:
        resolved = self.inner.resolve(request)
        self._arrivals[id(resolved)] = (resolved, time.perf_counter())
        return resolved

    def generate(self, requests: Sequence[GenRequest], hooks: StepHooks = NO_HOOKS) -> list[Image.Image]:
        start = time.perf_counter()
        try:
            return self.inner.generate(requests, hooks)
        finally:
            arrivals = [self._arrivals[id(r)][1] if id(r) in self._arrivals else start for r in requests]
            self.calls.append(Call(start, time.perf_counter(), arrivals, [r.prompt for r in requests]))


def idle_with_work(calls: Sequence[Call]) -> float:
    """Seconds between calls during which some request was already waiting."""
    ordered = sorted(calls, key=lambda c: c.start)
    # earliest[k]: the earliest arrival among requests served by call k or later.
    earliest = [0.0] * len(ordered)
    running = float("inf")
    for k in range(len(ordered) - 1, -1, -1):
        running = min(running, *ordered[k].arrivals)
        earliest[k] = running
    idle = 0.0
    for k in range(1, len(ordered)):
        waiting_since = max(ordered[k - 1].end, earliest[k])
        idle += max(0.0, ordered[k].start - waiting_since)
    return idle


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Workload:
    jobs: int
    rounds: int
    t_gen: float
    t_critic: float
    per_image: float
    max_batch: int
    inflight: int
    critic_concurrency: int
    batch_window_ms: float

    def call_seconds(self, batch: int) -> float:
        """Simulated time of one generator call of `batch` images."""
        return self.t_gen + self.per_image * (batch - 1)


@dataclass
class RunResult:
    """What one run measured; the JSON holds `summary()`."""

    workload: Workload
    docs: list[JobDocument]
    calls: list[Call]
    first_submit: float  # time.time()
    errors: list[str] = field(default_factory=list)

    @property
    def window_s(self) -> float:
        return max(c.end for c in self.calls) - min(c.start for c in self.calls)

    def steady_calls(self) -> list[Call]:
        """The calls the sustained rate counts: all but the last (all when there is one)."""
        ordered = sorted(self.calls, key=lambda c: c.start)
        return ordered[:-1] if len(ordered) > 1 and ordered[-1].start > ordered[0].start else ordered

    @property
    def steady_rounds_per_s(self) -> float:
        """Rounds of all calls but the last, over first call start → last call start."""
        counted = self.steady_calls()
        images = sum(len(c.prompts) for c in counted)
        if len(counted) == len(self.calls):  # one call: nothing to go on but the window
            return images / self.window_s
        return images / (max(c.start for c in self.calls) - counted[0].start)

    @property
    def rounds_done(self) -> int:
        return sum(len(d.rounds) for d in self.docs)

    @property
    def makespan_s(self) -> float:
        return max(d.finished_at or 0.0 for d in self.docs) - self.first_submit

    def gen_seconds_by_prompt(self) -> dict[str, float]:
        """Seconds of the generator call (as the executor thread timed it) that made each prompt's image."""
        return {p: c.end - c.start for c in self.calls for p in c.prompts}

    def overhead_per_round(self, *, minus_queueing: bool) -> float:
        """Mean over jobs of (time in the worker − stage time waited for) / rounds.

        Stage time: the generator call's duration, timed in the executor thread (so the
        simulator's own drawing and sleep granularity are not charged to orchestration),
        plus the critic's configured latency."""
        w = self.workload
        gen_s = self.gen_seconds_by_prompt()
        per_job = []
        for doc in self.docs:
            assert doc.started_at is not None and doc.finished_at is not None
            stages = sum(gen_s.get(r.prompt, w.t_gen) + w.t_critic for r in doc.rounds)
            if minus_queueing:
                stages += sum(r.timings.queue_wait_ms / 1000 for r in doc.rounds)
            per_job.append((doc.finished_at - doc.started_at - stages) / max(1, len(doc.rounds)))
        return sum(per_job) / len(per_job)

    def overhead_breakdown(self) -> dict[str, float]:
        """Where a round's overhead goes, from the round timings the runner records (seconds).

        generate: the generate stage minus its GPU queueing and the call itself (the
        scheduler's hand-offs); critique: the critique stage minus the critic's latency
        (building, sending and parsing the request). The rest of the overhead is Redis
        writes, events, image encoding and checkpoints between the stages."""
        w = self.workload
        gen_s = self.gen_seconds_by_prompt()
        rounds = [r for d in self.docs for r in d.rounds]
        n = max(1, len(rounds))
        generate = sum(
            (r.timings.generate_ms - r.timings.queue_wait_ms) / 1000 - gen_s.get(r.prompt, w.t_gen) for r in rounds
        )
        critique = sum(r.timings.critique_ms / 1000 - w.t_critic for r in rounds)
        return {"generate_stage_s": generate / n, "critique_stage_s": critique / n}

    def summary(self) -> dict[str, Any]:
        w = self.workload
        images = sum(len(c.prompts) for c in self.calls)
        gpu_s = sum(c.end - c.start for c in self.calls)
        mean_batch = images / len(self.calls)
        # Over the calls the sustained rate counts, so that the two compare like with like.
        counted = self.steady_calls()
        gen_per_image = sum(w.call_seconds(len(c.prompts)) for c in counted) / sum(len(c.prompts) for c in counted)
        bound = 1 / max(gen_per_image, w.t_critic / w.critic_concurrency)
        rounds_per_s = self.steady_rounds_per_s
        overhead = self.overhead_per_round(minus_queueing=True)
        return {
            "jobs": len(self.docs),
            "rounds_done": self.rounds_done,
            "max_inflight_jobs": w.inflight,
            "max_batch": w.max_batch,
            "generator_calls": len(self.calls),
            "mean_batch": mean_batch,
            "batch_sizes": [len(c.prompts) for c in sorted(self.calls, key=lambda c: c.start)],
            "window_s": self.window_s,
            "makespan_s": self.makespan_s,
            "busy_fraction": gpu_s / self.window_s,
            "gpu_idle_with_work_s": idle_with_work(self.calls),
            "rounds_per_s": rounds_per_s,
            "rounds_per_s_end_to_end": self.rounds_done / self.makespan_s,
            "jobs_per_s": len(self.docs) / self.makespan_s,
            "t_gen_per_image_s": gen_per_image,
            "bound_rounds_per_s": bound,
            "ratio_to_bound": rounds_per_s / bound,
            "overhead_s_per_round_minus_queueing": overhead,
            "overhead_breakdown_s": self.overhead_breakdown(),
            "errors": self.errors,
        }


def dump_tasks() -> None:
    """Print every task's stack to stderr: where a stalled run is stuck."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


async def wait_for_worker(client: AsyncClient, worker_id: str) -> None:
    """Until the gateway's /readyz lists this worker's heartbeat (it is claiming then)."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        report = await client.ready()
        if any(w.get("id") == worker_id for w in report.get("workers", [])):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"worker {worker_id} did not start in {WORKER_START_TIMEOUT_S:.0f}s")


async def wait_all(client: AsyncClient, ids: Sequence[str]) -> list[JobDocument]:
    """Poll the jobs, one at a time in submit order, until all are over; returns the final documents.

    One poll in flight keeps the load this client puts on the gateway (and on the two
    cores it shares with the worker) negligible; the measurements use the worker's own
    timestamps in the documents, so how late a finish is noticed does not matter.
    """
    docs = []
    for job_id in ids:
        # The state lives behind the gateway's HTTP API: polling it is what a client does.
        while (doc := await client.get(job_id)).status not in TERMINAL:  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)
        docs.append(doc)
    return docs


async def run_workload(
    w: Workload, *, name: str, redis_url: str, prefix: str, gateway_url: str, critic_url: str
) -> RunResult:
    """Start a worker in this process, push `w.jobs` jobs through the gateway, follow them to the end."""
    settings = Settings(
        redis_url=redis_url,
        redis_prefix=prefix,
        worker_id=f"bench-{name}-{uuid.uuid4().hex[:6]}",
        generator=f"sim:{w.t_gen}:{w.per_image}",
        max_batch=w.max_batch,
        batch_window_ms=w.batch_window_ms,
        max_inflight_jobs=w.inflight,
        max_inflight_critiques=w.critic_concurrency,
        critic_base_url=critic_url,
        critic_model=StandinConfig().model,
    )
    generator = RecordingGenerator(SimulatedGenerator(settings.generator or "", settings))
    critic = OpenAICritic(settings)
    worker = Worker(settings, generator, critic, connect_worker(settings, generator))
    worker_task = asyncio.create_task(worker.run(drain_grace_s=5.0), name=f"bench-worker-{name}")
    loop = {"max_rounds": w.rounds, "threshold": 1.0, "patience": None}
    # Generous: even one job at a time would be done well within it. A job that stalls
    # must fail the benchmark, not hang it.
    limit_s = 60 + 2 * w.jobs * w.rounds * (w.call_seconds(1) + w.t_critic)
    try:
        async with AsyncClient(gateway_url, timeout_s=60.0) as client:
            await wait_for_worker(client, settings.worker_id)
            first_submit = time.time()
            bodies = [
                {"prompt": f"bench {name} job {i:04d}: a lighthouse at dusk", "loop": loop, "generation": {"seed": i}}
                for i in range(w.jobs)
            ]
            try:
                async with asyncio.timeout(limit_s):
                    ids = [job.id for job in await asyncio.gather(*(client.submit(body) for body in bodies))]
                    docs = await wait_all(client, ids)
            except TimeoutError:
                dump_tasks()
                raise RuntimeError(f"{name} run: jobs did not finish in {limit_s:.0f}s (task stacks above)") from None
    finally:
        worker.stop()
        await worker_task
        await critic.aclose()
    errors = [
        f"job {d.id}: {d.status}/{d.stop_reason} after {len(d.rounds)} rounds"
        for d in docs
        if d.status != "succeeded" or d.stop_reason != "max_rounds" or len(d.rounds) != w.rounds
    ]
    return RunResult(w, docs, generator.calls, first_submit, errors)


# --- the benchmark ----------------------------------------------------------------------------


async def measure(args: argparse.Namespace, gateway_url: str, critic_url: str, prefix: str) -> dict[str, Any]:
    concurrent = from_options(Workload, args, inflight=args.jobs)
    where = {"redis_url": args.redis_url, "prefix": prefix, "gateway_url": gateway_url, "critic_url": critic_url}
    main = await run_workload(concurrent, name="concurrent", **where)
    seq_jobs = min(args.jobs, 4) if args.seq_jobs is None else args.seq_jobs
    sequential = None
    if seq_jobs > 0:
        baseline = Workload(**{**vars(concurrent), "jobs": seq_jobs, "inflight": 1, "max_batch": 1})
        sequential = await run_workload(baseline, name="sequential", **where)
    return report(args, main, sequential)


def report(args: argparse.Namespace, main: RunResult, sequential: RunResult | None) -> dict[str, Any]:
    m = main.summary()
    seq_computed = 1 / (args.t_gen + args.t_critic)
    round_s = args.t_gen + args.t_critic
    out: dict[str, Any] = {
        **run_info("orchestration", args.redis_url),
        "note": SIMULATION_NOTE,
        "jobs": args.jobs,
        "rounds": args.rounds,
        "t_gen": args.t_gen,
        "t_critic": args.t_critic,
        "per_image": args.per_image,
        "max_batch": args.max_batch,
        "critic_concurrency": args.critic_concurrency,
        "batch_window_ms": args.batch_window_ms,
        "busy_fraction": m["busy_fraction"],
        "rounds_per_s": m["rounds_per_s"],
        "rounds_per_s_end_to_end": m["rounds_per_s_end_to_end"],
        "jobs_per_s": m["jobs_per_s"],
        "bound_rounds_per_s": m["bound_rounds_per_s"],
        "ratio_to_bound": m["ratio_to_bound"],
        "mean_batch": m["mean_batch"],
        "gpu_idle_with_work_s": m["gpu_idle_with_work_s"],
        "sequential_computed_rounds_per_s": seq_computed,
        "speedup_vs_sequential_computed": m["rounds_per_s"] / seq_computed,
        "overhead_s_per_round_concurrent": m["overhead_s_per_round_minus_queueing"],
        "concurrent": m,
    }
    if sequential is not None:
        s = sequential.summary()
        overhead = sequential.overhead_per_round(minus_queueing=False)
        out.update(
            sequential=s,
            sequential_rounds_per_s=s["rounds_per_s"],
            speedup_vs_sequential=m["rounds_per_s"] / s["rounds_per_s"],
            speedup_vs_sequential_end_to_end=m["rounds_per_s_end_to_end"] / s["rounds_per_s_end_to_end"],
            overhead_s_per_round=overhead,
            overhead_fraction=overhead / round_s,
            overhead_breakdown_s=s["overhead_breakdown_s"],
        )
    else:
        overhead = m["overhead_s_per_round_minus_queueing"]
        out.update(
            speedup_vs_sequential=out["speedup_vs_sequential_computed"],
            overhead_s_per_round=overhead,
            overhead_fraction=overhead / round_s,
        )
    out["errors"] = main.errors + (sequential.errors if sequential else [])
    return out


RUN_ROWS = (
    Column("jobs", "jobs", "{:d}"),
    Column("max_inflight_jobs", "max_inflight_jobs", "{:d}"),
    Column("max_batch", "max_batch", "{:d}"),
    Column("generator_calls", "generator calls", "{:d}"),
    Column("mean_batch", "mean batch", "{:.2f}"),
    Column("window_s", "window (first gen start → last gen end) s", "{:.2f}"),
    Column("makespan_s", "makespan (first submit → last finish) s", "{:.2f}"),
    Column("rounds_per_s", "rounds/s (sustained)", "{:.3f}"),
    Column("rounds_per_s_end_to_end", "rounds/s (end to end)", "{:.3f}"),
    Column("jobs_per_s", "jobs/s (end to end)", "{:.3f}"),
    Column("busy_fraction", "generator busy fraction", "{:.3f}"),
    Column("gpu_idle_with_work_s", "generator idle while work waited, s", "{:.3f}"),
    Column("bound_rounds_per_s", "ideal bound rounds/s", "{:.3f}"),
    Column("ratio_to_bound", "ratio to bound", "{:.3f}"),
    Column("overhead_ms", "overhead ms/round (minus GPU queueing)", "{:.1f}"),
)


def show(result: dict[str, Any]) -> None:
    """Print the runs side by side, then the targets."""
    runs = {"concurrent": result["concurrent"]}
    if "sequential" in result:
        runs["sequential"] = result["sequential"]
    for run in runs.values():
        run["overhead_ms"] = 1000 * run["overhead_s_per_round_minus_queueing"]
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"orchestration: {result['jobs']} jobs x {result['rounds']} rounds, t_gen {result['t_gen']}s "
        f"(+{result['per_image']}s per extra image), t_critic {result['t_critic']}s"
    )
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    for column in RUN_ROWS:
        table.add_row(column.title, *(column.fmt.format(run[column.key]) for run in runs.values()))
    console = Console()
    console.print(table)

    applies = result["t_gen"] == result["t_critic"] and result["jobs"] >= 4
    rows: list[dict[str, Any]] = [
        {
            "metric": "generator busy fraction",
            "value": result["busy_fraction"],
            "target": ">= 0.95 (J>=4)",
            "ok": result["busy_fraction"] >= 0.95 if applies else None,
        },
        {
            "metric": "speedup vs sequential, measured",
            "value": result["speedup_vs_sequential"],
            "target": ">= 1.9 (J>=4)",
            "ok": result["speedup_vs_sequential"] >= 1.9 if applies else None,
        },
        {"metric": "speedup vs sequential, computed", "value": result["speedup_vs_sequential_computed"]},
        {
            "metric": "ratio to ideal bound",
            "value": result["ratio_to_bound"],
            "target": ">= 0.9 (J>=16)",
            "ok": result["ratio_to_bound"] >= 0.9 if result["jobs"] >= 16 else None,
        },
        {
            "metric": "overhead per round, ms",
            "value": 1000 * result["overhead_s_per_round"],
            "target": "<= 20",
            "ok": result["overhead_s_per_round"] <= 0.02,
        },
        {
            "metric": "overhead / (t_gen + t_critic)",
            "value": result["overhead_fraction"],
            "target": "<= 0.02",
            "ok": result["overhead_fraction"] <= 0.02,
        },
    ]
    print_targets(rows, title="targets (overhead: sequential run)")
    console.print(SIMULATION_NOTE)
    for error in result["errors"]:
        console.print(f"[red]ERROR[/red]: {error}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argument_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=16, help="concurrent jobs J (default 16)")
    add_simulation_options(parser, t_critic=1.0)
    parser.add_argument("--per-image", type=float, default=0.0, help="extra seconds per image beyond the first")
    parser.add_argument("--max-batch", type=int, default=1, help="scheduler max_batch of the concurrent run")
    parser.add_argument("--batch-window-ms", type=float, default=defaults.batch_window_ms)
    parser.add_argument(
        "--critic-concurrency", type=int, default=defaults.max_inflight_critiques, help="max_inflight_critiques"
    )
    parser.add_argument("--seq-jobs", type=int, default=None, help="jobs of the measured sequential run (0: skip)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1 or args.max_batch < 1:
        parser.error("--jobs, --rounds and --max-batch must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prefix = f"gcr-bench-{uuid.uuid4().hex[:10]}"
    with (
        standin_critic(args.t_critic, STANDIN_SCORE) as critic,
        gateway_server(args.redis_url, prefix) as gateway,
    ):
        result = asyncio.run(measure(args, gateway.url, f"{critic.url}/v1", prefix))
    return finish(result, args.json, show, ok=not result["errors"])


if __name__ == "__main__":
    sys.exit(main())
