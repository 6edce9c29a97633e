"""Orchestration benchmark: many GCR jobs over simulated GPUs (one per worker) and one simulated critic.

    python bench/orchestration.py --jobs 16 --rounds 3 --t-gen 1.0 --t-critic 1.0 --json out.json

What runs, all on loopback:
- Redis (the one at `--redis-url`; every key under a fresh `gcr-bench-*` prefix,
  deleted at the end);
- the REAL gateway (`service.gateway.app`) under uvicorn, in a subprocess, as `gcr serve` runs it;
- the stand-in critic (`workers.critics.standin`, an OpenAI-compatible HTTP server) in a
  subprocess, answering each critique after `--t-critic` seconds (its `latency_s`);
- the REAL workers (`workers.worker.Worker`, with their claim loops, scheduler, runner,
  heartbeats and Redis writes) in THIS process, so that the benchmark can watch their
  generator calls, on `SimulatedGenerator` (`sim:T_GEN:PER_IMAGE`): a call of b images
  takes `t_gen + per_image * (b - 1)` seconds.
Jobs are submitted through the gateway's HTTP API and polled there until they end. Every
job runs exactly `--rounds` rounds (threshold 1.0, patience off; the stand-in scores 0.5).

Why a timed wait models the stages faithfully: the GPU and vLLM do their work on other
chips (or machines); what they cost the worker's CPU is waiting for a result, which is
exactly what a sleep in the executor thread (generator) or in the critic server (an
HTTP request that answers late) costs. What is measured is therefore the orchestration
around them: claiming, scheduling, batching, Redis writes, events, HTTP to the critic.

Runs, all with default settings unless an option names one (`max_inflight_jobs` and
`max_inflight_critiques` are ceilings: the workers' demand and critique limit decide
under them):
1. concurrent: `--jobs` J jobs on `--workers` workers (default 1) with `--max-batch` B;
   `--critic-ceiling C` makes the stand-in answer at most C critiques at once (the rest
   queue, as vLLM's do past its batch knee, and show on its `/metrics`);
2. sequential baseline (one worker only): `--seq-jobs` jobs (default min(J, 4)) with
   max_inflight_jobs=1 and max_batch=1: one job at a time, generate then critique (a
   naive loop). Its rate is also computed as 1 / (t_gen + t_critic) rounds/s.
`--ratios 1,10,30,60` runs a sweep instead: one concurrent run per ratio, with
t_critic = ratio x t_gen.

Definitions (one candidate per round, so rounds/s = images/s):
- window: from the start of the first generator call to the end of the last one. The
  first call cannot start before a job asks for it, and after the last call only the
  critiques of the last rounds are left, with nothing for the GPU to do whatever the
  scheduler does; the window leaves out that fill and drain of a finite batch of jobs.
- busy_fraction: seconds inside generator calls (timed in the executor thread, where
  a GPU would be busy) over the window (the lowest worker's).
- busy_while_queued: the same share from a worker's first call until the last job was
  claimed, while jobs still waited in the shared queue: after that only the jobs
  already running are left, whatever a worker does. The figure the slow-critic target
  reads: a generator must not idle while work waits for it.
- rounds_per_s: the sustained rate: rounds judged from the first round judged until the
  last job was claimed (or until the last round judged, when every job was claimed
  before any round was judged), neither the fill nor the drain of a finite batch. The
  end-to-end rate (first submit to last job finished) is reported beside it.
- speedup_vs_sequential: rounds_per_s over the sequential run's.
- bound: min(the generators' capacity at the batch sizes they reached (each worker's
  calls but its last), the critic's capacity, `--critic-ceiling` / t_critic);
  ratio_to_bound: rounds_per_s over it.
- latency: a job's time in a worker (started_at → finished_at), p50 and p95, against
  the lowest a job could take (each round one call at the mean batch plus one
  critique); and the same p95 over the jobs claimed once a first job finished (steady
  state: the workers had measured whole round trips; the jobs before ride the start-up
  ramp, where slow start overshoots the critic's knee once).
- most_jobs_held: the most jobs any worker held at once.
- overhead per round: a job's time in the worker (started_at → finished_at) minus the
  simulated stage times it waited for, over its rounds; from the sequential run, where
  nothing else competes (and, for the concurrent run, minus its GPU queueing too).
- gpu_idle_with_work: time inside the window when the generator was idle while a
  request waited for it: what the scheduler itself costs (its batch window included).
"""

