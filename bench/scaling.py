"""Scaling benchmark: do workers add up? Rounds per second with 1, 2, 4, 8, 16 worker processes.

    python bench/scaling.py [--workers 1,2,4,8,16] [--duration 20] --json OUT

What runs, all on loopback, for each N:
- Redis (the one at `--redis-url`; each run's keys under a fresh `gcr-scaling-*` prefix,
  deleted after it);
- the REAL gateway (`service.gateway.app` under uvicorn) in a subprocess;
- N REAL worker processes (`gcr worker`, as a deployment runs them) on the simulated
  generator `sim:T_GEN` (a timed wait per image, max_batch 1: one image at a time, as
  one GPU) under one model name, each holding `--inflight` jobs;
- the stand-in critic (an OpenAI-compatible HTTP server answering after `--t-critic`
  seconds) in a subprocess, shared by every run.
This process submits jobs through the gateway's HTTP API and keeps at least N x
inflight jobs queued, so no worker ever waits for work. After `--warmup` seconds it
measures for `--duration` seconds.

What it reports per N (the window is the measured `--duration`):
- rounds_per_s: the rounds whose `finished_at` falls in the window, per worker (rounds - 1
  over its first to last finish), summed over the workers; `rounds_in_window_per_s`, all
  rounds in the window over its length, beside it as a cross-check;
- efficiency: rounds_per_s(N) / (N x rounds_per_s(1)), both measured in this run;
- ratio_to_bound: rounds_per_s over N / t_gen, what N GPUs busy all the time would do;
- redis_commands_per_round: Redis's `total_commands_processed` over the window, every
  client's (gateway, workers, this driver), per round;
- redis_cpu_ms_per_round: Redis's own CPU time (INFO cpu) per round: one Redis core
  saturates near 1000 / redis_cpu_ms_per_round rounds/s (`redis_rounds_per_s_ceiling`);
- redis_bytes_per_job: MEMORY USAGE of a finished job's keys (document, rounds, events);
  the images are in the artifact store, not in Redis;
- cpu_ms_per_round by process (workers, gateway, critic, Redis) and machine_busy (the
  share of all CPUs busy during the window): when machine_busy nears 1, the machine,
  not gcr, is the limit.

Simulated: the generator and the critic are timed waits; what is measured is gcr's
orchestration of real processes over real Redis and HTTP, not GPU or vLLM speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil
import redis as redis_sync

from bench.common import (
    ROOT,
    Column,
    add_simulation_options,
    argument_parser,
    finish,
    from_options,
    machine_info,
    print_table,
)
from bench.servers import gateway_server, reap, standin_critic
from service.jobs.keys import Keys
from workers.critics.standin_config import StandinConfig

MODEL = "scaling-sim"
STANDIN_SCORE = 0.5  # below the threshold of 1.0: every job runs all its rounds
WORKER_START_TIMEOUT_S = 180.0
TOP_UP_S = 0.25
GOAL = {"efficiency": 0.9, "workers": 8}
SIMULATION_NOTE = (
    "simulation: generator and critic are timed waits; measured is gcr's orchestration of real "
    "worker processes, gateway, Redis and HTTP"
)


@dataclass(frozen=True)
class Load:
    t_gen: float
    t_critic: float
    rounds: int
    inflight: int
    warmup: float
    duration: float
    redis_url: str
    critic_url: str


# --- processes ------------------------------------------------------------------------------------


def worker_env(load: Load, prefix: str, artifacts: str, worker_id: str) -> dict[str, str]:
    return {
        **os.environ,
        "GCR_REDIS_URL": load.redis_url,
        "GCR_REDIS_PREFIX": prefix,
        "GCR_ARTIFACT_URL": f"file://{artifacts}",
        "GCR_CRITIC_BASE_URL": load.critic_url,
        "GCR_CRITIC_MODEL": StandinConfig().model,
        "GCR_GENERATOR": f"sim:{load.t_gen}",
        "GCR_MODEL_NAME": MODEL,
        "GCR_WORKER_ID": worker_id,
        "GCR_MAX_BATCH": "1",
        "GCR_MAX_INFLIGHT_JOBS": str(load.inflight),
        "GCR_DRAIN_GRACE_S": "0",
        "GCR_LOG_FORMAT": "text",
    }


@contextlib.contextmanager
def worker_processes(n: int, load: Load, prefix: str, artifacts: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """N `gcr worker` processes, stopped with SIGTERM (they release their jobs) at the end."""
    logs: list[IO[bytes]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            log: IO[bytes] = tempfile.TemporaryFile()
            logs.append(log)
            argv = [sys.executable, "-m", "service.cli", "worker"]
            env = worker_env(load, prefix, artifacts, f"scaling-w{i}")
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        wait_for_heartbeats(procs, logs, load.redis_url, prefix)
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            reap(proc, 20)
        for log in logs:
            log.close()


def wait_for_heartbeats(
    procs: Sequence[subprocess.Popen[bytes]], logs: Sequence[IO[bytes]], url: str, prefix: str
) -> None:
    client = redis_sync.Redis.from_url(url)
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    try:
        while client.zcard(Keys(prefix).heartbeats()) < len(procs):
            for proc, log in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"a worker exited with {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(procs)} workers did not all heartbeat within {WORKER_START_TIMEOUT_S:.0f}s")
            time.sleep(0.2)
    finally:
        client.close()


# --- load and measurement -----------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds of the measured processes and the machine's busy share, between two reads."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}
        self._start: dict[str, float] = {}
        self._machine: Any = None

    def _read(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for name, procs in self.groups.items():
            total = 0.0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
            used[name] = total
        return used

    def start(self) -> None:
        self._start, self._machine = self._read(), psutil.cpu_times()

    def stop(self) -> tuple[dict[str, float], float]:
        end, machine = self._read(), psutil.cpu_times()
        busy = sum(machine) - sum(self._machine) - (machine.idle - self._machine.idle)
        busy -= getattr(machine, "iowait", 0.0) - getattr(self._machine, "iowait", 0.0)
        total = sum(machine) - sum(self._machine)
        return {name: end[name] - self._start[name] for name in end}, busy / total if total else 0.0


@dataclass(frozen=True)
class RedisCounters:
    commands: int
    cpu_s: float
    by_command: dict[str, int]

    @classmethod
    def read(cls, client: redis_sync.Redis) -> RedisCounters:
        stats, cpu, commandstats = client.info("stats"), client.info("cpu"), client.info("commandstats")
        return cls(
            int(stats["total_commands_processed"]),
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in commandstats.items()},
        )

    def per_round(self, before: RedisCounters, rounds: int, top: int = 10) -> dict[str, float]:
        """The commands called most in between, per round."""
        calls = {name: n - before.by_command.get(name, 0) for name, n in self.by_command.items()}
        ranked = sorted(calls.items(), key=lambda kv: -kv[1])[:top]
        return {name: round(n / rounds, 2) for name, n in ranked if n > 0}


async def keep_queued(gateway_url: str, load: Load, prefix: str, backlog: int, until: float) -> list[str]:
    """Submit jobs until `until`, keeping at least `backlog` of them queued; returns their ids."""
    loop = {"max_rounds": load.rounds, "threshold": 1.0, "patience": None, "candidates_per_round": 1}
    queued_index = Keys(prefix).queued_index()
    client = redis_sync.asyncio.Redis.from_url(load.redis_url)
    ids: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
            while time.monotonic() < until:
                missing = 2 * backlog - int(await client.zcard(queued_index))
                if missing > backlog // 2:
                    for _ in range(missing):
                        body = {"prompt": f"scaling job {len(ids)}", "model": MODEL, "loop": loop}
                        response = await http.post("/generate", json=body)
                        if response.status_code != 202:
                            raise RuntimeError(f"submit refused: {response.status_code} {response.text[:300]}")
                        ids.append(response.json()["id"])
                await asyncio.sleep(TOP_UP_S)
    finally:
        await client.aclose()
    return ids


def finished_rounds(client: redis_sync.Redis, keys: Keys, ids: Sequence[str]) -> dict[str, list[float]]:
    """`finished_at` of every round of the jobs `ids`, by the worker that ran the job."""
    by_worker: dict[str, list[float]] = {}
    with client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(keys.job(job_id), "worker")
            pipe.lrange(keys.rounds(job_id), 0, -1)
        replies = pipe.execute()
    for worker, rounds in zip(replies[::2], replies[1::2], strict=True):
        if worker is not None:
            times = by_worker.setdefault(json.loads(worker), [])
            times.extend(float(json.loads(raw)["finished_at"]) for raw in rounds)
    return by_worker


def rate(times: Sequence[float]) -> float:
    """Rounds per second of one worker: (rounds - 1) over its first to last finish. A count over
    the window's length would be off by up to a round at either end (5% of a 20-round window)."""
    ordered = sorted(times)
    if len(ordered) < 2 or ordered[-1] == ordered[0]:
        return 0.0
    return (len(ordered) - 1) / (ordered[-1] - ordered[0])


