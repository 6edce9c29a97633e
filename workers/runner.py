"""Runs one job: the I/O around the pure loop policy.

Each round: generate the candidates (through the shared scheduler), critique each
against the ORIGINAL instruction (concurrently, bounded), then checkpoint the
round in Redis before the next starts. A job resumed by another worker starts
from its checkpointed rounds. Cancellation is checked at every stage boundary
and, during generation, interrupts denoising.

A round meant for another model (an `edit` round of a text-to-image job runs on
the edit model) is not run here: the job hops, queued on that model's stream, and
the worker there resumes it from its checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from gcr.types import (
    BestCandidate,
    Candidate,
    Critique,
    EventType,
    GenerationParams,
    ImageRef,
    JobDocument,
    JobError,
    JobEvent,
    JobSummary,
    Mode,
    PromptFit,
    Round,
    RoundTimings,
    StopReason,
    TokenUsage,
)
from service.errors import CriticError, GcrError, GeneratorError, OwnershipLost, StoreUnavailable
from service.jobs.queue import Claim
from service.jobs.store import JobStore
from service.logs import current_job
from workers import metrics
from workers.generators.base import GenRequest, PreviewSink
from workers.images import decode_image, encode_png
from workers.loop import Continue, LoopPolicy, Pick, choose_candidate
from workers.scheduler import GenerationScheduler, GenResult
from workers.webhooks import WebhookEvent, WebhookNotifier

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("gcr.worker")

CANCEL_POLL_S = 0.25
# A critique whose critic is away is asked again after 1, 2, 4, ... seconds, at most this far apart.
CRITIC_WAIT_FIRST_S = 1.0
CRITIC_WAIT_CAP_S = 8.0


class Critic(Protocol):
    async def critique(
        self, instruction: str, image: bytes, source_image: bytes | None = None, mode: Mode | None = None
    ) -> Critique: ...


class JobRunner:
    """Runs jobs for one worker; shared by all of the worker's job tasks."""

    def __init__(
        self,
        store: JobStore,
        scheduler: GenerationScheduler,
        critic: Critic,
        worker_id: str,
        model: str,
        critique_slots: int,
        progress_interval_s: float,
        notifier: WebhookNotifier | None = None,
        critic_outage_s: float = 0.0,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.critic = critic
        self.worker_id = worker_id
        self.model = model
        """The model this worker serves (the name jobs and streams route by)."""
        self.progress_interval_s = progress_interval_s
        self.notifier = notifier
        self._critique_slots = asyncio.Semaphore(critique_slots)
        self.critic_outage_s = critic_outage_s
        """How long a critique waits for a critic that is unreachable or timing out."""

    async def run(self, doc: JobDocument, claim: Claim) -> None:
        """Run a job this worker has just started (status running, owned by us) from the entry
        `claim`, until it ends or hops to another model."""
        current_job.set(doc.id)
        ended = await _Job(self, doc, claim).run()  # OwnershipLost and StoreUnavailable propagate
        if ended and self.notifier is not None:
            self.notifier.notify(await self.store.get(doc.id))


class _Job:
    def __init__(self, runner: JobRunner, doc: JobDocument, claim: Claim) -> None:
        self.r = runner
        self.doc = doc
        self.claim = claim
        self.id = doc.id
        self.spec = doc.spec
        self.rounds: list[Round] = list(doc.rounds)
        self.started_at = doc.started_at or time.time()
        assert self.spec.generation.seed is not None, "the gateway draws a seed for every job"
        self.policy = LoopPolicy(self.spec.loop, self.spec.generation.seed, self.spec.prompt)
        self.cancelled = False
        self._progress_tasks: set[asyncio.Task[None]] = set()
        self.source_png: bytes | None = None
        self.source_image: Image.Image | None = None
        self.generator_calls = sum(len(r.candidates) for r in self.rounds)
        self.critic_calls = sum(1 for r in self.rounds for c in r.candidates if c.has_image or c.image_url)

    # --- helpers -----------------------------------------------------------------------
    async def emit(self, type_: EventType, **data: Any) -> None:
        await self.r.store.publish(JobEvent(type=type_, job_id=self.id, at=time.time(), data=data))

    async def set(self, **fields: Any) -> None:
        if not await self.r.store.update(self.id, self.r.worker_id, **fields):
            raise OwnershipLost(self.id)

    async def check_cancel(self) -> bool:
        if not self.cancelled:
            self.cancelled = await self.r.store.cancel_requested(self.id)
        return self.cancelled

    @contextlib.asynccontextmanager
    async def watching_cancel(self) -> AsyncIterator[None]:
        """Poll the cancel flag while a long stage runs, so denoising can be interrupted.

        The poller is stopped by an event, never by cancelling it: redis-py can swallow
        a cancellation that lands mid-command (redis/redis-py#2028), and awaiting such a
        task would then hang the job."""
        stop = asyncio.Event()

        async def poll() -> None:
            # The flag lives in Redis, set by any gateway replica: polling is the way to see it.
            while not stop.is_set() and not await self.check_cancel():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CANCEL_POLL_S)

        task = asyncio.create_task(poll())
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(GcrError):
                await task

    def webhook(self, event: WebhookEvent, round_index: int | None = None) -> None:
        """A `start` or `round` webhook, if the job's filter asks for it (sent in the background)."""
        if self.r.notifier is not None and event in self.spec.webhook_events_filter:
            doc = self.doc.model_copy(update={"rounds": list(self.rounds)})
            self.r.notifier.notify(doc, event, round_index)

    def elapsed(self) -> float:
        return time.time() - self.started_at

    def placement(self, decision: Continue) -> tuple[str, str]:
        """The (model, mode) a round runs on: an `edit` refinement on the edit model, anything
        else on the job's own model and mode."""
        assert self.spec.model is not None, "the gateway routes every job to a model"
        if decision.refine == "edit":
            return self.spec.loop.edit_model or self.spec.model, "edit"
        return self.spec.model, self.spec.mode

    def on_own_model(self) -> bool:
        return self.r.model == self.spec.model

    # --- the loop ----------------------------------------------------------------------
    async def run(self) -> bool:
        """Run rounds until the job ends (True) or hops to another model's worker (False)."""
        if self.on_own_model():
            await self.set(generator_model=self.r.scheduler.generator.name)
        await self.emit("status", status="running", attempt=self.doc.attempts, resumed_rounds=len(self.rounds))
        if not self.rounds:
            self.webhook("start")
        if self.spec.mode == "edit":
            try:
                self.source_png = await self.r.store.get_source_image(self.id)
            except StoreUnavailable:
                raise  # Redis: the worker resumes the job
            except GcrError as exc:  # the artifact store refused it, or it expired: the job's failure
                return await self.finish("failed", error=exc)
            self.source_image = await asyncio.to_thread(decode_image, self.source_png)
        if self.on_own_model():
            await self.record_effective_spec()
        while True:
            if await self.check_cancel():
                return await self.finish("cancelled")
            decision = self.policy.decide(self.rounds, self.elapsed())
            if not isinstance(decision, Continue):
                return await self.finish(decision.reason)
            model, mode = self.placement(decision)
            if model != self.r.model:
                return await self.hop(model, mode, decision)
            if self.rounds:  # only a round that another follows is refined
                await self.emit("stage", round=self.rounds[-1].index, stage="refining", prompt=decision.prompt)
            try:
                round_ = await self.run_round(decision, mode)
            except StoreUnavailable:
                raise  # not the job's failure: the worker resumes it from the checkpoint
            except GcrError as exc:
                return await self.finish("failed", error=exc)
            if round_ is None:  # stopped between stages
                return await self.finish("cancelled" if self.cancelled else "deadline")
            if not await self.r.store.checkpoint(
                self.id,
                self.r.worker_id,
                round_,
                best=self.best_candidate([*self.rounds, round_]),
                stage=None,
            ):
                raise OwnershipLost(self.id)
            metrics.ROUNDS.inc()
            self.rounds.append(round_)
            self.webhook("round", round_.index)
            await self.emit(
                "round",
                round=round_.model_dump(mode="json", exclude={"candidates": {"__all__": {"critique": {"raw"}}}}),
            )

    async def hop(self, model: str, mode: str, decision: Continue) -> bool:
        """Queue the job for `model`'s workers, which run its next round; this worker lets go."""
        if not await self.r.store.hand_off(self.doc, self.r.worker_id, self.claim, model, mode):
            raise OwnershipLost(self.id)
        metrics.HOPS.labels(model).inc()
        log.info("job %s hops to model %s for round %d (%s)", self.id, model, decision.round_index + 1, mode)
        await self.emit("status", status="queued", hop={"model": model, "mode": mode, "round": decision.round_index})
        return False

    async def source_for(self, decision: Continue) -> Image.Image | None:
        """The image a round edits: the best so far for an `edit` refinement, else the job's source."""
        if decision.edit_from is None:
            return self.source_image
        png = await self.r.store.get_image(self.id, decision.edit_from.round, decision.edit_from.candidate)
        return await asyncio.to_thread(decode_image, png)

    async def run_round(self, decision: Continue, mode: str) -> Round | None:
        index = decision.round_index
        started = time.time()
        source = await self.source_for(decision)
        prompt, fit = self.fit_prompt(decision.prompt, decision.seeds[0], mode, source)
        await self.set(stage="generating")
        await self.emit("stage", round=index, stage="generating", prompt=prompt)
        t0 = time.monotonic()
        async with self.watching_cancel():
            results = await self.r.scheduler.generate(
                [
                    self.gen_request(prompt, seed, mode, source, preview=self.preview_sink(index, candidate))
                    for candidate, seed in enumerate(decision.seeds)
                ],
                on_step=self.progress_listener(index),
                cancelled=lambda: self.cancelled,
            )
        generate_s = time.monotonic() - t0
        metrics.STAGE_SECONDS.labels("generate").observe(generate_s)
        self.generator_calls += len(results)
        if await self.check_cancel():
            return None
        images = await self.store_images(index, prompt, decision, results)
        if not images:
            error = next(r.error for r in results if r.error is not None)
            raise error
        if self.policy.deadline_passed(self.elapsed()):
            return None

        await self.set(stage="critiquing")
        await self.emit("stage", round=index, stage="critiquing")
        t1 = time.monotonic()
        critiques = await asyncio.gather(*(self.critique(index, png) for png in images.values()))
        critique_s = time.monotonic() - t1
        metrics.STAGE_SECONDS.labels("critique").observe(critique_s)

        candidates = []
        usage = TokenUsage()
        for (c, seed), result in zip(enumerate(decision.seeds), results, strict=True):
            candidate = Candidate(index=c, seed=seed)
            if result.error is not None:
                candidate.error = _job_error(result.error)
            elif c in images:
                outcome = critiques[list(images).index(c)]
                candidate.has_image = True
                if isinstance(outcome, Critique):
                    candidate.critique, candidate.overall = outcome, outcome.overall
                    usage += TokenUsage.of(outcome.usage)
                else:
                    candidate.error = _job_error(outcome)
                    usage += TokenUsage.of(outcome.usage)
            candidates.append(candidate)
        metrics.CRITIC_TOKENS.labels("prompt").inc(usage.prompt_tokens)
        metrics.CRITIC_TOKENS.labels("completion").inc(usage.completion_tokens)
        # No candidate judged (the critique failed for good): the round is still stored, its
        # images unjudged and downloadable; `LoopPolicy.decide` then ends the job as failed.
        chosen = choose_candidate(candidates)
        overall = None if chosen is None else candidates[chosen].overall
        best_before = self.policy.best_before(self.rounds)
        edited = decision.edit_from
        return Round(
            index=index,
            prompt=prompt,
            prompt_fit=fit,
            action="edit" if mode == "edit" else "generate",
            model=self.r.model,
            edited_from=None if edited is None else ImageRef(round=edited.round, candidate=edited.candidate),
            reason=decision.reason or None,
            candidates=candidates,
            chosen=chosen,
            overall=overall,
            delta=None if best_before is None or overall is None else overall - best_before,
            timings=RoundTimings(
                queue_wait_ms=1000 * max(r.queued_s for r in results),
                generate_ms=1000 * generate_s,
                critique_ms=1000 * critique_s,
            ),
            critic_usage=usage,
            started_at=started,
            finished_at=time.time(),
        )

    def fit_prompt(
        self, prompt: str, seed: int, mode: str, source: Image.Image | None
    ) -> tuple[str, PromptFit | None]:
        """`prompt` as the generator's text encoder reads it: a refinement longer than that is
        shortened to the words it reads, and the round records the cut (`prompt_fit`), never
        handed over whole to be cut in silence."""
        fitted = self.r.scheduler.generator.fit_prompt(self.gen_request(prompt, seed, mode, source))
        if fitted is None:
            return prompt, None
        text, fit = fitted
        if fit.cut:
            metrics.PROMPTS_CUT.inc()
            log.info(
                "job %s: the generator's %s reads %d of the prompt's %d tokens; generating from the words it reads",
                self.id,
                fit.encoder,
                fit.limit,
                fit.tokens,
            )
        return text, fit

    def gen_request(
        self,
        prompt: str,
        seed: int,
        mode: str,
        source: Image.Image | None,
        preview: PreviewSink | None = None,
    ) -> GenRequest:
        """One image's request. On another model than the job's own (an edit model refining a
        text-to-image job) the job's generation values, resolved for its own model, do not
        apply: that model's defaults do."""
        if not self.on_own_model():
            return GenRequest(prompt=prompt, seed=seed, mode=mode, source_image=source, preview=preview)
        g = self.spec.generation
        extra = {} if g.max_sequence_length is None else {"max_sequence_length": g.max_sequence_length}
        return GenRequest(
            prompt=prompt,
            seed=seed,
            mode=mode,
            width=g.width,
            height=g.height,
            steps=g.steps,
            guidance_scale=g.guidance_scale,
            true_cfg_scale=g.true_cfg_scale,
            negative_prompt=g.negative_prompt,
            source_image=source,
            extra=extra,
            preview=preview,
        )

    async def record_effective_spec(self) -> None:
        """Write the values the generator fills in (size, steps, guidance, ...) into the
        stored spec, so the job document shows everything that ran."""
        assert self.spec.generation.seed is not None
        try:
            request = self.gen_request(self.spec.prompt, self.spec.generation.seed, self.spec.mode, self.source_image)
            resolved = self.r.scheduler.generator.resolve(request)
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
            generation = GenerationParams.model_validate({**self.spec.generation.model_dump(), **filled})
        except ValidationError as exc:  # a model default outside what clients may ask for
            log.warning("not recording the effective generation values: %s", exc.errors()[0]["msg"])
            return
        self.spec = self.spec.model_copy(update={"generation": generation})
        await self.set(spec=self.spec)

    def progress_listener(self, round_index: int) -> Any:
        """Throttled step events, sent from the executor thread to the event loop."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        def on_step(step: int, total: int) -> None:
            now = time.monotonic()
            if step < total and now - last[0] < self.r.progress_interval_s:
                return
            last[0] = now
            loop.call_soon_threadsafe(self._spawn_progress, round_index, step, total)

        return on_step

    def preview_sink(self, round_index: int, candidate: int) -> PreviewSink | None:
        """Where the generator sends this candidate's previews (from its thread), if the job asked."""
        if not self.spec.previews:
            return None
        loop = asyncio.get_running_loop()

        def send(step: int, total: int, image: str) -> None:
            data = {"round": round_index, "candidate": candidate, "step": step, "total": total, "image": image}
            loop.call_soon_threadsafe(self._spawn_event, "preview", data)

        return send

    def _spawn_event(self, type_: EventType, data: dict[str, Any]) -> None:
        # Keep a reference: the loop holds tasks weakly, and a collected one is lost.
        task = asyncio.create_task(self._emit_quietly(type_, **data))
        self._progress_tasks.add(task)
        task.add_done_callback(self._progress_tasks.discard)

    def _spawn_progress(self, round_index: int, step: int, total: int) -> None:
        self._spawn_event("progress", {"round": round_index, "step": step, "total": total})

    async def _emit_quietly(self, type_: EventType, **data: Any) -> None:
        with contextlib.suppress(GcrError):
            await self.emit(type_, **data)

    async def store_images(
        self, index: int, prompt: str, decision: Continue, results: list[GenResult]
    ) -> dict[int, bytes]:
        images: dict[int, bytes] = {}
        for c, (seed, result) in enumerate(zip(decision.seeds, results, strict=True)):
            if result.image is None:
                continue
            text = {
                "gcr:job": self.id,
                "gcr:round": str(index),
                "gcr:candidate": str(c),
                "gcr:seed": str(seed),
                "gcr:prompt": prompt,
                "gcr:model": self.r.scheduler.generator.name,
            }
            png = await asyncio.to_thread(encode_png, result.image, text)
            await self.r.store.put_image(self.id, index, c, png)
            images[c] = png
        return images

    async def critique(self, round_index: int, png: bytes) -> Critique | CriticError:
        """Judge one image. While the critic is unreachable or timing out (a restart, an
        overload), the critique is asked again with backoff for up to `critic_outage_s`:
        the image is made and stored, and only its judgment waits. What still fails, or
        fails for good (refused, unparseable), is returned as the candidate's error."""
        waited_since: float | None = None
        attempt = 0
        while True:
            outcome = await self._critique_once(png)
            if not isinstance(outcome, CriticError) or not outcome.retryable:
                return outcome
            now = time.monotonic()
            waited_since = waited_since or now
            if now - waited_since >= self.r.critic_outage_s or await self.check_cancel():
                return outcome
            if attempt == 0:
                log.warning(
                    "job %s: %s; the critique waits up to %.0fs for the critic",
                    self.id,
                    outcome.message,
                    self.r.critic_outage_s,
                )
                await self._emit_quietly("stage", round=round_index, stage="critiquing", waiting=outcome.message)
            await asyncio.sleep(min(CRITIC_WAIT_CAP_S, CRITIC_WAIT_FIRST_S * 2**attempt))
            attempt += 1

    async def _critique_once(self, png: bytes) -> Critique | CriticError:
        async with self.r._critique_slots:
            metrics.CRITIC_INFLIGHT.inc()
            self.critic_calls += 1
            try:
                return await self.r.critic.critique(
                    self.spec.prompt, png, source_image=self.source_png, mode=self.spec.mode
                )
            except CriticError as exc:
                metrics.CRITIC_ERRORS.labels(exc.code).inc()
                return exc
            finally:
                metrics.CRITIC_INFLIGHT.dec()

    def best_candidate(self, rounds: list[Round]) -> BestCandidate | None:
        pick: Pick | None = self.policy.best(rounds)
        if pick is None:
            return None
        return BestCandidate(
            round=pick.round,
            candidate=pick.candidate,
            overall=pick.overall,
            prompt=pick.prompt,
        )

    async def finish(self, reason: StopReason, error: GcrError | JobError | None = None) -> bool:
        if reason == "failed" and error is None:
            error = _unjudged_error(self.rounds)
        best = self.best_candidate(self.rounds)
        if reason == "cancelled":
            status = "cancelled"
        elif reason == "failed":
            status = "failed"
        elif best is None:
            status = "expired"  # the deadline passed before any round finished
        else:
            status = "succeeded"
        first = self.rounds[0].overall if self.rounds else None
        summary = JobSummary(
            rounds_used=len(self.rounds),
            generator_calls=self.generator_calls,
            critic_calls=self.critic_calls,
            first_round_overall=first,
            best_overall=best.overall if best else None,
            gain=None if best is None or first is None else best.overall - first,
            critic_usage=sum((r.critic_usage or TokenUsage() for r in self.rounds), TokenUsage()),
        )
        critic_models = {c.critique.model for r in self.rounds for c in r.candidates if c.critique}
        await self.set(
            status=status,
            stop_reason=reason,
            stage=None,
            finished_at=time.time(),
            best=best,
            summary=summary,
            error=_as_job_error(error),
            critic_model=", ".join(sorted(critic_models)) or None,
        )
        metrics.JOBS_FINISHED.labels(status, reason).inc()
        await self.r.store.publish_end(self.id, status, reason, _as_job_error(error))
        log.info("job %s %s (%s) after %d rounds", self.id, status, reason, len(self.rounds))
        return True


def _job_error(exc: GcrError | GeneratorError) -> JobError:
    return JobError(code=exc.code, message=exc.message, retryable=exc.retryable)


def _as_job_error(error: GcrError | JobError | None) -> JobError | None:
    return error if error is None or isinstance(error, JobError) else _job_error(error)


def _unjudged_error(rounds: list[Round]) -> JobError:
    """Why the last round has no judged candidate: its first candidate's error, said so."""
    last = rounds[-1] if rounds else None
    errors = [c.error for c in last.candidates if c.error is not None] if last else []
    if not errors:
        return JobError(code="internal", message="the job stopped as failed without a recorded error")
    first = errors[0]
    message = (
        f"round {last.index + 1}'s images could not be judged ({first.message}); "  # type: ignore[union-attr]
        "they are kept, and the job ends with the best of the rounds before"
    )
    return first.model_copy(update={"message": message})
