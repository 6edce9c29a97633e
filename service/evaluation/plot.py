"""The plots of a summary, one line per policy: `summary.png`, mean best-so-far overall
against round index; `score_vs_compute.png`, the same score against what it cost (images
made, generation seconds), to compare policies at equal compute.

Imported only when a plot is written: matplotlib is an optional extra (`gcr-service[eval]`).
The figure is drawn on an Agg canvas directly, without pyplot, so no global
backend state is touched and no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from service.evaluation.summary import judged_by_standin, score_vs_compute

_LINES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")
_STANDIN_NOTE = "\n(stand-in critic: scripted scores, not image quality)"


def _policy_style(number: int, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Policies often share round 1 (same seed) or whole curves: each gets its own line and
    marker, so that a curve under another stays visible."""
    return {
        "linestyle": _LINES[number % len(_LINES)],
        "marker": _MARKERS[number % len(_MARKERS)],
        "label": f"{name} (n={summary[name].get('scored_items', 0)})",
    }


def _title(text: str, summary: dict[str, Any]) -> str:
    """Offline runs must not be mistaken for a quality result: their titles say so."""
    return text + _STANDIN_NOTE if judged_by_standin(summary) else text


def plot_curves(summary: dict[str, Any], path: Path) -> bool:
    """Draw every policy's `best_so_far_by_round`; False (nothing written) when no policy has one."""
    curves = {name: s.get("best_so_far_by_round") or [] for name, s in summary.items()}
    if not any(curves.values()):
        return False
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    longest = 0
    for number, (name, curve) in enumerate(curves.items()):
        if not curve:
            continue
        longest = max(longest, len(curve))
        axes.plot(list(range(1, len(curve) + 1)), curve, **_policy_style(number, name, summary))
    axes.set_xlabel("round")
    axes.set_ylabel("mean best-so-far overall (0-1)")
    axes.set_xticks(list(range(1, longest + 1)))
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(_title("Generate-Critique-Refine: best score so far by round", summary), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True


def plot_score_vs_compute(summary: dict[str, Any], path: Path) -> bool:
    """Draw each policy's mean best overall against images per item (left) and cumulative
    generation seconds per item (right); False (nothing written) when no policy has a score."""
    series = score_vs_compute(summary)
    if not series:
        return False
    figure = Figure(figsize=(10.0, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    by_calls, by_seconds = figure.subplots(1, 2, sharey=True)
    for number, (name, points) in enumerate(series.items()):
        style = _policy_style(number, name, summary)
        if points["generator_calls"]:
            # the best is known only once a round's images are judged: a step after each image
            by_calls.plot(*zip(*points["generator_calls"], strict=True), drawstyle="steps-post", **style)
        if points["generation_s"]:
            by_seconds.plot(*zip(*points["generation_s"], strict=True), **style)
    by_calls.set_xlabel("generator calls (images) per item")
    by_calls.set_ylabel("mean best overall (0-1)")
    by_seconds.set_xlabel("generation seconds per item (cumulative, one point per round)")
    for axes in (by_calls, by_seconds):
        axes.grid(True, alpha=0.3)
    by_calls.legend(loc="lower right")  # the two panels share their lines
    by_calls.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(_title("Generate-Critique-Refine: best score against compute", summary), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True