def bytes_per_finished_job(client: redis_sync.Redis, keys: Keys, ids: Sequence[str]) -> float | None:
    """Mean MEMORY USAGE of a succeeded job's keys: its document, rounds and events."""
    done = [i for i in ids if client.hget(keys.job(i), "status") == b'"succeeded"']
    if not done:
        return None
    used = 0
    for job_id in done:
        for key in (keys.job(job_id), keys.rounds(job_id), keys.events(job_id)):
            used += int(client.memory_usage(key) or 0)
    return used / len(done)


def measure(n: int, load: Load, critic_pid: int) -> dict[str, Any]:
    """One run: a fresh prefix, gateway and N workers; the load; the numbers."""
    prefix = f"gcr-scaling-{uuid.uuid4().hex[:8]}-n{n}"
    keys = Keys(prefix)
    client = redis_sync.Redis.from_url(load.redis_url)
    redis_pid = int(client.info("server")["process_id"])
    try:
        with (
            tempfile.TemporaryDirectory(prefix="gcr-scaling-") as artifacts,
            gateway_server(load.redis_url, prefix, GCR_ARTIFACT_URL=f"file://{artifacts}") as gateway,
            worker_processes(n, load, prefix, artifacts) as workers,
        ):
            groups = {
                "workers": [w.pid for w in workers],
                "gateway": [gateway.process.pid],
                "critic": [critic_pid],
                "redis": [redis_pid],
            }
            meter = CpuMeter(groups)
            result = asyncio.run(_drive(n, load, prefix, gateway.url, client, meter))
            result["redis_bytes_per_job"] = bytes_per_finished_job(client, keys, result.pop("ids"))
            return result
    finally:
        client.close()


