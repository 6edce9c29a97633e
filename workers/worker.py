"""The worker process: claims jobs as capacity frees up and runs them concurrently.

One worker owns one generator (one GPU). It keeps at most `max_inflight_jobs`
jobs, claims only as many queue entries as it can start now (so other workers
can take the rest), heartbeats so its entries are not taken from it, re-claims
entries of dead workers after the visibility timeout, and on SIGTERM stops
claiming, lets running jobs finish for a grace period, then releases the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gcr.types import MODEL_NAME, JobError
from service.errors import GcrError, InvalidInput, OwnershipLost, StoreUnavailable
from service.jobs.artifacts import ArtifactStore
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.queue import Claim, JobQueue
from service.jobs.store import JobStore
from service.retrying import retrying
from service.settings import WorkerSettings
from workers import metrics
from workers.critics.breaker import CircuitBreaker, GuardedCritic
from workers.generators.base import Generator, GenRequest
from workers.runner import Critic, JobRunner
from workers.scheduler import GenerationScheduler
from workers.webhooks import WebhookNotifier

log = logging.getLogger("gcr.worker")

IDLE_WAIT_S = 0.5
CRITIC_PROBE_S = 2.0
RECONNECT_MAX_S = 10.0


def served_model(settings: WorkerSettings, generator_name: str) -> str:
    """The name requests route by: `GCR_MODEL_NAME`, else the generator's own name."""
    name = settings.model_name or generator_name
    if not re.fullmatch(MODEL_NAME, name):
        raise InvalidInput(
            f"the generator's name {name!r} cannot name a model (no whitespace or glob characters, "
            "at most 200 long): set GCR_MODEL_NAME",
            field="GCR_MODEL_NAME",
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


class Worker:
    """Claims and runs jobs until `stop()` is called."""

    def __init__(self, settings: WorkerSettings, generator: Generator, critic: Critic) -> None:
        self.settings = settings
        self.id = settings.worker_id
        self.redis = connect(settings.redis_url, settings.redis_max_connections, settings.redis_pool_timeout_s)
        keys = Keys(settings.redis_prefix)
        self.store = JobStore(self.redis, keys, settings.result_ttl_s, ArtifactStore(settings.artifact_url))
        self.model = served_model(settings, generator.name)
        self.queue = JobQueue(self.redis, keys, self.model, generator.modes)
        self.generator = generator
        self.defaults = generation_defaults(generator)
        self.breaker = CircuitBreaker(settings.critic_breaker_failures, settings.critic_breaker_cooldown_s)
        self.notifier = WebhookNotifier(settings, self.store)
        self.scheduler = GenerationScheduler(generator, settings.max_batch, settings.batch_window_ms / 1000)
        self.runner = JobRunner(
            self.store,
            self.scheduler,
            GuardedCritic(critic, self.breaker),
            self.id,
            self.model,
            settings.max_inflight_critiques,
            settings.progress_interval_s,
            self.notifier,
            critic_outage_s=settings.critic_outage_s,
        )
        # OpenAICritic.probe (GET /models); a critic without one recovers through a trial job.
        self._probe: Callable[[], Awaitable[Any]] | None = getattr(critic, "probe", None)
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

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": "ready",
            "model": self.model,
            "generator": self.generator.name,
            "modes": sorted(self.generator.modes),
            **self.generator.runtime,
            "defaults": self.defaults,
            **({"max_pixels": self.settings.max_output_pixels} if self.settings.max_output_pixels else {}),
            "max_inflight_jobs": self.settings.max_inflight_jobs,
            "inflight_jobs": len(self.active),
            "generator_busy_s": round(self.scheduler.busy_s, 3),
            "critic": "ok" if self.breaker.state == "closed" else "down",
            "at": time.time(),
        }

    async def run(self, drain_grace_s: float = 30.0) -> None:
        if self.settings.webhook_secret is None:
            log.warning("GCR_WEBHOOK_SECRET is not set: webhooks of callback_url jobs go out unsigned")
        await self._wait_for_redis()
        await self.scheduler.start()
        heartbeats_done = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat_loop(heartbeats_done), name="gcr-heartbeat")
        try:
            await self._claim_loop()
            await self._drain(drain_grace_s)
        finally:
            heartbeats_done.set()
            await asyncio.wait({heartbeat}, timeout=self.settings.heartbeat_s + 5)
            with contextlib.suppress(GcrError):
                await self.queue.forget_worker(self.id)
            await self.scheduler.stop()
            await self.notifier.aclose()
            await self.redis.aclose()

    async def _wait_for_redis(self) -> None:
        reconnect = retrying(
            on=StoreUnavailable, first_s=0.2, cap_s=RECONNECT_MAX_S, until=self._stopping.is_set, log=log, what="Redis"
        )
        with contextlib.suppress(StoreUnavailable):  # stopped while Redis was still away
            async for attempt in reconnect:
                with attempt:
                    await self.queue.ensure_groups()

    async def _claim_loop(self) -> None:
        """Claim while not stopping; a turn that loses Redis is retried with backoff (each turn
        starts its backoff afresh)."""
        reconnect = retrying(
            on=StoreUnavailable, first_s=0.2, cap_s=RECONNECT_MAX_S, until=self._stopping.is_set, log=log, what="Redis"
        )
        while not self._stopping.is_set():
            with contextlib.suppress(StoreUnavailable):  # stopped while Redis was still away
                async for attempt in reconnect:
                    with attempt:
                        await self._claim_once()

    async def _claim_once(self) -> None:
        """One turn of the claim loop: wait for room, then claim (and re-claim) what fits."""
        if self.breaker.state == "open":
            # Claiming now would only fail jobs fast; leave them queued for a healthier worker.
            await asyncio.sleep(min(1.0, self.settings.critic_breaker_cooldown_s))
            return
        # Half-open: one job at a time, whose critique is the breaker's trial call.
        limit = self.settings.max_inflight_jobs if self.breaker.state == "closed" else 1
        free = limit - len(self.active)
        if free <= 0:
            self._changed.clear()
            await self._changed.wait()
            return
        claims: list[Claim] = []
        now = time.monotonic()
        if now - self._last_reclaim >= self.settings.heartbeat_s:
            self._last_reclaim = now
            claims += await self.queue.reclaim(self.id, self.settings.visibility_timeout_s, free)
        claims += await self.queue.claim(self.id, free - len(claims))
        for claim in claims:
            self._start(claim)
        if not claims:
            await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        # NOTE: a bounded blocking read rather than a cancellable one: redis-py can swallow
        # a cancellation that lands mid-command (redis/redis-py#2028). Stopping waits at
        # most IDLE_WAIT_S for it.
        await self.queue.wait_for_entries(IDLE_WAIT_S)

    def _start(self, claim: Claim) -> None:
        task = asyncio.create_task(self._run_claim(claim), name=f"gcr-job-{claim.job_id}")
        self.active[task] = claim
        metrics.JOBS_INFLIGHT.set(len(self.active))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.active.pop(task, None)
        metrics.JOBS_INFLIGHT.set(len(self.active))
        self._changed.set()

    async def _run_claim(self, claim: Claim) -> None:
        """Run one claimed entry to its end; Redis blips resume it here from its checkpoint."""
        resume = retrying(
            on=StoreUnavailable,
            first_s=0.5,
            cap_s=RECONNECT_MAX_S,
            until=self._stopping.is_set,
            log=log,
            what=f"job {claim.job_id} (Redis lost; it resumes from its checkpoint)",
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
        except StoreUnavailable:
            return  # stopping: the entry stays pending; whoever holds Redis next re-claims it
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s crashed the runner", claim.job_id)
            error = JobError(code="internal", message="the worker crashed while running this job; see its logs")
            with contextlib.suppress(GcrError):
                if await self.store.fail(claim.job_id, error, owner=self.id):
                    self.notifier.notify(await self.store.get(claim.job_id))
                await self.queue.ack(claim)

    async def _process(self, claim: Claim, count_attempt: bool) -> None:
        job_id = claim.job_id
        outcome, attempts = await self.store.start(
            job_id, self.id, self.settings.max_attempts, count_attempt=count_attempt
        )
        if outcome == "exhausted":
            metrics.DEAD_LETTERS.inc()
            message = f"job failed or crashed workers {attempts - 1} times; giving up"
            await self.store.fail(job_id, JobError(code="dead_letter", message=message))
            self.notifier.notify(await self.store.get(job_id))
        elif outcome == "terminal":  # cancelled while queued: the gateway has no notifier
            doc = await self.store.get(job_id)
            if doc.webhook is None:
                self.notifier.notify(doc)
        elif outcome == "ok":
            await self.runner.run(await self.store.get(job_id), claim)
        await self.queue.ack(claim)

    async def _heartbeat_loop(self, done: asyncio.Event) -> None:
        ttl = max(self.settings.heartbeat_s * 3, 1.0)
        while not done.is_set():
            try:
                await self.probe_critic()
                await self.queue.heartbeat(self.id, self.info(), ttl)
                self.visible.set()
                if self.active:
                    for lost in await self.queue.keep_alive(self.id, list(self.active.values())):
                        log.warning(
                            "job %s is held by another worker now; its writes here will be refused", lost.job_id
                        )
            except Exception:
                log.exception("heartbeat failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.settings.heartbeat_s)

    async def probe_critic(self) -> None:
        """While the breaker is not closed, ask the critic's `GET /models` every CRITIC_PROBE_S:
        an answer closes it. Recovery must not wait for a job to try (none may come while
        /readyz says the critic is down)."""
        if self._probe is None or self.breaker.state == "closed":
            return
        now = time.monotonic()
        if now - self._probed_at < CRITIC_PROBE_S:
            return
        self._probed_at = now
        if await self._probe():
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
                await self.queue.release(self.id, unfinished)
            log.info("released %d unfinished job(s) for other workers", len(unfinished))