from __future__ import annotations

import argparse
import asyncio
import math
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

import httpx  # noqa: E402

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
    batch_window_ms: float
    inflight: int | None = None
    """max_inflight_jobs; None: the setting's default (the worker's demand decides under it)."""
    critic_concurrency: int | None = None
    """max_inflight_critiques; None: the setting's default (the adaptive limit decides under it)."""
    critic_ceiling: int | None = None
    """The stand-in critic's throughput ceiling (critiques answered at once); None: none."""
    workers: int = 1

    def call_seconds(self, batch: int) -> float:
        """Simulated time of one generator call of `batch` images."""
        return self.t_gen + self.per_image * (batch - 1)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class RunResult:
    """What one run measured; the JSON holds `summary()`."""

    workload: Workload
    docs: list[JobDocument]
    worker_calls: list[list[Call]]
    max_held: list[int]
    first_submit: float  # time.time()
    clock_offset: float  # time.time() - time.perf_counter(): the calls' clock to the documents'
    errors: list[str] = field(default_factory=list)

    @property
    def calls(self) -> list[Call]:
        return sorted((c for calls in self.worker_calls for c in calls), key=lambda c: c.start)

    @property
    def window_s(self) -> float:
        return max(c.end for c in self.calls) - min(c.start for c in self.calls)

    @property
    def steady_rounds_per_s(self) -> float:
        """Rounds judged per second, from the first round judged until the last job was claimed
        (while jobs waited for a worker: neither the fill nor the drain of a finite batch of
        jobs), or until the last round judged when every job was claimed before a round was
        judged. A round counts once judged: generations the critic has not judged yet do not."""
        finishes = sorted(r.finished_at for d in self.docs for r in d.rounds)
        last_claim = max(d.started_at or 0.0 for d in self.docs)
        end = last_claim if last_claim > finishes[0] else finishes[-1]
        counted = [f for f in finishes if f <= end]
        if len(counted) < 2 or end <= finishes[0]:
            return len(finishes) / max(self.window_s, 1e-9)
        return (len(counted) - 1) / (counted[-1] - counted[0])

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

    def busy_while_queued(self) -> float:
        """The generators' busy share (mean over workers) from the first call until the last job
        was claimed: while jobs waited in the shared queue for a worker to need them. After
        that only the jobs already running are left (the drain), whatever a worker does."""
        last_claim = max(d.started_at or 0.0 for d in self.docs) - self.clock_offset
        shares = []
        for calls in self.worker_calls:
            if not calls:
                continue
            start = min(c.start for c in calls)
            span = last_claim - start
            if span <= 0:
                continue
            busy = sum(max(0.0, min(c.end, last_claim) - max(c.start, start)) for c in calls)
            shares.append(busy / span)
        return sum(shares) / len(shares) if shares else 1.0

    def busy_fractions(self) -> list[float]:
        """Each worker's seconds inside generator calls over its own window."""
        fractions = []
        for calls in self.worker_calls:
            if calls:
                window = max(c.end for c in calls) - min(c.start for c in calls)
                fractions.append(sum(c.end - c.start for c in calls) / window if window > 0 else 1.0)
        return fractions

    def bound(self) -> dict[str, float]:
        """min(the generators' capacity at the batch sizes they reached, the critic's capacity)."""
        w = self.workload
        generators = 0.0
        for calls in self.worker_calls:
            counted = calls[:-1] if len(calls) > 1 else calls
            if counted:
                per_image = sum(w.call_seconds(len(c.prompts)) for c in counted) / sum(len(c.prompts) for c in counted)
                generators += 1 / per_image
        critic = w.critic_ceiling / w.t_critic if w.critic_ceiling and w.t_critic > 0 else math.inf
        return {"generator_rounds_per_s": generators, "critic_rounds_per_s": critic, "bound": min(generators, critic)}

    def latencies(self) -> dict[str, float]:
        """Jobs' time in a worker (started → finished), against the lowest a job could take:
        each round one call at the batch reached plus one critique, nothing waited for."""
        w = self.workload
        seconds = [(d.finished_at or 0.0) - (d.started_at or 0.0) for d in self.docs]
        calls = self.calls
        mean_call = sum(w.call_seconds(len(c.prompts)) for c in calls) / len(calls)
        lowest = w.rounds * (mean_call + w.t_critic)
        p95 = percentile(seconds, 0.95)
        # Steady state: the jobs claimed once a first job had finished, when every worker had
        # measured whole round trips and its limits had met the critic's knee. The jobs
        # claimed before that ride the start-up ramp (slow start overshoots a knee once).
        first_finish = min(d.finished_at or math.inf for d in self.docs)
        steady = [s for s, d in zip(seconds, self.docs, strict=True) if (d.started_at or 0.0) >= first_finish]
        p95_steady = percentile(steady, 0.95) if steady else math.nan
        return {
            "p50_s": percentile(seconds, 0.5),
            "p95_s": p95,
            "lowest_s": lowest,
            "p95_over_lowest": p95 / lowest,
            "steady_jobs": len(steady),
            "p95_steady_s": p95_steady,
            "p95_steady_over_lowest": p95_steady / lowest,
        }

    def summary(self) -> dict[str, Any]:
        w = self.workload
        images = sum(len(c.prompts) for c in self.calls)
        bound = self.bound()
        rounds_per_s = self.steady_rounds_per_s
        busy = self.busy_fractions()
        return {
            "jobs": len(self.docs),
            "workers": w.workers,
            "rounds_done": self.rounds_done,
            "max_inflight_jobs": w.inflight,
            "max_batch": w.max_batch,
            "critic_ceiling": w.critic_ceiling,
            "generator_calls": len(self.calls),
            "mean_batch": images / len(self.calls),
            "window_s": self.window_s,
            "makespan_s": self.makespan_s,
            "busy_fraction": min(busy),
            "busy_fraction_mean": sum(busy) / len(busy),
            "busy_while_queued": self.busy_while_queued(),
            "gpu_idle_with_work_s": sum(idle_with_work(calls) for calls in self.worker_calls),
            "rounds_per_s": rounds_per_s,
            "rounds_per_s_end_to_end": self.rounds_done / self.makespan_s,
            "jobs_per_s": len(self.docs) / self.makespan_s,
            "bound_rounds_per_s": bound["bound"],
            "bound_detail": bound,
            "ratio_to_bound": rounds_per_s / bound["bound"],
            "latency": self.latencies(),
            "most_jobs_held": max(self.max_held),
            "overhead_s_per_round_minus_queueing": self.overhead_per_round(minus_queueing=True),
            "overhead_breakdown_s": self.overhead_breakdown(),
            "errors": self.errors,
        }