async def _drive(
    n: int, load: Load, prefix: str, gateway_url: str, client: redis_sync.Redis, meter: CpuMeter
) -> dict[str, Any]:
    started = time.monotonic()
    window_start = started + load.warmup
    window_end = window_start + load.duration
    driver = asyncio.create_task(keep_queued(gateway_url, load, prefix, n * load.inflight, window_end))
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    t0, before = time.time(), RedisCounters.read(client)
    meter.start()
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    t1, after = time.time(), RedisCounters.read(client)
    cpu, busy = meter.stop()
    ids = await driver
    by_worker = {
        worker: [at for at in times if t0 <= at <= t1]
        for worker, times in finished_rounds(client, Keys(prefix), ids).items()
    }
    rounds = sum(len(times) for times in by_worker.values())
    # Summed per worker: each worker's rounds come at its own steady pace, while the fleet's
    # arrive in clusters (workers started together), which a fleet-wide first-to-last span misreads.
    total = sum(rate(times) for times in by_worker.values())
    per_round = max(rounds, 1)
    redis_cpu_ms = 1000 * (after.cpu_s - before.cpu_s) / per_round
    return {
        "workers": n,
        "rounds": rounds,
        "window_s": round(t1 - t0, 3),
        "rounds_per_s": total,
        # The cross-check: a worker that started late or stalled at an edge of the window
        # lowers this one, not the per-worker sum.
        "rounds_in_window_per_s": rounds / (t1 - t0),
        "workers_with_rounds": len([t for t in by_worker.values() if t]),
        "ratio_to_bound": total / (n / load.t_gen),
        "jobs_submitted": len(ids),
        "redis_commands_per_round": (after.commands - before.commands) / per_round,
        "redis_top_commands_per_round": after.per_round(before, per_round),
        "redis_cpu_ms_per_round": redis_cpu_ms,
        "redis_rounds_per_s_ceiling": 1000 / redis_cpu_ms if redis_cpu_ms > 0 else None,
        "cpu_ms_per_round": {name: 1000 * seconds / per_round for name, seconds in cpu.items()},
        "machine_busy": busy,
        "ids": ids,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    counts = sorted(set(args.workers) | {1})  # efficiency needs the one-worker rate of this run
    info = machine_info(args.redis_url)
    with standin_critic(args.t_critic, STANDIN_SCORE) as critic:
        load = from_options(Load, args, critic_url=f"{critic.url}/v1")
        runs = []
        for n in counts:
            result = measure(n, load, critic.process.pid)
            runs.append(result)
            print(f"{n} workers: {result['rounds_per_s']:.2f} rounds/s", file=sys.stderr)
    single = runs[0]["rounds_per_s"]
    for result in runs:
        result["efficiency"] = result["rounds_per_s"] / (result["workers"] * single) if single else None
    top = runs[-1]
    return {
        "runs": runs,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "redis_url")},
        "goal": {
            **GOAL,
            # None: no run had enough workers to say.
            "met": (top["efficiency"] or 0) >= GOAL["efficiency"] if top["workers"] >= GOAL["workers"] else None,
        },
        "machine": info,
        "note": SIMULATION_NOTE,
    }


