"""The Generate-Critique-Refine policy: pure decisions, no I/O.

Given the rounds finished so far, `LoopPolicy.decide` says whether to stop (and
why) or which prompt and seeds the next round uses. The worker does the I/O and
asks the policy between stages. Semantics (DESIGN.md, "The loop"):

- Every candidate is judged against the ORIGINAL instruction, so overall scores
  compare across rounds; the policy only ever sees those scores.
- A round's chosen candidate is its best by overall score, ties broken by text
  faithfulness, then by the lower candidate index; the job's result is the best chosen
  candidate over ALL rounds, the earliest winning a tie (`service.jobs.ranking`).
- Acceptance: the chosen candidate's overall >= threshold AND every configured
  per-dimension minimum is met (an N/A dimension with a minimum fails it).
- Checks, in order: accepted, max_rounds, deadline, patience (no_improvement),
  then the refinement (no_refinement when the critic gave none).
- How a later round refines (`loop.strategy`, docs/loop.md): `rewrite` works from
  the refined request (a new image, or a new edit of an edit job's source); `edit`
  edits the best image so far, instructed by that image's critique (`edit_instruction`);
  `auto` edits when the best so far scores at least `edit_above`, else rewrites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gcr.types import MAX_SEED, Critique, LoopParams, Round, StopReason
from service.jobs.ranking import ranked

# How many earlier rounds' refinement comments `history=True` carries, and how long each may be.
HISTORY_ROUNDS = 3
HISTORY_COMMENT_CHARS = 300


Refinement = Literal["rewrite", "edit"]


@dataclass(frozen=True)
class Pick:
    """A chosen candidate: where it is and what it scored."""

    round: int
    candidate: int
    overall: float
    prompt: str


@dataclass(frozen=True)
class Continue:
    """Run round `round_index` with `prompt` (for an edit: its instruction) and `seeds`.

    `refine`: `rewrite` works from text (the job's own model and mode); `edit` edits
    `edit_from`, the best image so far, on the edit model. `reason` says why, for people."""

    round_index: int
    prompt: str
    seeds: tuple[int, ...]
    refine: Refinement = "rewrite"
    edit_from: Pick | None = None
    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class Stop:
    reason: StopReason


Decision = Continue | Stop


def edit_instruction(critique: Critique) -> str:
    """What an `edit` round tells the edit model: the critique's refinement comments (what to
    change in this image), else its refined request. The refined request re-describes the
    whole picture, which invites a redraw; the comments name the fix."""
    return critique.refinement_comments.strip() or (critique.refined_request or "").strip()


class LoopPolicy:
    """Decides the loop of one job from its params, base seed and instruction."""

    def __init__(self, params: LoopParams, base_seed: int, instruction: str) -> None:
        self.params = params
        self.base_seed = base_seed
        self.instruction = instruction

    # --- seeds -----------------------------------------------------------------
    def seeds(self, round_index: int) -> tuple[int, ...]:
        """`fixed`: the same seeds every round (only the prompt changes, as in the paper);
        `vary`: fresh seeds each round. Candidate 0 of round 0 always uses the base seed."""
        n = self.params.candidates_per_round
        offset = 0 if self.params.seed_policy == "fixed" else round_index * n
        return tuple((self.base_seed + offset + c) % (MAX_SEED + 1) for c in range(n))

    # --- scoring -----------------------------------------------------------------
    def accepted(self, critique: Critique) -> bool:
        if critique.overall < self.params.threshold:
            return False
        for dimension, minimum in self.params.min_scores.items():
            score = critique.score(dimension)
            if score is None or score < minimum:
                return False
        return True

    def best(self, rounds: Sequence[Round]) -> Pick | None:
        """The best chosen candidate over all rounds; the earliest wins a tie (`service.jobs.ranking`,
        the one ranking the OpenAI API's answers use too)."""
        picks = ranked(rounds)
        if not picks:
            return None
        round_, candidate = picks[0]
        assert candidate.overall is not None
        return Pick(round_.index, candidate.index, candidate.overall, round_.prompt)

    def best_before(self, rounds: Sequence[Round]) -> float | None:
        pick = self.best(rounds)
        return pick.overall if pick else None

    def deadline_passed(self, elapsed_s: float) -> bool:
        return self.params.deadline_s is not None and elapsed_s >= self.params.deadline_s

    # --- the decision ----------------------------------------------------------------
    def decide(self, rounds: Sequence[Round], elapsed_s: float = 0.0) -> Decision:
        """What to do after `rounds`, with `elapsed_s` spent since the job started."""
        if not rounds:
            if self.deadline_passed(elapsed_s):
                return Stop("deadline")
            return Continue(0, self.instruction, self.seeds(0), reason="the first round works from the instruction")
        last = rounds[-1]
        if last.chosen is None:
            return Stop("failed")
        chosen = last.candidates[last.chosen]
        assert chosen.critique is not None
        if self.accepted(chosen.critique):
            return Stop("accepted")
        if len(rounds) >= self.params.max_rounds:
            return Stop("max_rounds")
        if self.deadline_passed(elapsed_s):
            return Stop("deadline")
        if self.params.patience is not None and self._rounds_without_improvement(rounds) >= self.params.patience:
            return Stop("no_improvement")
        best = self.best(rounds)
        assert best is not None  # the last round has a chosen candidate
        refine, reason = self.refinement(best)
        seeds = self.seeds(len(rounds))
        if refine == "edit":
            critique = rounds[best.round].candidates[best.candidate].critique
            assert critique is not None
            instruction = edit_instruction(critique)
            if not instruction:
                return Stop("no_refinement")
            return Continue(len(rounds), instruction, seeds, "edit", best, reason)
        source = self._refinement_source(rounds)
        if source.refined_request is None or not source.refined_request.strip():
            return Stop("no_refinement")
        prompt = source.refined_request.strip()
        if self.params.history:
            prompt = self._with_history(prompt, rounds)
        return Continue(len(rounds), prompt, seeds, reason=reason)

    def refinement(self, best: Pick) -> tuple[Refinement, str]:
        """How the next round refines, and why (the strategy's rule, with the numbers it read)."""
        strategy = self.params.strategy
        where = f"round {best.round + 1} candidate {best.candidate + 1}"  # for people: from 1
        if strategy == "rewrite":
            return "rewrite", "strategy rewrite: work from the refined request"
        if strategy == "edit":
            return "edit", f"strategy edit: edit the best image so far ({where}, overall {best.overall:.2f})"
        bar = self.params.edit_above
        if best.overall >= bar:
            return "edit", f"auto: the best so far ({where}) scores {best.overall:.2f} >= {bar:.2f}: edit it"
        return "rewrite", f"auto: the best so far scores {best.overall:.2f} < {bar:.2f}: work from the refined request"

    def _rounds_without_improvement(self, rounds: Sequence[Round]) -> int:
        """Trailing rounds whose overall did not beat the best of the rounds before them."""
        stale = 0
        best: float | None = None
        for round_ in rounds:
            if round_.overall is not None and (best is None or round_.overall > best):
                best, stale = round_.overall, 0
            else:
                stale += 1
        return stale

    def _refinement_source(self, rounds: Sequence[Round]) -> Critique:
        if self.params.refine_from == "best":
            pick = self.best(rounds)
            assert pick is not None
            critique = rounds[pick.round].candidates[pick.candidate].critique
        else:
            last = rounds[-1]
            assert last.chosen is not None
            critique = last.candidates[last.chosen].critique
        assert critique is not None
        return critique

    def _with_history(self, prompt: str, rounds: Sequence[Round]) -> str:
        comments: list[str] = []
        for round_ in rounds[-HISTORY_ROUNDS:]:
            if round_.chosen is None:
                continue
            critique = round_.candidates[round_.chosen].critique
            if critique and critique.refinement_comments.strip():
                text = " ".join(critique.refinement_comments.split())[:HISTORY_COMMENT_CHARS]
                comments.append(f"round {round_.index + 1}: {text}")
        if not comments:
            return prompt
        return prompt + "\nAvoid the weaknesses noted before (" + "; ".join(comments) + ")."
