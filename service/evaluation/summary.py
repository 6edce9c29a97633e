"""The numbers of `summary.json`, as pure functions of the result lines and the runs log.

Definitions (also in docs/evaluation.md):

- an item is *scored* when at least one round was critiqued (its job has a round);
  score means are over scored items only, whatever the item's final status, so a
  job that failed in round 3 still contributes its first two rounds;
- `first_overall`: the overall score of round 1 (the plain generation);
  `best_overall`: the best overall over all rounds (what the service returns);
  `last_overall`: the last round's (what a loop that keeps its latest image returns);
  `gain` = best − first; `extra_rounds` = rounds used − 1;
- `gain_per_extra_round` = mean gain / mean extra rounds; null when no scored item
  used an extra round;
- `acceptance_rate` = items stopped with `accepted` / all items;
- `best_so_far_by_round[r]`: mean over scored items of the best overall up to round
  r+1; an item that stopped earlier carries its final best forward;
- call counts sum every item's job summary (images generated, critiques requested),
  failed items included: they cost GPU time too;
- `generation_s`: the generator's time, the sum of every round's `timings.generate_ms`
  (failed items included); `mean_generator_calls` and `mean_generation_s` are per item;
- compute against score, for comparing policies at equal compute: counting the images
  of each item's rounds (its candidates) and their generation time cumulatively,
  `best_by_generator_calls[k]` is the mean over scored items of the best overall by
  the time k images were made (an item that stopped carries its final best forward;
  k starts where every scored item has finished its first round), and
  `compute_by_round[r]` the mean cumulative images, generation seconds and best
  overall after round r+1 (stopped items carry all three forward);
- `wall_clock_s`: the summed wall time of the invocations that worked on the
  policy (policies of one invocation run concurrently and share its time).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# The stand-in critic's model name: results judged by it are scripted, not quality.
STANDIN_CRITIC_MODEL = "gcr-standin-critic"


@dataclass(frozen=True)
class Spend:
    """An item's cost up to one of its rounds, cumulative, and its best overall by then."""

    generator_calls: int
    generation_s: float
    best: float


@dataclass(frozen=True)
class ItemStats:
    """What one result line contributes to the summary."""

    id: str
    status: str
    stop_reason: str | None
    rounds_used: int
    first_overall: float | None
    last_overall: float | None
    best_overall: float | None
    curve: tuple[float, ...]
    generator_calls: int
    critic_calls: int
    critic_model: str | None
    generation_s: float = 0.0
    spend: tuple[Spend, ...] = ()

    @property
    def scored(self) -> bool:
        return self.first_overall is not None

    @property
    def gain(self) -> float | None:
        if self.first_overall is None or self.best_overall is None:
            return None
        return self.best_overall - self.first_overall


def item_stats(line: dict[str, Any]) -> ItemStats:
    """Read one result line (its `job` is the job document, or null when never accepted)."""
    job = line.get("job") or {}
    rounds = job.get("rounds") or []
    overalls = [r.get("overall") for r in rounds]
    curve: list[float] = []
    spend: list[Spend] = []
    images, seconds = 0, 0.0
    for round_ in rounds:
        images += len(round_.get("candidates") or [])
        seconds += float((round_.get("timings") or {}).get("generate_ms") or 0.0) / 1000
        value = round_.get("overall")
        if value is not None:  # a checkpointed round always has one; tolerate foreign lines
            curve.append(value if not curve else max(curve[-1], value))
        if curve:
            spend.append(Spend(images, seconds, curve[-1]))
    summary = job.get("summary") or {}
    return ItemStats(
        id=str(line["id"]),
        status=str(line.get("status")),
        stop_reason=line.get("stop_reason"),
        rounds_used=len(overalls),
        first_overall=overalls[0] if overalls else None,
        last_overall=overalls[-1] if overalls else None,
        best_overall=curve[-1] if curve else None,
        curve=tuple(curve),
        generator_calls=int(summary.get("generator_calls") or 0),
        critic_calls=int(summary.get("critic_calls") or 0),
        critic_model=job.get("critic_model"),
        generation_s=seconds,
        spend=tuple(spend),
    )


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean; None for no values."""
    items = list(values)
    return sum(items) / len(items) if items else None


def best_so_far_curve(stats: Sequence[ItemStats]) -> list[float]:
    """Mean best-so-far overall by round index, carrying each item's final best forward."""
    curves = [s.curve for s in stats if s.curve]
    length = max((len(c) for c in curves), default=0)
    return [sum(c[min(r, len(c) - 1)] for c in curves) / len(curves) for r in range(length)]


def best_by_generator_calls(stats: Sequence[ItemStats]) -> list[dict[str, float]]:
    """Mean best overall after k images, for every k from the first at which each scored item
    has a judged round to the most any item made; stopped items carry their best forward."""
    spends = [s.spend for s in stats if s.spend]
    if not spends:
        return []
    first = max(1, max(sp[0].generator_calls for sp in spends))
    last = max(sp[-1].generator_calls for sp in spends)
    points = []
    for k in range(first, last + 1):
        # `best` only grows, so the last round within k images holds the best by then
        bests = [[p.best for p in sp if p.generator_calls <= k][-1] for sp in spends]
        points.append({"generator_calls": k, "mean_best_overall": sum(bests) / len(bests)})
    return points