def show(result: dict[str, Any]) -> None:
    rows = [
        {**r, **{f"cpu_{k}": v for k, v in r["cpu_ms_per_round"].items()}, "machine_busy_pct": 100 * r["machine_busy"]}
        for r in result["runs"]
    ]
    print_table(
        "gcr scaling: N worker processes, one gateway, one Redis (simulated GPU and critic)",
        [
            Column("workers", "workers", "{:d}"),
            Column("rounds_per_s", "rounds/s", "{:.2f}"),
            Column("efficiency", "efficiency", "{:.3f}"),
            Column("ratio_to_bound", "of N/t_gen", "{:.3f}"),
            Column("redis_commands_per_round", "Redis cmds/round", "{:.1f}"),
            Column("redis_cpu_ms_per_round", "Redis CPU ms/round", "{:.3f}"),
            Column("cpu_workers", "workers CPU ms/round", "{:.1f}"),
            Column("cpu_gateway", "gateway CPU ms/round", "{:.1f}"),
            Column("redis_bytes_per_job", "Redis B/job", "{:.0f}"),
            Column("machine_busy_pct", "machine busy %", "{:.0f}"),
        ],
        rows,
    )
    goal = result["goal"]
    verdict = {True: "met", False: "NOT met", None: f"not measured (no run of {goal['workers']} or more workers)"}[
        goal["met"]
    ]
    print(f"goal: efficiency >= {goal['efficiency']} at >= {goal['workers']} workers: {verdict}")
    print(result["note"])


def worker_counts(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4] (argparse names this function in its message when it fails)."""
    return [int(part) for part in text.split(",")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--workers", type=worker_counts, default=[1, 2, 4, 8, 16], help="e.g. 1,2,4,8,16")
    add_simulation_options(parser, t_critic=0.5)
    parser.add_argument("--inflight", type=int, default=4, help="jobs per worker at once (default 4)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring (default 5)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per run (default 20)")
    args = parser.parse_args(argv)
    if min(args.workers) < 1 or args.rounds < 1 or args.inflight < 1 or args.duration <= 0 or args.t_gen <= 0:
        parser.error("--workers, --rounds and --inflight must be >= 1; --duration and --t-gen > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(run(args), args.json, show)


if __name__ == "__main__":
    sys.exit(main())
