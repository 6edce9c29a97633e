"""Scheduling behaviour (not speed): micro-batching, in-flight bounds, claiming, fairness.

The batcher is driven through a recording fake `Generator` that can hold its first
call, so the requests that arrive meanwhile are all waiting when the GPU frees up
and the grouping is deterministic. The in-flight bounds are observed at the critic:
a stand-in whose HTTP app counts the chat requests it is serving at once. Queue
claims run against a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import statistics
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from PIL import Image

from gcr.types import PRIORITIES, PromptFit
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.queue import FAIRNESS, JobQueue
from service.servers import serving
from tests.stack import Stack
from workers.critics.standin import create_app as create_standin
from workers.critics.standin_config import StandinConfig
from workers.critique_limit import INITIAL
from workers.generators.base import NO_HOOKS, GenRequest, StepHooks
from workers.scheduler import GenerationScheduler

# --- the micro-batcher ---------------------------------------------------------------------------


class RecordingGenerator:
    """Implements the `Generator` protocol; records every call; can hold the first one."""

    name = "recording"
    modes = frozenset({"t2i"})

    def __init__(self, max_batch: int = 8, hold_first: bool = True) -> None:
        self.max_batch = max_batch
        self.runtime: dict[str, Any] = {"device": "none (test recorder)"}
        self.calls: list[list[GenRequest]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def resolve(self, request: GenRequest) -> GenRequest:
        return dataclasses.replace(
            request, width=request.width or 64, height=request.height or 64, steps=request.steps or 4
        )

    def fit_prompt(self, request: GenRequest) -> tuple[str, PromptFit] | None:
        return None

    def generate(self, requests: Sequence[GenRequest], hooks: StepHooks = NO_HOOKS) -> list[Image.Image]:
        assert len(requests) <= self.max_batch
        self.calls.append(list(requests))
        self.first_started.set()
        assert self.release.wait(10), "the test never released the generator"
        return [Image.new("RGB", (r.width or 1, r.height or 1)) for r in requests]

    def batch_sizes(self) -> list[int]:
        return [len(call) for call in self.calls]


def request(prompt: str, width: int | None = None, steps: int | None = None) -> GenRequest:
    return GenRequest(prompt=prompt, seed=0, width=width, steps=steps)


@contextlib.asynccontextmanager
async def running(generator: RecordingGenerator, max_batch: int, window_s: float = 0.0) -> AsyncIterator[Any]:
    scheduler = GenerationScheduler(generator, max_batch, window_s)
    await scheduler.start()
    try:
        yield scheduler
    finally:
        generator.release.set()
        await scheduler.stop()


async def occupy(generator: RecordingGenerator, scheduler: GenerationScheduler) -> asyncio.Task[Any]:
    """Start a call that holds the generator, so what comes next queues behind it."""
    blocker = asyncio.create_task(scheduler.generate([request("blocker")]))
    assert await asyncio.to_thread(generator.first_started.wait, 5)
    return blocker


async def test_compatible_requests_share_a_call_and_incompatible_ones_never_do() -> None:
    generator = RecordingGenerator()
    async with running(generator, max_batch=8) as scheduler:
        blocker = await occupy(generator, scheduler)
        # Seven jobs ask while the GPU is busy, interleaving three kinds of request.
        asks = [
            scheduler.generate([request("a1")]),
            scheduler.generate([request("wide1", width=128)]),
            scheduler.generate([request("steps1", steps=8)]),
            scheduler.generate([request("a2")]),
            scheduler.generate([request("wide2", width=128)]),
            scheduler.generate([request("a3")]),
            scheduler.generate([request("steps2", steps=8)]),
        ]
        tasks = [asyncio.create_task(ask) for ask in asks]
        await asyncio.sleep(0.05)  # all seven are queued
        generator.release.set()
        results = await asyncio.gather(blocker, *tasks)

    prompts = [[r.prompt for r in call] for call in generator.calls]
    # Oldest first; each call takes every waiting request of the oldest's kind.
    assert prompts == [["blocker"], ["a1", "a2", "a3"], ["wide1", "wide2"], ["steps1", "steps2"]]
    for call in generator.calls:
        assert len({r.batch_key() for r in call}) == 1, f"mixed batch: {call}"
    # Every caller got its own image back.
    sizes = [result[0].image.size for result in results[1:] if result[0].image is not None]
    assert sizes == [(64, 64), (128, 64), (64, 64), (64, 64), (128, 64), (64, 64), (64, 64)]


async def test_max_batch_is_respected() -> None:
    generator = RecordingGenerator()
    async with running(generator, max_batch=3) as scheduler:
        blocker = await occupy(generator, scheduler)
        tasks = [asyncio.create_task(scheduler.generate([request(f"r{i}")])) for i in range(10)]
        await asyncio.sleep(0.05)
        generator.release.set()
        await asyncio.gather(blocker, *tasks)
    assert generator.batch_sizes() == [1, 3, 3, 3, 1]
    assert [r.prompt for call in generator.calls[1:] for r in call] == [f"r{i}" for i in range(10)]


async def test_the_generator_batch_limit_caps_the_scheduler() -> None:
    generator = RecordingGenerator(max_batch=2)
    async with running(generator, max_batch=8) as scheduler:
        blocker = await occupy(generator, scheduler)
        # One job with five candidates: its requests are split, in order, into calls of two.
        job = asyncio.create_task(scheduler.generate([request(f"c{i}") for i in range(5)]))
        await asyncio.sleep(0.05)
        generator.release.set()
        await asyncio.gather(blocker, job)
    assert scheduler.max_batch == 2
    assert generator.batch_sizes() == [1, 2, 2, 1]


async def test_the_window_waits_for_company_when_the_gpu_is_idle() -> None:
    generator = RecordingGenerator(hold_first=False)
    async with running(generator, max_batch=4, window_s=1.0) as scheduler:
        first = asyncio.create_task(scheduler.generate([request("early")]))
        await asyncio.sleep(0.1)  # well inside the window
        await asyncio.gather(first, scheduler.generate([request("late")]))
    assert [[r.prompt for r in call] for call in generator.calls] == [["early", "late"]]


async def test_requests_of_cancelled_or_abandoned_jobs_never_reach_the_generator() -> None:
    generator = RecordingGenerator()
    async with running(generator, max_batch=8) as scheduler:
        blocker = await occupy(generator, scheduler)
        cancelled_job = asyncio.create_task(scheduler.generate([request("cancelled")], cancelled=lambda: True))
        abandoned = asyncio.create_task(scheduler.generate([request("abandoned")]))
        kept = asyncio.create_task(scheduler.generate([request("kept")]))
        await asyncio.sleep(0.05)
        abandoned.cancel()  # its job task went away (worker draining, say)
        generator.release.set()
        [result] = await cancelled_job
        await asyncio.gather(blocker, kept)
    assert result.image is None and result.error is None
    assert [[r.prompt for r in call] for call in generator.calls] == [["blocker"], ["kept"]]


async def test_a_request_the_backend_refuses_queues_nothing() -> None:
    class Picky(RecordingGenerator):
        def resolve(self, request: GenRequest) -> GenRequest:
            if request.prompt == "bad":
                raise ValueError("refused")
            return super().resolve(request)

    generator = Picky(hold_first=False)
    async with running(generator, max_batch=8) as scheduler:
        with pytest.raises(ValueError):
            await scheduler.generate([request("good"), request("bad")])
        await scheduler.generate([request("next")])
    assert [[r.prompt for r in call] for call in generator.calls] == [["next"]]


# --- in-flight bounds, observed at the critic ---------------------------------------------------


class ConcurrencyCounter:
    """ASGI wrapper: how many chat completions the critic serves at once, at most."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.current = 0
        self.peak = 0
        self.total = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        self.current += 1
        self.total += 1
        self.peak = max(self.peak, self.current)
        try:
            await self.app(scope, receive, send)
        finally:
            self.current -= 1


