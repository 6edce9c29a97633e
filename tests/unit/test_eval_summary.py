"""The summary math of `gcr eval`: pure functions of result lines and the runs log."""

from __future__ import annotations

from typing import Any

import pytest

from service.evaluation.summary import (
    Spend,
    best_by_generator_calls,
    best_so_far_curve,
    compute_by_round,
    item_stats,
    judged_by_standin,
    run_walls,
    score_vs_compute,
    summarize_policy,
)


def line(
    item_id: str,
    overalls: list[float],
    *,
    status: str = "succeeded",
    stop_reason: str | None = "max_rounds",
    calls: int | None = None,
    run: int = 1,
    recorded_at: float = 100.0,
    candidates: int = 1,
    generate_ms: list[float] | None = None,
) -> dict[str, Any]:
    """A result line whose job has `candidates` per round, the chosen one with these overalls,
    and the rounds' generation times (default: 1 s each)."""
    calls = len(overalls) * candidates if calls is None else calls
    times = [1000.0] * len(overalls) if generate_ms is None else generate_ms
    rounds = [
        {
            "index": i,
            "overall": o,
            "candidates": [{"index": c, "seed": c} for c in range(candidates)],
            "timings": {"queue_wait_ms": 5.0, "generate_ms": ms, "critique_ms": 700.0},
        }
        for i, (o, ms) in enumerate(zip(overalls, times, strict=True))
    ]
    return {
        "id": item_id,
        "status": status,
        "stop_reason": stop_reason,
        "run": run,
        "recorded_at": recorded_at,
        "job": {
            "rounds": rounds,
            "summary": {"generator_calls": calls, "critic_calls": calls, "rounds_used": len(overalls)},
            "critic_model": "gcr-standin-critic",
        },
    }


def test_item_stats_tracks_the_best_so_far_not_the_last_round() -> None:
    stats = item_stats(line("a", [0.4, 0.7, 0.5]))

    assert stats.curve == (0.4, 0.7, 0.7)
    assert stats.first_overall == 0.4 and stats.best_overall == 0.7 and stats.last_overall == 0.5
    assert stats.gain == pytest.approx(0.3)
    assert stats.rounds_used == 3 and stats.scored


def test_an_item_without_rounds_or_job_is_not_scored() -> None:
    rejected = {"id": "r", "status": "rejected", "stop_reason": None, "job": None}
    for stats in (item_stats(line("f", [], status="failed", stop_reason="failed")), item_stats(rejected)):
        assert not stats.scored
        assert stats.gain is None and stats.curve == () and stats.rounds_used == 0


