"""Properties of the critic parser over generated answers.

Well-formed answers are generated in every style the parser claims to read (orders,
header variants, bold and `/4` scores, remarks, N/A, a reasoning block, running text
that says "Score:"); the parser must give back exactly the scores written.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import CritiqueUnparseable
from service.protocol import TEXT_FAITHFULNESS
from workers.critics.parser import critique_regex, parse_critique
from workers.critics.templates import Template, load_templates

TEMPLATES = load_templates()
WORDS = [
    "the", "image", "shows", "a", "red", "fox", "lighting", "is", "good", "but", "minor", "flaws",
    "Score:", "score:", "Score: 1", "Score: 2.5/4", "4.0", "N/A", "(see", "above)", "—", "*emphasis*",
    "Text", "Faithfulness", "Quality", "request", "3.", "#1", "score", "Score:**",
]  # fmt: skip

SCORE_STYLES = ["{v}", "**{v}**", "{v}/4", "{v} / 4.0", "  {v}  ", "{v} (minor issues)", "[{v}]", "{v}."]
NA_STYLES = ["N/A", "n/a", "**N/A**", "N/A (no text was requested)", "N/A."]
DIMENSION_HEADERS = [
    "{n}. {label}:",
    "{n}.{label}:",
    "### {n}. {label}",
    "**{n}. {label}:**",
    "{n}) {label}:",
]
SCORE_HEADERS = ["## Score:", "##Score:", "### Score:", "## **Score:**"]
JUSTIFICATION_HEADERS = ["## Justification:", "##Justification:", "**Justification:**"]


@st.composite
def running_text(draw: st.DrawFn) -> str:
    """Justification-like text: it may say "Score:" anywhere, even at the start of a line."""
    lines = draw(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), min_size=1, max_size=4))
    return "\n".join(" ".join(words) for words in lines)


@st.composite
def answers(draw: st.DrawFn) -> tuple[Template, str, dict[str, float | None], str | None]:
    template = TEMPLATES[draw(st.sampled_from(sorted(TEMPLATES)))]
    written: dict[str, float | None] = {}
    lines: list[str] = []
    if draw(st.booleans()):
        lines += ["<think>", "1. Text Faithfulness:", "## Score: 1.0", draw(running_text()), "</think>"]
    lines += ["# User Request Analysis", draw(running_text()), "# Detailed Judgement"]
    blank = "\n" if draw(st.booleans()) else ""
    for number, (key, label) in enumerate(template.dimensions, start=1):
        not_applicable = key != TEXT_FAITHFULNESS and draw(st.booleans())
        if not_applicable:
            written[key] = None
            score_text = draw(st.sampled_from(NA_STYLES))
        else:
            value = draw(st.integers(100, 400)) / 100
            written[key] = value
            score_text = draw(st.sampled_from(SCORE_STYLES)).format(v=f"{value:.2f}")
        score_block = f"{draw(st.sampled_from(SCORE_HEADERS))} {score_text}"
        justification = f"{draw(st.sampled_from(JUSTIFICATION_HEADERS))} {draw(running_text())}"
        header = draw(st.sampled_from(DIMENSION_HEADERS)).format(n=number, label=label)
        body = [score_block, justification] if draw(st.booleans()) else [justification, score_block]
        lines += [blank + header, *body]
    lines += [f"# Summary: {draw(running_text())}", "", "# User Request Refinement:"]
    lines.append(f"## Refinement Comments: {draw(running_text())}")
    refined = draw(st.none() | st.text(st.sampled_from("abcdefgh ,"), min_size=1).map(str.strip).filter(bool))
    if refined is not None:
        lines.append(f"## Refined Request: {refined}")
    return template, "\n".join(lines), written, refined


@given(answers())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_recovers_the_written_scores(case: tuple[Template, str, dict[str, float | None], str | None]) -> None:
    template, raw, written, refined = case
    critique = parse_critique(raw, template.dimensions)
    assert {key: entry.score for key, entry in critique.dimensions.items()} == written
    assert not any(entry.clamped for entry in critique.dimensions.values())
    present = [v for v in written.values() if v is not None]
    assert critique.overall == pytest.approx((sum(present) / len(present) - 1) / 3)
    assert 0.0 <= critique.overall <= 1.0
    assert critique.refined_request == refined


FRAGMENTS = [
    "# Detailed Judgement", "1. Text Faithfulness:", "2. Physical and Visual Quality:",
    "2. Image Faithfulness:", "3. Text Rendering:", "## Score: 3.5", "## Score: N/A", "## Score: 9",
    "## Score: -2", "## Score:",
    "## Justification: x", "# Summary: s", "## Refined Request: r", "<think>", "</think>", "Score: 2", "",
    "**Score:** 1e9", "## Score: 4/0", "## Score: nan", "## Score: 99999999999999999999999",
]  # fmt: skip


@given(st.one_of(st.text(), st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8)).map("\n".join)))
@settings(max_examples=500)
def test_arbitrary_text_parses_or_is_unparseable(raw: str) -> None:
    for template in TEMPLATES.values():
        try:
            critique = parse_critique(raw, template.dimensions)
        except CritiqueUnparseable as exc:
            assert exc.missing
            assert exc.raw == raw
            continue
        assert 0.0 <= critique.overall <= 1.0
        assert critique.score(TEXT_FAITHFULNESS) is not None
        for entry in critique.dimensions.values():
            assert entry.score is None or 1.0 <= entry.score <= 4.0


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@given(data=st.data())
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
def test_every_answer_the_regex_admits_parses(name: str, data: st.DataObject) -> None:
    template = TEMPLATES[name]
    regex = critique_regex(template.dimensions, score_first=template.score_first)
    raw = data.draw(st.from_regex(re.compile(regex), fullmatch=True))
    critique = parse_critique(raw, template.dimensions)
    assert critique.score(TEXT_FAITHFULNESS) is not None
    assert 0.0 <= critique.overall <= 1.0
