"""The worker process: claims the jobs its generator needs and runs them concurrently.

One worker owns one generator (one GPU). It claims jobs while its generator would
otherwise idle: as many as its measured stage times say keep it busy (`workers.demand`),
none while its critiques wait for the critic (`workers.critique_limit`), and never more
than `max_inflight_jobs`; the rest stay in the shared queue for other workers. It
heartbeats so its entries are not taken from it, re-claims entries of dead workers after
the visibility timeout, sends the webhooks of jobs that ended while queued, and on SIGTERM
stops claiming, lets running jobs finish for a grace period, then releases the rest.

Its connections come in (`WorkerConnections`, made by `connect_worker`); the worker
closes them when it stops. Tests pass their own, failing ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from gcr.types import MODEL_NAME, JobError
from service.errors import ConfigurationError, GcrError, NotFound, OwnershipLost, StoreError, StoreUnavailable
from service.jobs.artifacts import ArtifactStore
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.lifecycle import JobLifecycle
from service.jobs.outbox import WebhookOutbox
from service.jobs.queue import Claim, JobQueue
from service.jobs.registry import WorkerHeartbeat, WorkerRegistry
from service.jobs.store import JobStore
from service.retrying import retrying
from service.settings import WorkerSettings
from workers import metrics
from workers.critics.breaker import CircuitBreaker, GuardedCritic
from workers.critics.protocol import Critic
from workers.critique_limit import WATCH_S, CritiqueLimit
from workers.demand import Demand
from workers.generators.base import Generator, GenRequest
from workers.rounds import RoundResources
from workers.runner import JobRunner
from workers.scheduler import GenerationScheduler
from workers.webhooks import WebhookNotifier

log = logging.getLogger("gcr.worker")

IDLE_WAIT_S = 0.5
DEMAND_RECHECK_S = 0.05
CRITIC_PROBE_S = 2.0
RECONNECT_MAX_S = 10.0
OUTBOX_BLOCK_MS = 1_000


def served_model(settings: WorkerSettings, generator_name: str) -> str:
    """The name requests route by: `GCR_MODEL_NAME`, else the generator's own name."""
    name = settings.model_name or generator_name
    if not re.fullmatch(MODEL_NAME, name):
        raise ConfigurationError(
            f"the generator's name {name!r} cannot name a model (no whitespace or glob characters, "
            "at most 200 long): set GCR_MODEL_NAME"
        )
    return name


def generation_defaults(generator: Generator) -> dict[str, Any]:
    """What a request that sets nothing gets (steps, guidance, size), for `GET /v1/models`.
    Text-to-image only: an edit's size follows its source image."""
    if "t2i" not in generator.modes:
        return {}
    try:
        resolved = generator.resolve(GenRequest(prompt="-", seed=0))
    except GcrError:
        return {}
    names = ("width", "height", "steps", "guidance_scale", "true_cfg_scale", "negative_prompt")
    return {name: getattr(resolved, name) for name in names if getattr(resolved, name) is not None}


@dataclass
class WorkerConnections:
    """What a worker talks to: Redis (its jobs, queue, registry, webhook outbox) and the
    artifact store, and the webhook notifier that posts to clients."""

    redis: redis.Redis
    store: JobStore
    lifecycle: JobLifecycle
    queue: JobQueue
    registry: WorkerRegistry
    outbox: WebhookOutbox
    notifier: WebhookNotifier

    async def aclose(self) -> None:
        await self.notifier.aclose()
        await self.redis.aclose()


def connect_worker(
    settings: WorkerSettings, generator: Generator, client: redis.Redis | None = None
) -> WorkerConnections:
    """The connections of a worker of `generator`, from its settings (its queue: the streams
    of the model it serves, in the generator's modes); `client` replaces its Redis client."""
    model = served_model(settings, generator.name)
    if client is None:
        client = connect(settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_s)
    keys = Keys(settings.redis_prefix)
    artifacts = ArtifactStore(settings.artifact_url)
    store = JobStore(client, keys, settings.result_ttl_s, artifacts)
    return WorkerConnections(
        redis=client,
        store=store,
        lifecycle=JobLifecycle(client, keys, settings.result_ttl_s, artifacts),
        queue=JobQueue(client, keys, model, generator.modes),
        registry=WorkerRegistry(client, keys),
        outbox=WebhookOutbox(client, keys),
        notifier=WebhookNotifier(settings, store),
    )