def dump_tasks() -> None:
    """Print every task's stack to stderr: where a stalled run is stuck."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


async def wait_for_workers(client: AsyncClient, worker_ids: Sequence[str]) -> None:
    """Until the gateway's /readyz lists these workers' heartbeats (they are claiming then)."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        report = await client.ready()
        seen = {w.get("id") for w in report.get("workers", [])}
        if set(worker_ids) <= seen:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"workers {list(worker_ids)} did not start in {WORKER_START_TIMEOUT_S:.0f}s")


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


async def configure_critic(critic_url: str, w: Workload) -> None:
    """The stand-in's pace for this run: `t_critic` per critique, at most `critic_ceiling` at once."""
    config = StandinConfig(latency_s=w.t_critic, default=STANDIN_SCORE, max_concurrency=w.critic_ceiling)
    root = critic_url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        (await http.post(f"{root}/standin/config", content=config.model_dump_json())).raise_for_status()


async def run_workload(
    w: Workload, *, name: str, redis_url: str, prefix: str, gateway_url: str, critic_url: str
) -> RunResult:
    """Start `w.workers` workers in this process, push `w.jobs` jobs through the gateway, follow them to the end."""
    await configure_critic(critic_url, w)
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "generator": f"sim:{w.t_gen}:{w.per_image}",
        "max_batch": w.max_batch,
        "batch_window_ms": w.batch_window_ms,
        "critic_base_url": critic_url,
        "critic_model": StandinConfig().model,
        **({"max_inflight_jobs": w.inflight} if w.inflight is not None else {}),
        **({"max_inflight_critiques": w.critic_concurrency} if w.critic_concurrency is not None else {}),
    }
    workers, generators, critics = [], [], []
    for n in range(w.workers):
        settings = Settings(**values, worker_id=f"bench-{name}-{n}-{uuid.uuid4().hex[:6]}")
        generator = RecordingGenerator(SimulatedGenerator(settings.generator or "", settings))
        critic = OpenAICritic(settings)
        workers.append(Worker(settings, generator, critic, connect_worker(settings, generator)))
        generators.append(generator)
        critics.append(critic)
    clock_offset = time.time() - time.perf_counter()
    tasks = [asyncio.create_task(wk.run(drain_grace_s=5.0), name=f"bench-worker-{wk.id}") for wk in workers]
    loop = {"max_rounds": w.rounds, "threshold": 1.0, "patience": None}
    # Generous: even one job at a time would be done well within it. A job that stalls
    # must fail the benchmark, not hang it.
    limit_s = 60 + 2 * w.jobs * w.rounds * (w.call_seconds(1) + w.t_critic)
    try:
        async with AsyncClient(gateway_url, timeout_s=60.0) as client:
            await wait_for_workers(client, [wk.id for wk in workers])
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
        for wk in workers:
            wk.stop()
        await asyncio.gather(*tasks)
        for critic in critics:
            await critic.aclose()
    errors = [
        f"job {d.id}: {d.status}/{d.stop_reason} after {len(d.rounds)} rounds"
        for d in docs
        if d.status != "succeeded" or d.stop_reason != "max_rounds" or len(d.rounds) != w.rounds
    ]
    held = [wk.max_held for wk in workers]
    return RunResult(w, docs, [g.calls for g in generators], held, first_submit, clock_offset, errors)


