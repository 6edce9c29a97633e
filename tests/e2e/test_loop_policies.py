"""Every loop policy field end to end through the API, with the stand-in's score schedules."""

from __future__ import annotations

from gcr.types import LoopParams
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule


def rule(instruction: str, *rounds: float | list[float]) -> StandinConfig:
    return StandinConfig(rules=[StandinRule(instruction=instruction, rounds=list(rounds))])


async def test_best_of_n_chooses_the_best_candidate(stack: Stack) -> None:
    await stack.configure_critic(rule("owl", [0.3, 0.7, 0.4]))
    await stack.start_worker()
    doc = await stack.wait(await stack.submit("an owl", loop={"max_rounds": 1, "candidates_per_round": 3}))
    [round_] = doc.rounds
    assert [round(c.overall or 0, 3) for c in round_.candidates] == [0.3, 0.7, 0.4]
    assert round_.chosen == 1 and doc.best is not None and doc.best.candidate == 1
    assert len({c.seed for c in round_.candidates}) == 3
    assert doc.summary is not None and doc.summary.generator_calls == 3 and doc.summary.critic_calls == 3


async def test_patience_stops_a_flat_run(stack: Stack) -> None:
    await stack.configure_critic(rule("flat", 0.5))
    await stack.start_worker()
    doc = await stack.wait(await stack.submit("a flat run", loop={"max_rounds": 10, "threshold": 0.9, "patience": 2}))
    assert doc.stop_reason == "no_improvement" and len(doc.rounds) == 3
    assert doc.rounds[1].delta == 0.0


async def test_deadline_stops_a_slow_run_and_keeps_the_best(stack: Stack) -> None:
    await stack.configure_critic(
        StandinConfig(rules=[StandinRule(instruction="slow", rounds=[0.2, 0.6, 0.3])], latency_s=0.3)
    )
    await stack.start_worker(generator="sim:0.3")
    doc = await stack.wait(
        await stack.submit(
            "a slow run", loop={"max_rounds": 20, "threshold": 0.99, "patience": None, "deadline_s": 1.5}
        )
    )
    assert doc.status == "succeeded" and doc.stop_reason == "deadline"
    assert 1 <= len(doc.rounds) < 20 and doc.best is not None
    assert doc.best.overall == max(r.overall or 0 for r in doc.rounds)
    assert doc.finished_at is not None and doc.started_at is not None
    # at most one stage (0.3 s here) beyond the deadline, plus scheduling slack
    assert doc.finished_at - doc.started_at < 1.5 + 0.3 + 1.0


async def test_seed_policies(stack: Stack) -> None:
    await stack.start_worker()
    loop = {"max_rounds": 3, "threshold": 1.0, "patience": None, "candidates_per_round": 2}
    fixed = await stack.wait(await stack.submit("fixed seeds", generation={"seed": 100}, loop=loop))
    vary = await stack.wait(
        await stack.submit("varied seeds", generation={"seed": 100}, loop={**loop, "seed_policy": "vary"})
    )
    assert [[c.seed for c in r.candidates] for r in fixed.rounds] == [[100, 101]] * 3
    seeds = [c.seed for r in vary.rounds for c in r.candidates]
    assert seeds[:2] == [100, 101] and len(set(seeds)) == 6


async def test_refine_from_best_uses_the_best_critique(stack: Stack) -> None:
    await stack.configure_critic(rule("vase", 0.6, 0.4, 0.5))
    await stack.start_worker()
    loop = {"max_rounds": 3, "threshold": 0.99, "patience": None}
    best = await stack.wait(await stack.submit("a vase", loop={**loop, "refine_from": "best"}))
    latest = await stack.wait(await stack.submit("a vase too", loop=loop))
    assert best.rounds[2].prompt == "a vase [refined r0 c0]"
    assert latest.rounds[2].prompt == "a vase too [refined r1 c0]"


async def test_the_job_echoes_the_effective_policy_and_seed(stack: Stack) -> None:
    await stack.register_idle_worker()
    job_id = await stack.submit("echo", loop={"max_rounds": 2})
    doc = await stack.client.get(job_id)
    assert doc.spec.loop == LoopParams(max_rounds=2)
    # an explicit null survives storage (it is not the default)
    nulls = await stack.client.get(await stack.submit("nulls", loop={"patience": None}))
    assert nulls.spec.loop.patience is None
    assert doc.spec.generation.seed is not None
    assert doc.queue_position == 0 and doc.stage == "queued"


async def test_trajectory_records_timings_and_summary(stack: Stack) -> None:
    await stack.configure_critic(
        StandinConfig(rules=[StandinRule(instruction="trajectory", rounds=[0.3, 0.5])], latency_s=0.05)
    )
    await stack.start_worker(generator="sim:0.05")
    doc = await stack.wait(await stack.submit("a trajectory", loop={"max_rounds": 2, "threshold": 0.99}))
    for round_ in doc.rounds:
        assert round_.timings.generate_ms >= 50 and round_.timings.critique_ms >= 50
        assert round_.timings.queue_wait_ms >= 0
        assert round_.candidates[0].critique is not None
        assert round_.candidates[0].critique.dimensions["text_faithfulness"].justification
    assert doc.rounds[1].delta is not None and abs(doc.rounds[1].delta - 0.2) < 1e-3
    assert doc.summary is not None and doc.summary.rounds_used == 2
    assert doc.summary.first_round_overall is not None and abs(doc.summary.first_round_overall - 0.3) < 1e-3