CPU_MAX_PIXELS = 512 * 512
"""A CPU worker's largest image unless GCR_MAX_OUTPUT_PIXELS says otherwise: a 2048x2048 job
on a CPU dev worker ran for 17 minutes, minutes between two denoising steps (where a cancel
takes effect)."""


def output_pixel_cap(settings: WorkerSettings, generator: Generator) -> int | None:
    """GCR_MAX_OUTPUT_PIXELS; unset, `CPU_MAX_PIXELS` for a pipeline on the CPU, else none (the
    API's 2048x2048). The heartbeat carries it: the gateway refuses larger jobs at submit."""
    if settings.max_output_pixels is not None:
        return settings.max_output_pixels
    return CPU_MAX_PIXELS if str(generator.runtime.get("device", "")).startswith("cpu") else None


class Worker:
    """Claims and runs jobs until `stop()` is called."""

    def __init__(
        self, settings: WorkerSettings, generator: Generator, critic: Critic, connections: WorkerConnections
    ) -> None:
        self.settings = settings
        self.id = settings.worker_id
        self.model = served_model(settings, generator.name)
        self.generator = generator
        self.defaults = generation_defaults(generator)
        self.max_pixels = output_pixel_cap(settings, generator)
        self.c = connections
        self.breaker = CircuitBreaker(settings.critic_breaker_failures, settings.critic_breaker_cooldown_s)
        self.critic = GuardedCritic(critic, self.breaker)
        self.critiques = CritiqueLimit(settings.max_inflight_critiques)
        self.scheduler = GenerationScheduler(generator, settings.max_batch, settings.batch_window_ms / 1000)
        self.demand = Demand(self.scheduler.max_batch)
        self.scheduler.on_call = self.demand.call_done
        self.max_held = 0
        """The most jobs this worker held at once (benchmarks report it)."""
        resources = RoundResources(
            model=self.model,
            store=connections.store,
            scheduler=self.scheduler,
            critic=self.critic,
            critiques=self.critiques,
            demand=self.demand,
            critic_outage_s=settings.critic_outage_s,
        )
        self.runner = JobRunner(
            resources, connections.lifecycle, self.id, settings.progress_interval_s, connections.notifier
        )
        self._probed_at = 0.0
        self._last_reclaim = 0.0
        self.active: dict[asyncio.Task[None], Claim] = {}
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self.visible = asyncio.Event()
        """Set after the first heartbeat: the gateway now admits jobs of this worker's modes."""

    def stop(self) -> None:
        """Stop claiming; `run` then drains and returns."""
        self._stopping.set()
        self._changed.set()

    def heartbeat(self) -> WorkerHeartbeat:
        return WorkerHeartbeat(
            id=self.id,
            model=self.model,
            generator=self.generator.name,
            modes=sorted(self.generator.modes),
            runtime=dict(self.generator.runtime),
            defaults=self.defaults,
            max_pixels=self.max_pixels,
            max_inflight_jobs=self.settings.max_inflight_jobs,
            inflight_jobs=len(self.active),
            jobs_needed=self.demand.jobs_needed(self.critiques.admits),
            critique_limit=self.critiques.limit,
            generator_busy_s=round(self.scheduler.busy_s, 3),
            critic="ok" if self.breaker.state == "closed" else "down",
            at=time.time(),
        )

    async def run(self, drain_grace_s: float = 30.0) -> None:
        if self.settings.webhook_secret is None:
            log.warning("GCR_WEBHOOK_SECRET is not set: webhooks of callback_url jobs go out unsigned")
        await self._wait_for_redis()
        await self.scheduler.start()
        background_done = asyncio.Event()
        background = {
            asyncio.create_task(self._heartbeat_loop(background_done), name="gcr-heartbeat"),
            asyncio.create_task(self._outbox_loop(background_done), name="gcr-webhook-outbox"),
            asyncio.create_task(self._critic_load_loop(background_done), name="gcr-critique-limit"),
        }
        try:
            await self._claim_loop()
            await self._drain(drain_grace_s)
        finally:
            background_done.set()
            await asyncio.wait(background, timeout=self.settings.heartbeat_s + 5)
            with contextlib.suppress(GcrError):
                await self.c.registry.forget(self.id)
            await self.scheduler.stop()
            await self.c.aclose()

    def _reconnecting(self) -> Any:
        return retrying(
            on=StoreUnavailable, first_s=0.2, cap_s=RECONNECT_MAX_S, until=self._stopping.is_set, log=log, what="Redis"
        )

    async def _wait_for_redis(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # stopped while Redis was still away
            async for attempt in self._reconnecting():
                with attempt:
                    await self.c.queue.ensure_groups()
                    await self.c.outbox.ensure_group()

    async def _claim_loop(self) -> None:
        """Claim while not stopping; a turn that loses Redis is retried with backoff (each turn
        starts its backoff afresh)."""
        while not self._stopping.is_set():
            with contextlib.suppress(StoreUnavailable):  # stopped while Redis was still away
                async for attempt in self._reconnecting():
                    with attempt:
                        await self._claim_once()

    async def _claim_once(self) -> None:
        """One turn of the claim loop: wait for room, then claim (and re-claim) what fits."""
        if self.breaker.state == "open":
            # Claiming now would only fail jobs fast; leave them queued for a healthier worker.
            await asyncio.sleep(min(1.0, self.settings.critic_breaker_cooldown_s))
            return
        # Half-open: one job at a time, whose critique is the breaker's trial call.
        cap = self.settings.max_inflight_jobs if self.breaker.state == "closed" else 1
        needed = self.demand.jobs_needed(self.critiques.admits)
        metrics.JOBS_NEEDED.set(needed)
        free = min(cap, needed) - len(self.active)
        if free <= 0 or self.critiques.saturated:
            # Enough jobs to keep the generator busy, or the critic is the bottleneck: leave the
            # rest in the shared queue. What is needed grows while jobs are away: look again soon.
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), DEMAND_RECHECK_S)
            return
        claims: list[Claim] = []
        now = time.monotonic()
        if now - self._last_reclaim >= self.settings.heartbeat_s:
            self._last_reclaim = now
            # An entry of this worker's own looks idle when its keep-alive came late (a stalled
            # event loop, a slow Redis): re-claiming it only refreshes it. Starting it again would
            # run the job twice here, each start counting an attempt, until it is dead-lettered.
            held = {(claim.stream, claim.entry_id) for claim in self.active.values()}
            reclaimed = await self.c.queue.reclaim(self.id, self.settings.visibility_timeout_s, free)
            claims += [claim for claim in reclaimed if (claim.stream, claim.entry_id) not in held]
        claims += await self.c.queue.claim(self.id, free - len(claims))
        for claim in claims:
            self._start(claim)
        if not claims:
            # NOTE: a bounded blocking read rather than a cancellable one: redis-py can swallow
            # a cancellation that lands mid-command (redis/redis-py#2028). Stopping waits at
            # most IDLE_WAIT_S for it.
            await self.c.queue.wait_for_entries(IDLE_WAIT_S)

    def _start(self, claim: Claim) -> None:
        task = asyncio.create_task(self._run_claim(claim), name=f"gcr-job-{claim.job_id}")
        self.active[task] = claim
        self.max_held = max(self.max_held, len(self.active))
        metrics.JOBS_INFLIGHT.set(len(self.active))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        claim = self.active.pop(task, None)
        if claim is not None:
            self.demand.gone(claim.job_id)
        metrics.JOBS_INFLIGHT.set(len(self.active))
        self._changed.set()

    async def _run_claim(self, claim: Claim) -> None:
        """Run one claimed entry to its end. A Redis blip resumes it here from its checkpoint;
        a command Redis refuses for good (`StoreError`) is tried `max_attempts` times, then
        the job is dead-lettered."""
        refusals = 0

        def resumable(exc: BaseException) -> bool:
            nonlocal refusals
            if isinstance(exc, StoreError):
                refusals += 1
                return refusals < self.settings.max_attempts
            return isinstance(exc, StoreUnavailable)

        resume = retrying(
            on=resumable,
            first_s=0.5,
            cap_s=RECONNECT_MAX_S,
            until=self._stopping.is_set,
            log=log,
            what=f"job {claim.job_id} (it resumes from its checkpoint)",
        )
        try:
            async for attempt in resume:
                with attempt:
                    # A resume after a blip is not the job's fault: it does not count as an attempt.
                    await self._process(claim, count_attempt=attempt.retry_state.attempt_number == 1)
        except OwnershipLost:
            # Another worker took the job over while this one stalled: the entry is
            # theirs now, so neither ack nor touch it.
            log.info("job %s was taken over by another worker; leaving it", claim.job_id)
        except StoreError as exc:
            await self._dead_letter(claim, f"the job store refuses this job's commands ({exc.message})")
        except StoreUnavailable:
            return  # stopping: the entry stays pending; whoever holds Redis next re-claims it
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s crashed the runner", claim.job_id)
            error = JobError(code="internal", message="the worker crashed while running this job; see its logs")
            with contextlib.suppress(GcrError):
                if await self.c.lifecycle.fail(claim.job_id, error, worker_id=self.id) == "ended":
                    self.c.notifier.notify(await self.c.store.get(claim.job_id))

    async def _process(self, claim: Claim, count_attempt: bool) -> None:
        job_id = claim.job_id
        outcome, attempts = await self.c.lifecycle.start(
            job_id, self.id, self.settings.max_attempts, count_attempt=count_attempt
        )
        if outcome == "exhausted":
            await self._dead_letter(claim, f"job failed or crashed workers {attempts - 1} times; giving up")
        elif outcome == "terminal":  # it ended meanwhile (cancelled): close it for good
            await self.c.lifecycle.settle(job_id)
        elif outcome == "missing":  # its record expired: only the entry is left
            await self.c.queue.ack(claim)
        else:
            await self.runner.run(await self.c.store.get(job_id), claim)

    async def _dead_letter(self, claim: Claim, message: str) -> None:
        metrics.DEAD_LETTERS.inc()
        log.error("job %s is dead-lettered: %s", claim.job_id, message)
        try:
            if await self.c.lifecycle.fail(claim.job_id, JobError(code="dead_letter", message=message)) != "missing":
                self.c.notifier.notify(await self.c.store.get(claim.job_id))
                return
        except GcrError as exc:
            log.error("job %s could not be ended (%s)", claim.job_id, exc.message)
        # No record, or not even the ending could be written: drop the entry, so that no worker loops on it.
        with contextlib.suppress(GcrError):
            await self.c.queue.ack(claim)

    async def _heartbeat_loop(self, done: asyncio.Event) -> None:
        ttl = max(self.settings.heartbeat_s * 3, 1.0)
        while not done.is_set():
            try:
                await self.probe_critic()
                await self.c.registry.heartbeat(self.heartbeat(), ttl)
                self.visible.set()
                if self.active:
                    for lost in await self.c.queue.keep_alive(self.id, list(self.active.values())):
                        log.warning(
                            "job %s is held by another worker now; its writes here will be refused", lost.job_id
                        )
            except Exception:
                log.exception("heartbeat failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.settings.heartbeat_s)

    async def _outbox_loop(self, done: asyncio.Event) -> None:
        """Send the `completed` webhooks of jobs that ended while queued (no worker held them)."""
        while not done.is_set():
            try:
                for entry_id, job_id in await self.c.outbox.take(self.id, 10, OUTBOX_BLOCK_MS):
                    with contextlib.suppress(NotFound):  # expired since: nothing to tell
                        self.c.notifier.notify(await self.c.store.get(job_id))
                    await self.c.outbox.ack(entry_id)
            except GcrError as exc:
                log.warning("webhook outbox: %s; retrying", exc.message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), self.settings.heartbeat_s)

    async def _critic_load_loop(self, done: asyncio.Event) -> None:
        """Every WATCH_S, one step of the critique limit, from the critic's queue (or latency)."""
        while not done.is_set():
            try:
                await self.critiques.adjust(await self.critic.load())
            except Exception:  # a dead loop would freeze the limit, and with it every claim
                log.exception("reading the critic's load failed; retrying")
            metrics.CRITIQUE_LIMIT.set(self.critiques.limit)
            if not self.critiques.saturated:
                self._changed.set()  # claims wait for a free critic: it may be free now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), WATCH_S)

    async def probe_critic(self) -> None:
        """While the breaker is not closed, ask the critic's `GET /models` every CRITIC_PROBE_S:
        an answer closes it. Recovery must not wait for a job to try (none may come while
        /readyz says the critic is down)."""
        if self.breaker.state == "closed":
            return
        now = time.monotonic()
        if now - self._probed_at < CRITIC_PROBE_S:
            return
        self._probed_at = now
        if await self.critic.probe():
            log.info("the critic answers again; closing the circuit breaker")
            self.breaker.success()
            self._changed.set()

    async def _drain(self, grace_s: float) -> None:
        if not self.active:
            return
        log.info("draining %d job(s) for up to %.0fs", len(self.active), grace_s)
        _done, pending = await asyncio.wait(set(self.active), timeout=grace_s)
        unfinished = [self.active[task] for task in pending if task in self.active]
        for task in pending:
            task.cancel()
        if pending:
            # Bounded: a cancellation swallowed inside a Redis call must not stall shutdown.
            await asyncio.wait(pending, timeout=5)
            with contextlib.suppress(GcrError):
                await self.c.queue.release(self.id, unfinished)
            log.info("released %d unfinished job(s) for other workers", len(unfinished))