@pytest.fixture
async def counted_critic() -> AsyncIterator[tuple[str, ConcurrencyCounter]]:
    """A stand-in critic answering after 0.3 s, counting its concurrent requests."""
    counter = ConcurrencyCounter(create_standin(StandinConfig(latency_s=0.3)))
    async with serving(counter, lifespan="off", ws="none") as url:
        yield f"{url}/v1", counter


@pytest.fixture
async def counted_stack(
    redis_url: str, redis_prefix: str, counted_critic: tuple[str, ConcurrencyCounter]
) -> AsyncIterator[tuple[Stack, ConcurrencyCounter]]:
    url, counter = counted_critic
    async with Stack(redis_url, redis_prefix, url) as stack:
        yield stack, counter


ONE_ROUND = {"max_rounds": 1, "threshold": 1.0, "patience": None}
# NOTE: not sim:0.0, and sim:2.6 below rather than a multiple of 0.25 s: a generation
# that ends just as the runner's cancel-flag poller sends its HGET can lose the
# poller's cancellation on Python 3.11 (redis-py's wait_for; see bench/README.md) and
# leave the job stuck in `generating`. These durations end between two polls.
QUICK = "sim:0.1"


async def test_max_inflight_jobs_bounds_the_jobs_running_at_once(
    counted_stack: tuple[Stack, ConcurrencyCounter],
) -> None:
    stack, counter = counted_stack
    await stack.start_worker(generator=QUICK, max_inflight_jobs=2, max_inflight_critiques=16)
    ids = [await stack.submit(f"bounded job {i}", loop=ONE_ROUND) for i in range(6)]
    docs = [await stack.wait(job_id) for job_id in ids]

    assert all(d.status == "succeeded" for d in docs)
    assert counter.total == 6
    # One critique per running job (one candidate): the critic saw exactly the bound.
    assert counter.peak == 2


