"""`summary.png`: mean best-so-far overall against round index, one line per policy.

Imported only when a plot is written: matplotlib is an optional extra (`gcr-service[eval]`).
The figure is drawn on an Agg canvas directly, without pyplot, so no global
backend state is touched and no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from service.evaluation.summary import judged_by_standin

_LINES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")


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
        rounds = list(range(1, len(curve) + 1))
        # Policies often share round 1 (same seed) or whole curves: vary line and marker so
        # that a curve under another stays visible.
        axes.plot(
            rounds,
            curve,
            linestyle=_LINES[number % len(_LINES)],
            marker=_MARKERS[number % len(_MARKERS)],
            label=f"{name} (n={summary[name].get('scored_items', 0)})",
        )
    axes.set_xlabel("round")
    axes.set_ylabel("mean best-so-far overall (0-1)")
    axes.set_xticks(list(range(1, longest + 1)))
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    title = "Generate-Critique-Refine: best score so far by round"
    if judged_by_standin(summary):
        # Offline runs must not be mistaken for a quality result.
        title += "\n(stand-in critic: scripted scores, not image quality)"
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True
