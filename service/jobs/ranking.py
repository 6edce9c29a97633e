"""One ranking of candidates, for the loop and for every answer that picks images.

A round's chosen candidate is its best by overall score, ties broken by text faithfulness,
then by the lower candidate index. The job's best is the best chosen candidate of all
rounds, the earliest round winning a tie. `ranked` orders every judged candidate of a job
by the same key, so its first is the job's best and OpenAI's `n` best start there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from gcr.types import TEXT_FAITHFULNESS, Candidate, Round

R = TypeVar("R", bound=Round)


def rank(candidate: Candidate) -> tuple[float, float]:
    """What makes a judged candidate better: overall, then text faithfulness (N/A counts 0)."""
    assert candidate.overall is not None and candidate.critique is not None
    faithfulness = candidate.critique.score(TEXT_FAITHFULNESS)
    return candidate.overall, faithfulness if faithfulness is not None else 0.0


def _judged(candidate: Candidate) -> bool:
    return candidate.overall is not None and candidate.critique is not None


def choose(candidates: Sequence[Candidate]) -> int | None:
    """Index of a round's best judged candidate; None when none was judged."""
    judged = [c for c in candidates if _judged(c)]
    if not judged:
        return None
    return min(judged, key=lambda c: (_descending(rank(c)), c.index)).index


def ranked(rounds: Sequence[R]) -> list[tuple[R, Candidate]]:
    """Every judged candidate of `rounds`, best first (ties: the earlier round, the lower index)."""
    judged = [(r, c) for r in rounds for c in r.candidates if _judged(c)]
    return sorted(judged, key=lambda rc: (_descending(rank(rc[1])), rc[0].index, rc[1].index))


def _descending(key: tuple[float, float]) -> tuple[float, float]:
    return -key[0], -key[1]