# --- the benchmark ----------------------------------------------------------------------------


async def measure(args: argparse.Namespace, gateway_url: str, critic_url: str, prefix: str) -> dict[str, Any]:
    where = {"redis_url": args.redis_url, "prefix": prefix, "gateway_url": gateway_url, "critic_url": critic_url}
    if args.ratios:
        runs = []
        for ratio in args.ratios:
            w = from_options(Workload, args, t_critic=ratio * args.t_gen)
            result = await run_workload(w, name=f"ratio-{ratio:g}", **where)
            runs.append({"critic_to_gen": ratio, **result.summary()})
        return sweep_report(args, runs)
    concurrent = from_options(Workload, args)
    main = await run_workload(concurrent, name="concurrent", **where)
    seq_jobs = min(args.jobs, 4) if args.seq_jobs is None else args.seq_jobs
    sequential = None
    if seq_jobs > 0 and args.workers == 1:
        baseline = Workload(**{**vars(concurrent), "jobs": seq_jobs, "inflight": 1, "max_batch": 1})
        sequential = await run_workload(baseline, name="sequential", **where)
    return report(args, main, sequential)


def _settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "jobs": args.jobs,
        "rounds": args.rounds,
        "t_gen": args.t_gen,
        "t_critic": args.t_critic,
        "per_image": args.per_image,
        "max_batch": args.max_batch,
        "workers": args.workers,
        "critic_ceiling": args.critic_ceiling,
        "inflight": args.inflight,
        "critic_concurrency": args.critic_concurrency,
        "batch_window_ms": args.batch_window_ms,
    }


def sweep_report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **run_info("orchestration-sweep", args.redis_url),
        "note": SIMULATION_NOTE,
        **_settings_of(args),
        "runs": runs,
        "errors": [e for run in runs for e in run["errors"]],
    }


