"""Runs one job: the short driver around the pure loop policy.

Decide (`workers.loop`), then hop or run the round (`workers.rounds`), checkpoint it, and
again; the job's ending goes to the lifecycle (`service.jobs.lifecycle`), which writes it,
removes the job from the queue and sends its `end`, in one step. A job resumed by another
worker starts from its checkpointed rounds.

A round meant for another model (an `edit` round of a text-to-image job runs on the edit
model) is not run here: the job hops, queued on that model's stream, and the worker there
resumes it from its checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from gcr.types import BestCandidate, GenerationParams, JobError, JobStatus, JobSummary, StopReason, TokenUsage
from service.errors import GcrError, GeneratorError, OwnershipLost, StoreUnavailable
from service.jobs.lifecycle import JobLifecycle
from service.jobs.queue import Claim
from service.jobs.records import StoredJob, StoredRound
from service.jobs.store import JobStore
from service.logs import current_job
from workers import metrics
from workers.images import decode_image
from workers.job_events import JobEvents
from workers.loop import Continue, LoopPolicy
from workers.rounds import RoundExecutor, RoundResources, calls_of, job_error
from workers.webhooks import WebhookEvent, WebhookNotifier

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("gcr.worker")


@dataclass(frozen=True)
class JobRunner:
    """Runs jobs for one worker; shared by all of the worker's job tasks."""

    resources: RoundResources
    lifecycle: JobLifecycle
    worker_id: str
    progress_interval_s: float
    notifier: WebhookNotifier | None = None

    @property
    def store(self) -> JobStore:
        return self.resources.store

    async def run(self, job: StoredJob, claim: Claim) -> None:
        """Run a job this worker has just started (status running, owned by us) from the entry
        `claim`, until it ends or hops to another model."""
        current_job.set(job.id)
        ended = await _Driver(self, job, claim).run()  # OwnershipLost and StoreUnavailable propagate
        if ended and self.notifier is not None:
            self.notifier.notify(await self.store.get(job.id))