def compute_by_round(stats: Sequence[ItemStats]) -> list[dict[str, float]]:
    """Mean cumulative images, generation seconds and best overall after each round."""
    spends = [s.spend for s in stats if s.spend]
    length = max((len(sp) for sp in spends), default=0)
    points = []
    for r in range(length):
        upto = [sp[min(r, len(sp) - 1)] for sp in spends]
        points.append(
            {
                "round": r + 1,
                "generator_calls": sum(p.generator_calls for p in upto) / len(upto),
                "generation_s": sum(p.generation_s for p in upto) / len(upto),
                "mean_best_overall": sum(p.best for p in upto) / len(upto),
            }
        )
    return points


def score_vs_compute(summary: dict[str, Any]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """What `score_vs_compute.png` draws, per policy: (images per item, mean best overall) and
    (cumulative generation seconds per item, mean best overall). Policies without scored items
    are left out."""
    series = {}
    for name, policy in summary.items():
        by_calls = policy.get("best_by_generator_calls") or []
        by_round = policy.get("compute_by_round") or []
        if not by_calls and not by_round:
            continue
        series[name] = {
            "generator_calls": [(p["generator_calls"], p["mean_best_overall"]) for p in by_calls],
            "generation_s": [(p["generation_s"], p["mean_best_overall"]) for p in by_round],
        }
    return series


def run_walls(runs: Sequence[dict[str, Any]], lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wall time of each invocation from the runs log.

    A run killed before its `end` record counts until its last recorded line (a
    lower bound), or zero when it recorded nothing."""
    ends = {r["run"]: r for r in runs if r.get("event") == "end"}
    last_line: dict[int, float] = {}
    for line in lines:
        run, at = line.get("run"), line.get("recorded_at")
        if isinstance(run, int) and isinstance(at, int | float):
            last_line[run] = max(last_line.get(run, at), at)
    walls = []
    for start in (r for r in runs if r.get("event") == "start"):
        number, began = start["run"], float(start["at"])
        end = ends.get(number)
        if end is not None:
            wall, complete = float(end["at"]) - began, not end.get("interrupted", False)
        else:
            wall, complete = max(0.0, last_line.get(number, began) - began), False
        walls.append({"run": number, "policies": start.get("policies", []), "wall_s": wall, "complete": complete})
    return walls


def summarize_policy(
    lines: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]] = (), policy: str | None = None
) -> dict[str, Any]:
    """The summary of one policy from its result lines (and the runs log, for wall time)."""
    stats = [item_stats(line) for line in lines]
    scored = [s for s in stats if s.scored]
    items = len(stats)
    succeeded = sum(1 for s in stats if s.status == "succeeded")
    accepted = sum(1 for s in stats if s.stop_reason == "accepted")
    mean_gain = mean(s.gain for s in scored if s.gain is not None)
    mean_extra = mean(s.rounds_used - 1 for s in scored)
    walls = [w for w in run_walls(runs, lines) if policy is None or policy in w["policies"]]
    return {
        "items": items,
        "succeeded": succeeded,
        "failed": items - succeeded,
        "by_status": dict(sorted(Counter(s.status for s in stats).items())),
        "stop_reasons": dict(sorted(Counter(str(s.stop_reason) for s in stats).items())),
        "acceptance_rate": accepted / items if items else None,
        "scored_items": len(scored),
        "mean_first_overall": mean(s.first_overall for s in scored if s.first_overall is not None),
        "mean_best_overall": mean(s.best_overall for s in scored if s.best_overall is not None),
        "mean_last_overall": mean(s.last_overall for s in scored if s.last_overall is not None),
        "mean_gain": mean_gain,
        "mean_rounds_used": mean(s.rounds_used for s in scored),
        "mean_extra_rounds": mean_extra,
        "gain_per_extra_round": (mean_gain / mean_extra if mean_gain is not None and mean_extra else None),
        "generator_calls": sum(s.generator_calls for s in stats),
        "critic_calls": sum(s.critic_calls for s in stats),
        "generation_s": sum(s.generation_s for s in stats),
        "mean_generator_calls": mean(s.generator_calls for s in stats),
        "mean_generation_s": mean(s.generation_s for s in stats),
        "critic_models": sorted({s.critic_model for s in stats if s.critic_model}),
        "wall_clock_s": sum(w["wall_s"] for w in walls),
        "runs": [{k: w[k] for k in ("run", "wall_s", "complete")} for w in walls],
        "best_so_far_by_round": best_so_far_curve(scored),
        "best_by_generator_calls": best_by_generator_calls(scored),
        "compute_by_round": compute_by_round(scored),
    }


def judged_by_standin(summary: dict[str, Any]) -> bool:
    """Whether any policy of a summary was judged by the stand-in critic."""
    return any(STANDIN_CRITIC_MODEL in s.get("critic_models", []) for s in summary.values())
