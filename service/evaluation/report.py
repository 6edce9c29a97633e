"""Reading an output folder back: `summary.json`, the plots and the terminal table."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from service.evaluation.records import COMPUTE_PLOT, PLOT, SUMMARY, PolicyFolder, RunLog, write_json
from service.evaluation.summary import judged_by_standin, summarize_policy

log = logging.getLogger("gcr.eval")


def build_summary(out_dir: Path, policies: Sequence[str], item_ids: Sequence[str]) -> dict[str, Any]:
    """The summary of each policy over the items of this prompt set (lines of other ids are left out)."""
    wanted = set(item_ids)
    runs = RunLog(out_dir).records()
    summary = {}
    for name in policies:
        lines = [line for line in PolicyFolder(out_dir, name).lines() if str(line["id"]) in wanted]
        summary[name] = summarize_policy(lines, runs, policy=name)
    return summary


def write_reports(out_dir: Path, summary: dict[str, Any], *, plot: bool = True) -> list[Path]:
    """Write `summary.json` and, when matplotlib is installed, `summary.png` and
    `score_vs_compute.png`; the paths written."""
    written = [out_dir / SUMMARY]
    write_json(written[0], summary)
    if plot:
        try:
            from service.evaluation.plot import plot_curves, plot_score_vs_compute
        except ImportError:
            log.warning("matplotlib is not installed (pip install 'gcr-service[eval]'): no %s, %s", PLOT, COMPUTE_PLOT)
        else:
            for name, draw in ((PLOT, plot_curves), (COMPUTE_PLOT, plot_score_vs_compute)):
                if draw(summary, out_dir / name):
                    written.append(out_dir / name)
    return written


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


# (row label, how to show a policy's value): metrics as rows, so that a few policies
# fit a narrow terminal whatever the number of metrics.
_ROWS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("items", lambda s: str(s["items"])),
    ("succeeded / failed", lambda s: f"{s['succeeded']} / {s['failed']}"),
    ("acceptance rate", lambda s: _percent(s["acceptance_rate"])),
    ("mean overall, round 1", lambda s: _num(s["mean_first_overall"])),
    ("mean overall, best", lambda s: _num(s["mean_best_overall"])),
    ("mean overall, last round", lambda s: _num(s["mean_last_overall"])),
    ("mean gain", lambda s: _num(s["mean_gain"], "+.3f")),
    ("mean rounds used", lambda s: _num(s["mean_rounds_used"], ".2f")),
    ("gain per extra round", lambda s: _num(s["gain_per_extra_round"], "+.3f")),
    ("generator calls (images)", lambda s: str(s["generator_calls"])),
    ("images per item", lambda s: _num(s["mean_generator_calls"], ".2f")),
    ("generation, s", lambda s: f"{s['generation_s']:.1f}"),
    ("generation s per item", lambda s: _num(s["mean_generation_s"], ".2f")),
    ("critic calls", lambda s: str(s["critic_calls"])),
    ("wall clock, s", lambda s: f"{s['wall_clock_s']:.1f}"),
)


def summary_table(summary: dict[str, Any]) -> Table:
    """The headline numbers: one column per policy."""
    models = sorted({m for s in summary.values() for m in s.get("critic_models", [])})
    caption = None
    if judged_by_standin(summary):
        caption = "stand-in critic: scripted scores, NOT image quality"
    elif models:
        caption = f"critic: {', '.join(models)}"
    table = Table(title="gcr eval", caption=caption)
    table.add_column("")
    for name in summary:
        table.add_column(name, justify="right")
    for label, show in _ROWS:
        table.add_row(label, *(show(s) for s in summary.values()))
    return table