def report(args: argparse.Namespace, main: RunResult, sequential: RunResult | None) -> dict[str, Any]:
    m = main.summary()
    seq_computed = 1 / (args.t_gen + args.t_critic)
    round_s = args.t_gen + args.t_critic
    out: dict[str, Any] = {
        **run_info("orchestration", args.redis_url),
        "note": SIMULATION_NOTE,
        **_settings_of(args),
        "busy_fraction": m["busy_fraction"],
        "rounds_per_s": m["rounds_per_s"],
        "rounds_per_s_end_to_end": m["rounds_per_s_end_to_end"],
        "jobs_per_s": m["jobs_per_s"],
        "bound_rounds_per_s": m["bound_rounds_per_s"],
        "ratio_to_bound": m["ratio_to_bound"],
        "latency": m["latency"],
        "most_jobs_held": m["most_jobs_held"],
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


def _cells(run: dict[str, Any]) -> dict[str, Any]:
    latency = run["latency"]
    return {
        **run,
        "overhead_ms": 1000 * run["overhead_s_per_round_minus_queueing"],
        "p50_s": latency["p50_s"],
        "p95_s": latency["p95_s"],
        "lowest_s": latency["lowest_s"],
        "p95_over_lowest": latency["p95_over_lowest"],
        "steady_jobs": latency["steady_jobs"],
        "p95_steady_s": latency["p95_steady_s"],
        "p95_steady_over_lowest": latency["p95_steady_over_lowest"],
    }


RUN_ROWS = (
    Column("jobs", "jobs queued", "{:d}"),
    Column("workers", "workers", "{:d}"),
    Column("most_jobs_held", "most jobs a worker held", "{:d}"),
    Column("max_batch", "max_batch", "{:d}"),
    Column("generator_calls", "generator calls", "{:d}"),
    Column("mean_batch", "mean batch", "{:.2f}"),
    Column("window_s", "window (first gen start → last gen end) s", "{:.2f}"),
    Column("makespan_s", "makespan (first submit → last finish) s", "{:.2f}"),
    Column("rounds_per_s", "rounds/s (sustained)", "{:.3f}"),
    Column("rounds_per_s_end_to_end", "rounds/s (end to end)", "{:.3f}"),
    Column("busy_fraction", "generator busy fraction (window, lowest worker)", "{:.3f}"),
    Column("busy_while_queued", "generator busy while jobs were queued", "{:.3f}"),
    Column("gpu_idle_with_work_s", "generator idle while work waited, s", "{:.3f}"),
    Column("bound_rounds_per_s", "bound rounds/s: min(generators, critic)", "{:.3f}"),
    Column("ratio_to_bound", "ratio to bound", "{:.3f}"),
    Column("p50_s", "job latency in a worker p50, s", "{:.2f}"),
    Column("p95_s", "job latency p95, s", "{:.2f}"),
    Column("lowest_s", "lowest latency (no wait), s", "{:.2f}"),
    Column("p95_over_lowest", "p95 / lowest", "{:.2f}"),
    Column("steady_jobs", "jobs claimed after the first finished", "{:d}"),
    Column("p95_steady_s", "their latency p95, s", "{:.2f}"),
    Column("p95_steady_over_lowest", "their p95 / lowest", "{:.2f}"),
    Column("overhead_ms", "overhead ms/round (minus GPU queueing)", "{:.1f}"),
)


def show(result: dict[str, Any]) -> None:
    """Print the runs side by side, then the targets."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "runs" in result:
        show_sweep(result, console)
        return
    runs = {"concurrent": _cells(result["concurrent"])}
    if "sequential" in result:
        runs["sequential"] = _cells(result["sequential"])
    ceiling = f", critic ceiling {result['critic_ceiling']}" if result["critic_ceiling"] else ""
    table = Table(
        title=f"orchestration: {result['jobs']} jobs x {result['rounds']} rounds, t_gen {result['t_gen']}s "
        f"(+{result['per_image']}s per extra image), t_critic {result['t_critic']}s, "
        f"{result['workers']} worker(s){ceiling}"
    )
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    for column in RUN_ROWS:
        table.add_row(column.title, *(_cell_text(column, run) for run in runs.values()))
    console.print(table)

    bar_e = result["t_gen"] == result["t_critic"] and result["jobs"] >= 4 and result["workers"] == 1
    rows: list[dict[str, Any]] = [
        {
            "metric": "generator busy fraction",
            "value": result["busy_fraction"],
            "target": ">= 0.95 (t_critic = t_gen, J>=4)",
            "ok": result["busy_fraction"] >= 0.95 if bar_e else None,
        },
        {
            "metric": "speedup vs sequential, measured",
            "value": result["speedup_vs_sequential"],
            "target": ">= 1.9 (t_critic = t_gen, J>=4)",
            "ok": result["speedup_vs_sequential"] >= 1.9 if bar_e and "sequential" in result else None,
        },
        {"metric": "speedup vs sequential, computed", "value": result["speedup_vs_sequential_computed"]},
        {
            "metric": "ratio to bound",
            "value": result["ratio_to_bound"],
            "target": ">= 0.9",
            "ok": result["ratio_to_bound"] >= 0.9,
        },
        {"metric": "p95 job latency / lowest, all jobs", "value": result["latency"]["p95_over_lowest"]},
        {
            "metric": "p95 job latency / lowest, steady state",
            "value": result["latency"]["p95_steady_over_lowest"],
            "target": "<= 1.5 (with a critic ceiling)",
            "ok": result["latency"]["p95_steady_over_lowest"] <= 1.5 if result["critic_ceiling"] else None,
        },
        {
            "metric": "overhead / (t_gen + t_critic)",
            "value": result["overhead_fraction"],
            "target": "<= 0.02 (sequential run)",
            "ok": result["overhead_fraction"] <= 0.02 if "sequential" in result else None,
        },
    ]
    print_targets(rows, title="targets")
    console.print(SIMULATION_NOTE)
    for error in result["errors"]:
        console.print(f"[red]ERROR[/red]: {error}")


def _cell_text(column: Column, run: dict[str, Any]) -> str:
    value = run.get(column.key)
    return "-" if value is None else column.fmt.format(value)


def show_sweep(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    runs = [_cells(run) for run in result["runs"]]
    table = Table(
        title=f"orchestration sweep: {result['jobs']} jobs x {result['rounds']} rounds, t_gen {result['t_gen']}s, "
        f"default settings, t_critic = ratio x t_gen"
    )
    table.add_column("metric")
    for run in runs:
        table.add_column(f"{run['critic_to_gen']:g}x", justify="right")
    for column in RUN_ROWS:
        table.add_row(column.title, *(_cell_text(column, run) for run in runs))
    console.print(table)
    rows = [
        {
            "metric": f"generator busy while jobs were queued, {run['critic_to_gen']:g}x",
            "value": run["busy_while_queued"],
            "target": ">= 0.95",
            "ok": run["busy_while_queued"] >= 0.95,
        }
        for run in runs
        if run["critic_to_gen"] >= 30
    ]
    print_targets(rows, title="targets (defaults, t_critic = 30 and 60 x t_gen)")
    console.print(SIMULATION_NOTE)
    for error in result["errors"]:
        console.print(f"[red]ERROR[/red]: {error}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argument_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=16, help="jobs queued at once J (default 16)")
    add_simulation_options(parser, t_critic=1.0)
    parser.add_argument("--per-image", type=float, default=0.0, help="extra seconds per image beyond the first")
    parser.add_argument("--max-batch", type=int, default=1, help="scheduler max_batch of the concurrent run")
    parser.add_argument("--batch-window-ms", type=float, default=defaults.batch_window_ms)
    parser.add_argument(
        "--inflight", type=int, default=None, help="max_inflight_jobs (default: the setting's, a ceiling)"
    )
    parser.add_argument(
        "--critic-concurrency", type=int, default=None, help="max_inflight_critiques (default: the setting's)"
    )
    parser.add_argument(
        "--critic-ceiling", type=int, default=None, help="the stand-in's throughput ceiling: critiques at once"
    )
    parser.add_argument("--workers", type=int, default=1, help="workers sharing the queue and the critic")
    parser.add_argument(
        "--ratios",
        type=lambda text: [float(x) for x in text.split(",")],
        default=None,
        help="a sweep: one run per t_critic/t_gen ratio (e.g. 1,10,30,60), t_critic = ratio x t_gen",
    )
    parser.add_argument("--seq-jobs", type=int, default=None, help="jobs of the measured sequential run (0: skip)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1 or args.max_batch < 1 or args.workers < 1:
        parser.error("--jobs, --rounds, --max-batch and --workers must be >= 1")
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
