"""`gcr eval`'s plots: written as PNGs next to summary.json, from the summary's own numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.evaluation.records import COMPUTE_PLOT, PLOT, SUMMARY
from service.evaluation.report import write_reports
from service.evaluation.summary import score_vs_compute, summarize_policy
from tests.unit.test_eval_summary import line

pytest.importorskip("matplotlib")  # the `eval` extra; the dev setup installs it

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strategies() -> dict[str, dict[str, object]]:
    """Three strategies over the same two items: equal images, unequal scores and times."""
    return {
        "rewrite": summarize_policy(
            [line("a", [0.4, 0.5, 0.6], generate_ms=[1000.0] * 3), line("b", [0.8], generate_ms=[1000.0])]
        ),
        "edit": summarize_policy(
            [line("a", [0.4, 0.7, 0.8], generate_ms=[1000.0, 2500.0, 2500.0]), line("b", [0.8], generate_ms=[1000.0])]
        ),
        "auto": summarize_policy(
            [line("a", [0.4, 0.5, 0.8], generate_ms=[1000.0, 1000.0, 2500.0]), line("b", [0.8], generate_ms=[1000.0])]
        ),
    }


def test_score_vs_compute_is_written_next_to_the_summary_plot(tmp_path: Path) -> None:
    summary = strategies()

    written = write_reports(tmp_path, summary)

    assert written == [tmp_path / SUMMARY, tmp_path / PLOT, tmp_path / COMPUTE_PLOT]
    assert COMPUTE_PLOT == "score_vs_compute.png"
    for path in written[1:]:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path
    from PIL import Image

    with Image.open(tmp_path / COMPUTE_PLOT) as image:
        assert image.size == (1000, 420)  # two panels: against images, against seconds


def test_the_data_behind_score_vs_compute(tmp_path: Path) -> None:
    series = score_vs_compute(strategies())

    assert list(series) == ["rewrite", "edit", "auto"]
    # mean best over both items after k images (b stopped after its first, carrying 0.8)
    assert [y for _, y in series["rewrite"]["generator_calls"]] == pytest.approx([0.6, 0.65, 0.7])
    assert [y for _, y in series["edit"]["generator_calls"]] == pytest.approx([0.6, 0.75, 0.8])
    assert [x for x, _ in series["auto"]["generator_calls"]] == [1, 2, 3]
    # the same three images cost each strategy different generation time
    assert [x for x, _ in series["rewrite"]["generation_s"]] == pytest.approx([1.0, 1.5, 2.0])
    assert [x for x, _ in series["edit"]["generation_s"]] == pytest.approx([1.0, 2.25, 3.5])
    assert [x for x, _ in series["auto"]["generation_s"]] == pytest.approx([1.0, 1.5, 2.75])


def test_nothing_scored_writes_no_plot(tmp_path: Path) -> None:
    from service.evaluation.plot import plot_score_vs_compute

    failed = {"p": summarize_policy([line("a", [], status="failed", stop_reason="failed", calls=1)])}

    assert not plot_score_vs_compute(failed, tmp_path / COMPUTE_PLOT)
    assert not (tmp_path / COMPUTE_PLOT).exists()
    assert write_reports(tmp_path, failed) == [tmp_path / SUMMARY]