class _Driver:
    """One job on this worker: decide, hop or run, checkpoint; then the ending."""

    def __init__(self, runner: JobRunner, job: StoredJob, claim: Claim) -> None:
        self.runner = runner
        self.job = job
        self.claim = claim
        self.rounds: list[StoredRound] = list(job.rounds)
        self.started_at = job.started_at or time.time()
        assert job.spec.generation.seed is not None, "the gateway draws a seed for every job"
        self.policy = LoopPolicy(job.spec.loop, job.spec.generation.seed, job.spec.prompt)
        self.events = JobEvents(
            job.id, runner.worker_id, runner.store, runner.lifecycle, runner.progress_interval_s, job.spec.previews
        )
        self.executor: RoundExecutor | None = None

    def elapsed(self) -> float:
        return time.time() - self.started_at

    async def run(self) -> bool:
        """Run rounds until the job ends (True) or hops to another model's worker (False)."""
        own_model = self.runner.resources.model == self.job.spec.model
        if own_model:
            await self.update(generator_model=self.runner.resources.scheduler.generator.name)
        if not self.rounds:
            self.webhook("start")
        try:
            source = await self.load_source()
        except StoreUnavailable:
            raise  # Redis: the worker resumes the job
        except GcrError as exc:  # the artifact store refused it, or it expired: the job's failure
            return await self.finish("failed", job_error(exc))
        executor = RoundExecutor(
            self.runner.resources,
            self.job,
            self.events,
            lambda: self.policy.deadline_passed(self.elapsed()),
            source,
        )
        self.executor = executor
        if own_model:
            await self.record_effective_spec(executor)
        while True:
            if await self.events.check_cancel():
                return await self.finish("cancelled")
            decision = self.policy.decide(self.rounds, self.elapsed())
            if not isinstance(decision, Continue):
                return await self.finish(decision.reason)
            model, mode = self.placement(decision)
            if model != self.runner.resources.model:
                return await self.hop(model, mode, decision)
            if self.rounds:  # only a round that another follows is refined
                await self.events.stage(self.rounds[-1].index, "refining", prompt=decision.prompt)
            try:
                round_ = await executor.run(decision, mode, self.policy.best_before(self.rounds))
            except StoreUnavailable:
                raise  # not the job's failure: the worker resumes it from the checkpoint
            except GcrError as exc:
                return await self.finish("failed", job_error(exc))
            if round_ is None:  # stopped between stages
                return await self.finish("cancelled" if self.events.cancelled else "deadline")
            best = self.best_candidate([*self.rounds, round_])
            if not await self.runner.lifecycle.checkpoint(self.job.id, self.runner.worker_id, round_, best=best):
                raise OwnershipLost(self.job.id)
            metrics.ROUNDS.inc()
            self.rounds.append(round_)
            self.webhook("round", round_.index)

    async def update(self, **fields: object) -> None:
        if not await self.runner.lifecycle.update(self.job.id, self.runner.worker_id, **fields):
            raise OwnershipLost(self.job.id)

    async def load_source(self) -> tuple[bytes, Image.Image] | None:
        """An edit job's source image: its bytes (for the critic) and decoded (for the generator)."""
        if self.job.spec.mode != "edit":
            return None
        png = await self.runner.store.get_source_image(self.job.id)
        return png, await asyncio.to_thread(decode_image, png)

    def placement(self, decision: Continue) -> tuple[str, str]:
        """The (model, mode) a round runs on: an `edit` refinement on the edit model, anything
        else on the job's own model and mode."""
        spec = self.job.spec
        assert spec.model is not None, "the gateway places every job on a model"
        if decision.refine == "edit":
            return spec.loop.edit_model or spec.model, "edit"
        return spec.model, spec.mode

    async def hop(self, model: str, mode: str, decision: Continue) -> bool:
        """Queue the job for `model`'s workers, which run its next round; this worker lets go."""
        worker_id = self.runner.worker_id
        if not await self.runner.lifecycle.hop(self.job, worker_id, self.claim, model, mode, decision.round_index):
            raise OwnershipLost(self.job.id)
        metrics.HOPS.labels(model).inc()
        log.info("job %s hops to model %s for round %d (%s)", self.job.id, model, decision.round_index + 1, mode)
        return False

    async def record_effective_spec(self, executor: RoundExecutor) -> None:
        """Write the values the generator fills in (size, steps, guidance, ...) into the
        stored spec, so the job document shows everything that ran."""
        spec = self.job.spec
        assert spec.generation.seed is not None
        try:
            request = executor.gen_request(spec.prompt, spec.generation.seed, spec.mode, executor.source_image)
            resolved = self.runner.resources.scheduler.generator.resolve(request)
        except GeneratorError:
            return  # the first round fails with the same error, recorded on the job
        filled = {
            "width": resolved.width,
            "height": resolved.height,
            "steps": resolved.steps,
            "guidance_scale": resolved.guidance_scale,
            "true_cfg_scale": resolved.true_cfg_scale,
            "negative_prompt": resolved.negative_prompt,
            "max_sequence_length": resolved.extra.get("max_sequence_length"),
        }
        try:
            generation = GenerationParams.model_validate({**spec.generation.model_dump(), **filled})
        except ValidationError as exc:  # a model default outside what clients may ask for
            log.warning("not recording the effective generation values: %s", exc.errors()[0]["msg"])
            return
        self.job.spec = spec.model_copy(update={"generation": generation})
        await self.update(spec=self.job.spec)

    def webhook(self, event: WebhookEvent, round_index: int | None = None) -> None:
        """A `start` or `round` webhook, if the job's filter asks for it (sent in the background)."""
        notifier = self.runner.notifier
        if notifier is not None and event in self.job.spec.webhook_events_filter:
            notifier.notify(self.job.model_copy(update={"rounds": list(self.rounds)}), event, round_index)

    def best_candidate(self, rounds: list[StoredRound]) -> BestCandidate | None:
        pick = self.policy.best(rounds)
        if pick is None:
            return None
        return BestCandidate(round=pick.round, candidate=pick.candidate, overall=pick.overall, prompt=pick.prompt)

    async def finish(self, reason: StopReason, error: JobError | None = None) -> bool:
        """Hand the ending to the lifecycle: one atomic write of the status, the stop reason, the
        best and the summary, out of the queue, `status` and `end` sent."""
        if reason == "failed" and error is None:
            error = _unjudged_error(self.rounds)
        best = self.best_candidate(self.rounds)
        status: JobStatus
        if reason in ("cancelled", "failed"):
            status = "cancelled" if reason == "cancelled" else "failed"
        elif best is None:
            status = "expired"  # the deadline passed before any round finished
        else:
            status = "succeeded"
        first = self.rounds[0].overall if self.rounds else None
        executor = self.executor
        # No executor: the job ended before running a round here (a resumed edit whose source expired).
        generator_calls, critic_calls = (
            (executor.generator_calls, executor.critic_calls) if executor else calls_of(self.rounds)
        )
        summary = JobSummary(
            rounds_used=len(self.rounds),
            generator_calls=generator_calls,
            critic_calls=critic_calls,
            first_round_overall=first,
            best_overall=best.overall if best else None,
            gain=None if best is None or first is None else best.overall - first,
            critic_usage=sum((r.critic_usage or TokenUsage() for r in self.rounds), TokenUsage()),
        )
        critic_models = {c.critique.model for r in self.rounds for c in r.candidates if c.critique}
        ending = await self.runner.lifecycle.finish(
            self.job.id,
            self.runner.worker_id,
            status=status,
            stop_reason=reason,
            stage=None,
            finished_at=time.time(),
            best=best,
            summary=summary,
            error=error,
            critic_model=", ".join(sorted(critic_models)) or None,
        )
        if ending == "not_owner":
            raise OwnershipLost(self.job.id)
        metrics.JOBS_FINISHED.labels(status, reason).inc()
        log.info("job %s %s (%s) after %d rounds", self.job.id, status, reason, len(self.rounds))
        return True


def _unjudged_error(rounds: list[StoredRound]) -> JobError:
    """Why the last round has no judged candidate: its first candidate's error, said so."""
    errors = [c.error for c in rounds[-1].candidates if c.error is not None] if rounds else []
    if not errors:
        return JobError(code="internal", message="the job stopped as failed without a recorded error")
    message = (
        f"round {rounds[-1].index + 1}'s images could not be judged ({errors[0].message}); "
        "they are kept, and the job ends with the best of the rounds before"
    )
    return errors[0].model_copy(update={"message": message})