def test_summary_of_a_mixed_policy() -> None:
    lines = [
        line("accepted-at-once", [0.9], stop_reason="accepted"),
        line("improves", [0.3, 0.6, 0.8], stop_reason="accepted", calls=3),
        line("flat", [0.5, 0.4], stop_reason="no_improvement"),
        line("failed-early", [], status="failed", stop_reason="failed", calls=1),
    ]
    summary = summarize_policy(lines)

    assert summary["items"] == 4
    assert summary["succeeded"] == 3 and summary["failed"] == 1
    assert summary["by_status"] == {"failed": 1, "succeeded": 3}
    assert summary["acceptance_rate"] == pytest.approx(2 / 4)
    # means over the three scored items only
    assert summary["scored_items"] == 3
    assert summary["mean_first_overall"] == pytest.approx((0.9 + 0.3 + 0.5) / 3)
    assert summary["mean_best_overall"] == pytest.approx((0.9 + 0.8 + 0.5) / 3)
    assert summary["mean_last_overall"] == pytest.approx((0.9 + 0.8 + 0.4) / 3)
    assert summary["mean_gain"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert summary["mean_rounds_used"] == pytest.approx(6 / 3)
    assert summary["mean_extra_rounds"] == pytest.approx(3 / 3)
    assert summary["gain_per_extra_round"] == pytest.approx((0.5 / 3) / 1.0)
    # failed items cost calls too
    assert summary["generator_calls"] == 1 + 3 + 2 + 1
    assert summary["critic_calls"] == 7
    assert summary["critic_models"] == ["gcr-standin-critic"]


def test_curve_carries_an_early_stop_forward() -> None:
    lines = [line("short", [0.9]), line("long", [0.3, 0.6, 0.8])]

    curve = summarize_policy(lines)["best_so_far_by_round"]

    assert curve == pytest.approx([(0.9 + 0.3) / 2, (0.9 + 0.6) / 2, (0.9 + 0.8) / 2])
    assert best_so_far_curve([]) == []


def test_gain_per_extra_round_is_null_without_extra_rounds() -> None:
    summary = summarize_policy([line("a", [0.4]), line("b", [0.6])])

    assert summary["mean_extra_rounds"] == 0
    assert summary["gain_per_extra_round"] is None
    assert summary["mean_gain"] == 0


def test_empty_policy() -> None:
    summary = summarize_policy([])

    assert summary["items"] == 0 and summary["acceptance_rate"] is None
    assert summary["mean_first_overall"] is None and summary["best_so_far_by_round"] == []
    assert summary["wall_clock_s"] == 0


def test_wall_clock_sums_the_runs_of_the_policy() -> None:
    runs = [
        {"event": "start", "run": 1, "at": 10.0, "policies": ["p", "q"]},
        {"event": "end", "run": 1, "at": 14.0, "interrupted": True},
        {"event": "start", "run": 2, "at": 20.0, "policies": ["q"]},
        {"event": "end", "run": 2, "at": 21.5, "interrupted": False},
        # killed: no end record; counts to its last recorded line
        {"event": "start", "run": 3, "at": 30.0, "policies": ["p"]},
    ]
    lines = [line("a", [0.5], run=1, recorded_at=12.0), line("b", [0.5], run=3, recorded_at=33.0)]

    walls = run_walls(runs, lines)
    assert [(w["run"], w["wall_s"], w["complete"]) for w in walls] == [(1, 4.0, False), (2, 1.5, True), (3, 3.0, False)]
    assert summarize_policy(lines, runs, policy="p")["wall_clock_s"] == pytest.approx(4.0 + 3.0)
    assert summarize_policy(lines, runs, policy="q")["wall_clock_s"] == pytest.approx(4.0 + 1.5)
    assert [r["run"] for r in summarize_policy(lines, runs, policy="q")["runs"]] == [1, 2]


def test_a_killed_run_that_recorded_nothing_counts_zero() -> None:
    walls = run_walls([{"event": "start", "run": 1, "at": 5.0, "policies": ["p"]}], [])
    assert walls == [{"run": 1, "policies": ["p"], "wall_s": 0.0, "complete": False}]


def test_standin_flag() -> None:
    assert judged_by_standin({"p": summarize_policy([line("a", [0.5])])})
    assert not judged_by_standin({"p": {"critic_models": ["TIGER-Lab/RationalRewards-8B-T2I"]}})


def test_generation_seconds_per_item_sum_the_rounds_generate_ms() -> None:
    stats = item_stats(line("a", [0.4, 0.7, 0.5], generate_ms=[1500.0, 250.0, 2000.0]))

    # (binary fractions: the sums are exact)
    assert stats.generation_s == 3.75
    assert stats.spend == (Spend(1, 1.5, 0.4), Spend(2, 1.75, 0.7), Spend(3, 3.75, 0.7))
    # an old line without timings or candidates costs nothing countable, but is still scored
    old = item_stats({"id": "o", "status": "succeeded", "job": {"rounds": [{"index": 0, "overall": 0.5}]}})
    assert old.generation_s == 0 and old.spend == (Spend(0, 0.0, 0.5),)


def test_summary_counts_generation_seconds_and_images_per_item() -> None:
    lines = [
        line("two-rounds", [0.3, 0.6], generate_ms=[1000.0, 3000.0]),
        line("one-round", [0.9], generate_ms=[2000.0]),
        # failed in round 2: its first round's time and both images cost compute too
        line("failed", [0.5], status="failed", stop_reason="failed", calls=2, generate_ms=[500.0]),
    ]
    summary = summarize_policy(lines)

    assert summary["generation_s"] == pytest.approx(4 + 2 + 0.5)
    assert summary["mean_generation_s"] == pytest.approx(6.5 / 3)
    assert summary["mean_generator_calls"] == pytest.approx((2 + 1 + 2) / 3)
    assert summarize_policy([])["mean_generation_s"] is None and summarize_policy([])["generation_s"] == 0


def test_best_by_generator_calls_compares_policies_at_equal_images() -> None:
    # One image a round: the best after k images is the best of the first k rounds.
    one = [item_stats(line("a", [0.3, 0.6, 0.5])), item_stats(line("b", [0.8]))]
    assert best_by_generator_calls(one) == [
        {"generator_calls": 1, "mean_best_overall": pytest.approx((0.3 + 0.8) / 2)},
        {"generator_calls": 2, "mean_best_overall": pytest.approx((0.6 + 0.8) / 2)},
        {"generator_calls": 3, "mean_best_overall": pytest.approx((0.6 + 0.8) / 2)},
    ]
    # Four a round: nothing is judged before the fourth image, then a step every four.
    four = [item_stats(line("a", [0.5, 0.7], candidates=4)), item_stats(line("b", [0.6], candidates=4))]
    curve = best_by_generator_calls(four)
    assert [p["generator_calls"] for p in curve] == [4, 5, 6, 7, 8]
    assert [p["mean_best_overall"] for p in curve] == pytest.approx([0.55, 0.55, 0.55, 0.55, 0.65])
    assert best_by_generator_calls([]) == []


def test_compute_by_round_carries_stopped_items_forward() -> None:
    stats = [
        item_stats(line("a", [0.3, 0.6], generate_ms=[1000.0, 3000.0])),
        item_stats(line("b", [0.8], candidates=2, generate_ms=[2000.0])),
    ]

    assert compute_by_round(stats) == [
        {"round": 1, "generator_calls": 1.5, "generation_s": 1.5, "mean_best_overall": pytest.approx(0.55)},
        {"round": 2, "generator_calls": 2.0, "generation_s": 3.0, "mean_best_overall": pytest.approx(0.7)},
    ]


def test_score_vs_compute_is_what_the_plot_draws() -> None:
    summary = {
        "rewrite": summarize_policy([line("a", [0.3, 0.6], generate_ms=[1000.0, 1000.0])]),
        "edit": summarize_policy([line("a", [0.3, 0.7], generate_ms=[1000.0, 4000.0])]),
        "nothing-scored": summarize_policy([line("a", [], status="failed", stop_reason="failed", calls=1)]),
    }

    series = score_vs_compute(summary)

    assert list(series) == ["rewrite", "edit"]  # a policy without a score draws nothing
    assert series["rewrite"]["generator_calls"] == [(1, 0.3), (2, 0.6)]
    assert series["edit"]["generator_calls"] == [(1, 0.3), (2, 0.7)]
    # equal images, unequal time: editing cost 4 s where rewriting cost 1 s
    assert series["rewrite"]["generation_s"] == [(1.0, 0.3), (2.0, 0.6)]
    assert series["edit"]["generation_s"] == [(1.0, 0.3), (5.0, 0.7)]
    assert score_vs_compute({"p": summarize_policy([])}) == {}