async def test_max_inflight_critiques_bounds_the_critic_requests_at_once(
    counted_stack: tuple[Stack, ConcurrencyCounter],
) -> None:
    stack, counter = counted_stack
    await stack.start_worker(generator=QUICK, max_inflight_jobs=8, max_inflight_critiques=2)
    ids = [await stack.submit(f"critiqued job {i}", loop={**ONE_ROUND, "candidates_per_round": 3}) for i in range(2)]
    docs = [await stack.wait(job_id) for job_id in ids]

    assert all(d.status == "succeeded" for d in docs)
    assert counter.total == 6
    assert counter.peak == 2


async def test_a_worker_at_capacity_leaves_new_jobs_to_another_worker(stack: Stack) -> None:
    # Two workers of one model (their simulated speeds differ, their name does not).
    await stack.start_worker(generator="sim:2.6", model_name="sim", max_inflight_jobs=1)  # w0: one job at a time
    slow = await stack.submit("slow job", loop=ONE_ROUND)
    async with asyncio.timeout(10):
        while (doc := await stack.client.get(slow)).status != "running":
            await asyncio.sleep(0.05)
    assert doc.worker == "w0"

    await stack.start_worker(generator=QUICK, model_name="sim", max_inflight_jobs=4)  # w1
    quick = await stack.wait(await stack.submit("quick job", loop=ONE_ROUND))
    assert quick.status == "succeeded" and quick.worker == "w1"
    assert (await stack.client.get(slow)).status == "running", "w0 is still busy with the slow job"
    assert (await stack.wait(slow)).worker == "w0"


# --- demand-driven claiming and the critique limit ----------------------------------------------

TWO_ROUNDS = {"max_rounds": 2, "threshold": 1.0, "patience": None}


async def statuses(stack: Stack, ids: Sequence[str]) -> list[str]:
    return [(await stack.client.get(job_id)).status for job_id in ids]


async def test_a_worker_claims_what_its_generator_needs_and_leaves_the_rest_to_others(stack: Stack) -> None:
    # A critique five generations long, one image a call: the generator needs some 7 jobs to
    # stay busy (Little's law, workers/demand.py); the safety cap, max_inflight_jobs, is left
    # at its default of 256.
    await stack.configure_critic(StandinConfig(latency_s=0.5))
    first = await stack.start_worker(generator=QUICK, model_name="sim", max_batch=1)
    ids = [await stack.submit(f"demand job {i}", loop=TWO_ROUNDS) for i in range(40)]
    await asyncio.sleep(2.0)
    assert 4 <= len(first.active) <= 14, f"holds {len(first.active)} jobs"
    assert (await statuses(stack, ids)).count("queued") >= 20, "jobs it does not need stay in the shared queue"

    second = await stack.start_worker(generator=QUICK, model_name="sim", max_batch=1)
    docs = [await stack.wait(job_id, timeout_s=60) for job_id in ids]
    assert all(d.status == "succeeded" for d in docs)
    ran = {d.worker for d in docs}
    assert ran == {first.id, second.id}, "the second worker found jobs left for it"
    assert first.max_held <= 14 and second.max_held <= 14


