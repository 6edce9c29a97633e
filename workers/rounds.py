"""One round of one job: a decision in, a `Round` out.

Generate the round's candidates (through the worker's shared scheduler), store their
images, critique each against the ORIGINAL instruction (concurrently, bounded), and
build the round. The loop policy decided what to run; `workers.runner` checkpoints what
comes out. Cancellation is checked at every stage boundary and, during generation,
interrupts denoising; a round stopped by it (or by the deadline) returns None.

Two rules about what reaches the generator and the critic:
- the generator gets the text its encoder reads (`workers.generators.prompt_fit`): a
  longer refinement is shortened to its whole words and the round records the cut;
- a critic that is away (unreachable, timing out) is waited for, with backoff, for up
  to `critic_outage_s`: the images are made and stored, only their judgment waits. A
  critique that fails for good leaves its candidate's image stored and unjudged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gcr.types import Critique, ImageRef, JobError, PromptFit, RoundTimings, TokenUsage
from service.errors import CriticError, GcrError
from service.jobs.ranking import choose
from service.jobs.records import StoredCandidate, StoredJob, StoredRound
from service.jobs.store import JobStore
from workers import metrics
from workers.critics.protocol import Critic
from workers.critique_limit import CritiqueLimit
from workers.demand import Demand
from workers.generators.base import GenRequest, PreviewSink
from workers.images import decode_image, encode_png
from workers.job_events import JobEvents
from workers.loop import Continue
from workers.scheduler import GenerationScheduler, GenResult

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("gcr.worker")

# A critique whose critic is away is asked again after 1, 2, 4, ... seconds, at most this far apart.
CRITIC_WAIT_FIRST_S = 1.0
CRITIC_WAIT_CAP_S = 8.0


@dataclass(frozen=True)
class RoundResources:
    """What every round of a worker shares: its model, generator, critic and their limits."""

    model: str
    """The model this worker serves (the name jobs and streams route by)."""
    store: JobStore
    scheduler: GenerationScheduler
    critic: Critic
    critiques: CritiqueLimit
    demand: Demand
    critic_outage_s: float


def job_error(exc: GcrError) -> JobError:
    """A failure as the job stores it: data, never the exception."""
    return JobError(code=exc.code, message=exc.message, retryable=exc.retryable)


def calls_of(rounds: Sequence[StoredRound]) -> tuple[int, int]:
    """Generator and critic calls that checkpointed rounds record: one image a candidate, one
    critique an image (what a job resumed elsewhere counts from)."""
    return sum(len(r.candidates) for r in rounds), sum(1 for r in rounds for c in r.candidates if c.has_image)


class RoundExecutor:
    """Runs the rounds of one job on this worker; counts its generator and critic calls."""

    def __init__(
        self,
        resources: RoundResources,
        job: StoredJob,
        events: JobEvents,
        deadline_passed: Callable[[], bool],
        source: tuple[bytes, Image.Image] | None = None,
    ) -> None:
        self.r = resources
        self.job = job
        self.spec = job.spec
        self.events = events
        self.deadline_passed = deadline_passed
        self.source_png: bytes | None = source[0] if source is not None else None
        self.source_image: Image.Image | None = source[1] if source is not None else None
        self.generator_calls, self.critic_calls = calls_of(job.rounds)

    @property
    def on_own_model(self) -> bool:
        return self.r.model == self.spec.model

    async def run(self, decision: Continue, mode: str, best_before: float | None) -> StoredRound | None:
        """Run round `decision.round_index` in `mode`; None when a cancel or the deadline stopped it."""
        index = decision.round_index
        started = time.time()
        source = await self.source_for(decision)
        prompt, fit = self.fit_prompt(decision.prompt, decision.seeds[0], mode, source)
        await self.events.stage(index, "generating", prompt=prompt)
        t0 = time.monotonic()
        self.r.demand.back_at_generator(self.job.id)
        async with self.events.watching_cancel():
            results = await self.r.scheduler.generate(
                [
                    self.gen_request(prompt, seed, mode, source, preview=self.events.preview_sink(index, candidate))
                    for candidate, seed in enumerate(decision.seeds)
                ],
                on_step=self.events.progress_listener(index),
                cancelled=lambda: self.events.cancelled,
            )
        generate_s = time.monotonic() - t0
        self.r.demand.left_generator(self.job.id, len(results))
        metrics.STAGE_SECONDS.labels("generate").observe(generate_s)
        self.generator_calls += len(results)
        if await self.events.check_cancel():
            return None
        images = await self.store_images(index, prompt, decision, results)
        if not images:
            raise next(r.error for r in results if r.error is not None)
        if self.deadline_passed():
            return None

        await self.events.stage(index, "critiquing")
        t1 = time.monotonic()
        critiques = await asyncio.gather(*(self.critique(index, png) for png in images.values()))
        critique_s = time.monotonic() - t1
        metrics.STAGE_SECONDS.labels("critique").observe(critique_s)

        candidates, usage = self.candidates(decision, results, dict(zip(images, critiques, strict=True)))
        metrics.CRITIC_TOKENS.labels("prompt").inc(usage.prompt_tokens)
        metrics.CRITIC_TOKENS.labels("completion").inc(usage.completion_tokens)
        # No candidate judged (the critique failed for good): the round is stored all the same,
        # its images unjudged and downloadable; the loop policy then ends the job as failed.
        chosen = choose(candidates)
        overall = None if chosen is None else candidates[chosen].overall
        edited = decision.edit_from
        return StoredRound(
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

    @staticmethod
    def candidates(
        decision: Continue, results: list[GenResult], judged: dict[int, Critique | CriticError]
    ) -> tuple[list[StoredCandidate], TokenUsage]:
        """Each candidate with its image, its critique or its error; and the critic's tokens."""
        candidates = []
        usage = TokenUsage()
        for (c, seed), result in zip(enumerate(decision.seeds), results, strict=True):
            candidate = StoredCandidate(index=c, seed=seed)
            if result.error is not None:
                candidate.error = job_error(result.error)
            elif c in judged:
                outcome = judged[c]
                candidate.has_image = True
                usage += TokenUsage.of(outcome.usage)
                if isinstance(outcome, Critique):
                    candidate.critique, candidate.overall = outcome, outcome.overall
                else:
                    candidate.error = job_error(outcome)
            candidates.append(candidate)
        return candidates, usage

    async def source_for(self, decision: Continue) -> Image.Image | None:
        """The image a round edits: the best so far for an `edit` refinement, else the job's source."""
        if decision.edit_from is None:
            return self.source_image
        png = await self.r.store.get_image(self.job.id, decision.edit_from.round, decision.edit_from.candidate)
        return await asyncio.to_thread(decode_image, png)

    def fit_prompt(self, prompt: str, seed: int, mode: str, source: Image.Image | None) -> tuple[str, PromptFit | None]:
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
                self.job.id,
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
        if not self.on_own_model:
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

    async def store_images(
        self, index: int, prompt: str, decision: Continue, results: list[GenResult]
    ) -> dict[int, bytes]:
        images: dict[int, bytes] = {}
        for c, (seed, result) in enumerate(zip(decision.seeds, results, strict=True)):
            if result.image is None:
                continue
            text = {
                "gcr:job": self.job.id,
                "gcr:round": str(index),
                "gcr:candidate": str(c),
                "gcr:seed": str(seed),
                "gcr:prompt": prompt,
                "gcr:model": self.r.scheduler.generator.name,
            }
            png = await asyncio.to_thread(encode_png, result.image, text)
            await self.r.store.put_image(self.job.id, index, c, png)
            images[c] = png
        return images

    async def critique(self, round_index: int, png: bytes) -> Critique | CriticError:
        """Judge one image, waiting out a critic that is away for up to `critic_outage_s`
        (asking again with backoff). What still fails, or fails for good (refused,
        unparseable), is returned as the candidate's error."""
        waited_since: float | None = None
        attempt = 0
        while True:
            outcome = await self._critique_once(png)
            if not isinstance(outcome, CriticError) or not outcome.retryable:
                return outcome
            now = time.monotonic()
            waited_since = waited_since or now
            if now - waited_since >= self.r.critic_outage_s or await self.events.check_cancel():
                return outcome
            if attempt == 0:
                log.warning(
                    "job %s: %s; the critique waits up to %.0fs for the critic",
                    self.job.id,
                    outcome.message,
                    self.r.critic_outage_s,
                )
                await self.events.emit_quietly("stage", round=round_index, stage="critiquing", waiting=outcome.message)
            await asyncio.sleep(min(CRITIC_WAIT_CAP_S, CRITIC_WAIT_FIRST_S * 2**attempt))
            attempt += 1

    async def _critique_once(self, png: bytes) -> Critique | CriticError:
        try:
            async with self.r.critiques.slot():  # it sees the error: a refusal is no latency sample
                metrics.CRITIC_INFLIGHT.inc()
                self.critic_calls += 1
                try:
                    return await self.r.critic.critique(
                        self.spec.prompt, png, source_image=self.source_png, mode=self.spec.mode
                    )
                finally:
                    metrics.CRITIC_INFLIGHT.dec()
        except CriticError as exc:
            metrics.CRITIC_ERRORS.labels(exc.code).inc()
            return exc
