"""The loop policy: pure decisions, tested without Redis or HTTP."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gcr.types import Candidate, Critique, DimensionScore, LoopParams, Round, overall_score
from service.jobs.ranking import choose
from workers.loop import Continue, LoopPolicy, Stop

INSTRUCTION = "a red cube on a table"


def critique(overall: float, tf: float | None = None, refined: str | None = "refined", comments: str = "") -> Critique:
    score = 1 + 3 * overall
    dims = {
        "text_faithfulness": DimensionScore(score=score if tf is None else tf),
        "physical_quality": DimensionScore(score=score),
    }
    value = overall_score([d.score for d in dims.values()])
    return Critique(dimensions=dims, overall=value, refined_request=refined, refinement_comments=comments)


def make_round(index: int, overalls: list[float], prompt: str = "p", **kwargs: Any) -> Round:
    candidates = []
    for c, overall in enumerate(overalls):
        crit = critique(overall, refined=f"refined r{index} c{c}", **kwargs)
        candidates.append(Candidate(index=c, seed=c, critique=crit, overall=crit.overall))
    chosen = choose(candidates)
    return Round(
        index=index,
        prompt=prompt,
        candidates=candidates,
        chosen=chosen,
        overall=None if chosen is None else candidates[chosen].overall,
        started_at=0,
        finished_at=0,
    )


def policy(**params: Any) -> LoopPolicy:
    return LoopPolicy(LoopParams(**params), base_seed=42, instruction=INSTRUCTION)


def test_first_round_uses_the_instruction_and_base_seed() -> None:
    decision = policy(candidates_per_round=3).decide([])
    assert decision == Continue(0, INSTRUCTION, (42, 43, 44))


def test_stops_on_threshold() -> None:
    assert policy(threshold=0.7).decide([make_round(0, [0.8])]) == Stop("accepted")


def test_threshold_alone_is_not_enough_when_a_minimum_fails() -> None:
    p = policy(threshold=0.5, min_scores={"text_faithfulness": 3.5})
    rounds = [make_round(0, [0.8], tf=3.0)]
    assert isinstance(p.decide(rounds), Continue)
    assert p.decide([make_round(0, [0.8], tf=3.6)]) == Stop("accepted")


def test_a_minimum_on_an_na_dimension_is_not_met() -> None:
    p = policy(threshold=0.1, min_scores={"text_rendering": 2.0})
    assert isinstance(p.decide([make_round(0, [0.9])]), Continue)


def test_stops_at_max_rounds() -> None:
    rounds = [make_round(i, [0.1 * (i + 1)]) for i in range(3)]
    assert policy(max_rounds=3, threshold=0.9, patience=None).decide(rounds) == Stop("max_rounds")


def test_accepted_wins_over_max_rounds() -> None:
    rounds = [make_round(0, [0.2]), make_round(1, [0.95])]
    assert policy(max_rounds=2, threshold=0.9).decide(rounds) == Stop("accepted")


def test_best_round_not_last() -> None:
    p = policy(max_rounds=3, threshold=0.99, patience=None)
    rounds = [make_round(0, [0.3]), make_round(1, [0.7]), make_round(2, [0.5])]
    best = p.best(rounds)
    assert best is not None and (best.round, best.overall) == (1, rounds[1].overall)


def test_next_prompt_is_the_refined_request_of_the_latest_round() -> None:
    p = policy(threshold=0.99, patience=None)
    decision = p.decide([make_round(0, [0.3]), make_round(1, [0.5])])
    assert decision == Continue(2, "refined r1 c0", (42,))


def test_refine_from_best_uses_the_best_critique() -> None:
    p = policy(threshold=0.99, patience=None, refine_from="best")
    decision = p.decide([make_round(0, [0.6]), make_round(1, [0.4])])
    assert isinstance(decision, Continue) and decision.prompt == "refined r0 c0"


def test_no_refinement_stops() -> None:
    rounds = [make_round(0, [0.3])]
    rounds[0].candidates[0].critique.refined_request = None  # type: ignore[union-attr]
    assert policy(threshold=0.9).decide(rounds) == Stop("no_refinement")


def test_patience_stops_a_flat_run() -> None:
    p = policy(max_rounds=10, threshold=0.99, patience=2)
    rounds = [make_round(0, [0.5]), make_round(1, [0.5])]
    assert isinstance(p.decide(rounds), Continue)
    rounds.append(make_round(2, [0.4]))
    assert p.decide(rounds) == Stop("no_improvement")


def test_improvement_resets_patience() -> None:
    p = policy(max_rounds=10, threshold=0.99, patience=2)
    rounds = [make_round(0, [0.5]), make_round(1, [0.4]), make_round(2, [0.6]), make_round(3, [0.6])]
    assert isinstance(p.decide(rounds), Continue)


def test_deadline_stops_before_a_round_starts() -> None:
    p = policy(deadline_s=10, threshold=0.99, patience=None)
    assert p.decide([make_round(0, [0.3])], elapsed_s=10.5) == Stop("deadline")
    assert isinstance(p.decide([make_round(0, [0.3])], elapsed_s=9.0), Continue)
    assert p.decide([], elapsed_s=11) == Stop("deadline")


def test_a_round_without_any_critique_fails() -> None:
    round_ = make_round(0, [0.5])
    round_.candidates[0].critique = None
    round_.candidates[0].overall = None
    round_.chosen = None
    assert policy().decide([round_]) == Stop("failed")


def test_seed_policies() -> None:
    fixed, vary = policy(candidates_per_round=2), policy(candidates_per_round=2, seed_policy="vary")
    assert fixed.seeds(0) == fixed.seeds(3) == (42, 43)
    assert vary.seeds(0) == (42, 43) and vary.seeds(1) == (44, 45)


def test_chosen_candidate_breaks_ties_by_text_faithfulness() -> None:
    candidates = [
        Candidate(index=0, seed=0, critique=critique(0.5, tf=2.0), overall=0.5),
        Candidate(index=1, seed=1, critique=critique(0.5, tf=3.0), overall=0.5),
        Candidate(index=2, seed=2, critique=critique(0.4), overall=0.4),
    ]
    assert choose(candidates) == 1


def test_history_carries_earlier_refinement_comments() -> None:
    p = policy(threshold=0.99, patience=None, history=True)
    rounds = [make_round(0, [0.3], comments="make the cube redder"), make_round(1, [0.4], comments="add a shadow")]
    decision = p.decide(rounds)
    assert isinstance(decision, Continue)
    assert decision.prompt.startswith("refined r1 c0")
    assert "make the cube redder" in decision.prompt and "add a shadow" in decision.prompt


scores = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    rounds=st.lists(st.lists(scores, min_size=1, max_size=4), min_size=1, max_size=8),
    max_rounds=st.integers(1, 8),
    threshold=scores,
    patience=st.one_of(st.none(), st.integers(1, 4)),
)
def test_simulated_runs_keep_the_invariants(
    rounds: list[list[float]], max_rounds: int, threshold: float, patience: int | None
) -> None:
    """Drive the policy with arbitrary score sequences, as the worker would."""
    n = len(rounds[0])
    p = policy(max_rounds=max_rounds, threshold=threshold, patience=patience, candidates_per_round=n)
    done: list[Round] = []
    generations = 0
    while True:
        decision = p.decide(done)
        if isinstance(decision, Stop):
            break
        assert decision.round_index == len(done)
        overalls = (rounds[len(done) % len(rounds)] * n)[:n]
        generations += len(decision.seeds)
        done.append(make_round(len(done), overalls))
    # never more than max_rounds x candidates generations
    assert generations <= max_rounds * n
    # the result is the best scored candidate of all rounds
    best = p.best(done)
    assert best is not None
    every = [c.overall for r in done for c in r.candidates if c.overall is not None]
    assert best.overall == max(every)
    if decision.reason == "accepted":
        assert done[-1].overall is not None and done[-1].overall >= threshold


@settings(max_examples=100, deadline=None)
@given(stage_s=st.floats(0.01, 5.0), deadline_s=st.floats(0.1, 20.0))
def test_a_deadline_is_overrun_by_at_most_one_stage(stage_s: float, deadline_s: float) -> None:
    """The worker asks before each round and after generation; each stage takes stage_s."""
    p = policy(max_rounds=20, threshold=1.0, patience=None, deadline_s=deadline_s)
    clock = 0.0
    done: list[Round] = []
    while isinstance(p.decide(done, clock), Continue):
        clock += stage_s  # generate
        if p.deadline_passed(clock):
            break
        clock += stage_s  # critique
        done.append(make_round(len(done), [0.1]))
    assert clock <= deadline_s + stage_s + 1e-9