async def test_the_critique_limit_settles_at_the_critics_ceiling(stack: Stack) -> None:
    # The critic answers two at a time (the rest queue, as in vLLM past its batch knee): the
    # worker's limit starts at 4, meets the queue, and keeps the critic's two slots busy
    # without a standing queue; its jobs stay few, the rest wait in the shared queue.
    await stack.configure_critic(StandinConfig(latency_s=0.3, max_concurrency=2))
    worker = await stack.start_worker(generator=QUICK, model_name="sim", max_batch=1)
    ids = [await stack.submit(f"ceiling job {i}", loop=TWO_ROUNDS) for i in range(24)]
    base = stack.critic_url.removesuffix("/v1")
    waiting: list[float] = []
    async with httpx.AsyncClient() as http:
        while any(s not in ("succeeded", "failed") for s in await statuses(stack, ids)):
            text = (await http.get(f"{base}/metrics")).text
            gauge = re.search(r"vllm:num_requests_waiting\{[^}]*\} (\S+)", text)
            assert gauge is not None, text
            waiting.append(float(gauge[1]))
            await asyncio.sleep(0.1)
    docs = [await stack.wait(job_id) for job_id in ids]
    assert all(d.status == "succeeded" for d in docs)
    assert worker.critiques.limit <= 3
    settled = waiting[len(waiting) // 2 :]
    assert statistics.mean(settled) <= 1.0, f"the critic kept a queue: {settled}"
    # Slow start overshoots the knee once (claims run one doubling ahead, plus a job ready).
    assert worker.max_held <= 2 * INITIAL + 1, f"held {worker.max_held} of the 24 jobs"


# --- queue claims: fairness across priorities -------------------------------------------------------


@pytest.fixture
async def queue(redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[JobQueue, Any, Keys]]:
    client = connect(redis_url)
    keys = Keys(redis_prefix)
    job_queue = JobQueue(client, keys, "sim", modes={"t2i"})
    await job_queue.ensure_groups()
    try:
        yield job_queue, client, keys
    finally:
        await client.aclose()


async def fill(client: Any, keys: Keys, counts: dict[str, int]) -> None:
    for priority, count in counts.items():
        for i in range(count):
            await client.xadd(keys.queue("sim", "t2i", priority), {"job": f"{priority}-{i}"})


async def test_claims_follow_the_fairness_schedule_and_low_is_not_starved(
    queue: tuple[JobQueue, Any, Keys],
) -> None:
    job_queue, client, keys = queue
    await fill(client, keys, {"high": 20, "normal": 20, "low": 20})

    claims = [claim for _ in range(2 * len(FAIRNESS)) for claim in await job_queue.claim("c", 1)]

    assert [c.priority for c in claims] == [*FAIRNESS, *FAIRNESS]
    first_low = next(i for i, c in enumerate(claims) if c.priority == "low")
    high_taken = sum(1 for c in claims[:first_low] if c.priority == "high")
    assert first_low < len(FAIRNESS) and high_taken < 20, "low got a turn while high still had entries"
    # Within a priority, first come first served.
    for priority in PRIORITIES:
        ids = [c.job_id for c in claims if c.priority == priority]
        assert ids == [f"{priority}-{i}" for i in range(len(ids))]


async def test_one_claim_of_many_entries_keeps_the_same_shares(queue: tuple[JobQueue, Any, Keys]) -> None:
    job_queue, client, keys = queue
    await fill(client, keys, {"high": 20, "normal": 20, "low": 20})
    claims = await job_queue.claim("c", len(FAIRNESS))
    assert sorted(c.priority for c in claims) == sorted(FAIRNESS)


async def test_an_empty_priority_gives_its_turn_to_the_others_highest_first(
    queue: tuple[JobQueue, Any, Keys],
) -> None:
    job_queue, client, keys = queue
    await fill(client, keys, {"normal": 20, "low": 20})
    claims = [claim for _ in FAIRNESS for claim in await job_queue.claim("c", 1)]
    expected = ["low" if turn == "low" else "normal" for turn in FAIRNESS]
    assert [c.priority for c in claims] == expected


async def test_waiting_for_entries_sees_one_added_after_an_empty_claim(queue: tuple[JobQueue, Any, Keys]) -> None:
    job_queue, client, keys = queue
    assert await job_queue.claim("c", 1) == []
    # An entry arriving between the empty claim and the wait must not be missed until the timeout.
    await fill(client, keys, {"normal": 1})
    started = time.monotonic()
    await job_queue.wait_for_entries(5.0)
    assert time.monotonic() - started < 2.0
    assert [c.job_id for c in await job_queue.claim("c", 1)] == ["normal-0"]

    started = time.monotonic()
    await job_queue.wait_for_entries(0.3)  # nothing new: waits the timeout
    assert time.monotonic() - started >= 0.25
