"""The critic answer parser against a corpus of hand-written answers.

Each `critic_corpus/<case>.txt` is an answer as a model could write it; the
`<case>.json` beside it says what the parser must make of it: the scores (null for
N/A or missing), the overall, the refined request (or null), or the error and what
it must say is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gcr.types import TEXT_FAITHFULNESS
from service.critic.parser import critique_regex, parse_critique
from service.critic.templates import load_templates
from service.errors import CritiqueUnparseable

CORPUS = Path(__file__).parent / "critic_corpus"
CASES = sorted(path.stem for path in CORPUS.glob("*.txt"))
TEMPLATES = load_templates()


def _expected(case: str) -> dict[str, Any]:
    expected: dict[str, Any] = json.loads((CORPUS / f"{case}.json").read_text(encoding="utf-8"))
    return expected


def test_corpus_is_complete() -> None:
    assert len(CASES) >= 20
    assert sorted(path.stem for path in CORPUS.glob("*.json")) == CASES
    unparseable = [case for case in CASES if "error" in _expected(case)]
    assert len(unparseable) >= 3
    assert {_expected(case)["template"] for case in CASES} == {"t2i", "edit", "edit_tuning"}


@pytest.mark.parametrize("case", CASES)
def test_corpus_answer(case: str) -> None:
    raw = (CORPUS / f"{case}.txt").read_text(encoding="utf-8")
    expected = _expected(case)
    dimensions = TEMPLATES[expected["template"]].dimensions

    if "error" in expected:
        with pytest.raises(CritiqueUnparseable) as info:
            parse_critique(raw, dimensions)
        assert info.value.code == expected["error"]
        assert sorted(info.value.missing) == sorted(expected["missing"])
        assert info.value.raw == raw
        assert expected.get("message_contains", "") in info.value.message
        return

    critique = parse_critique(raw, dimensions, model="m", latency_ms=12.5, usage={"total_tokens": 7})
    assert set(critique.dimensions) == {key for key, _ in dimensions}
    got = {key: entry.score for key, entry in critique.dimensions.items()}
    assert got == pytest.approx(expected["scores"])
    clamped = {key for key, entry in critique.dimensions.items() if entry.clamped}
    assert clamped == set(expected.get("clamped", []))
    # The expected overall is written by hand; check it against the paper's formula too.
    present = [s for s in expected["scores"].values() if s is not None]
    assert expected["overall"] == pytest.approx((sum(present) / len(present) - 1) / 3)
    assert critique.overall == pytest.approx(expected["overall"])
    assert critique.refined_request == expected["refined_request"]
    assert expected.get("analysis_contains", "") in critique.analysis
    assert expected.get("summary_contains", "") in critique.summary
    assert expected.get("comments_contains", "") in critique.refinement_comments
    for key, fragment in expected.get("justification_contains", {}).items():
        assert fragment in critique.dimensions[key].justification
    assert (critique.raw, critique.model, critique.latency_ms, critique.usage) == (
        raw,
        "m",
        12.5,
        {"total_tokens": 7},
    )


def test_justifications_do_not_leak_into_neighbours() -> None:
    raw = (CORPUS / "t2i_standard.txt").read_text(encoding="utf-8")
    critique = parse_critique(raw, TEMPLATES["t2i"].dimensions)
    assert "Anatomy" not in critique.dimensions[TEXT_FAITHFULNESS].justification
    assert "Score" not in critique.dimensions[TEXT_FAITHFULNESS].justification
    assert critique.summary.startswith("A faithful")
    assert "Refined" not in critique.refinement_comments


def test_undeclared_dimension_does_not_steal_a_score() -> None:
    # Without the image-faithfulness block delimiting, its 1.0 would land in the t2i
    # text-faithfulness block; the t2i template must ignore it entirely.
    raw = (CORPUS / "t2i_undeclared_dimension.txt").read_text(encoding="utf-8")
    critique = parse_critique(raw, TEMPLATES["t2i"].dimensions)
    assert "image_faithfulness" not in critique.dimensions
    assert critique.score(TEXT_FAITHFULNESS) == 3.7


def test_analysis_numbered_list_is_not_a_dimension() -> None:
    raw = (
        "# User Request Analysis\nThings to check:\n1. Text Rendering: the sign must say HELLO\n"
        "# Detailed Judgement\n1. Text Faithfulness:\n## Justification: ok\n## Score: 3\n"
        "2. Physical and Visual Quality:\n## Justification: ok\n## Score: 4\n"
        "3. Text Rendering:\n## Justification: HELO\n## Score: 2\n# Summary: fine\n"
    )
    critique = parse_critique(raw, TEMPLATES["t2i"].dimensions)
    assert critique.score("text_rendering") == 2.0
    assert "sign must say HELLO" in critique.analysis


def test_other_scale_is_rescaled_and_comma_decimal_read() -> None:
    raw = (
        "# Detailed Judgement\n1. Text Faithfulness:\n## Score: 8/10\n## Justification: x\n"
        "2. Physical and Visual Quality:\n## Score: 3,5\n## Justification: y\n"
    )
    critique = parse_critique(raw, TEMPLATES["t2i"].dimensions)
    assert critique.score(TEXT_FAITHFULNESS) == pytest.approx(3.2)
    assert critique.score("physical_quality") == pytest.approx(3.5)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_regex_admits_the_training_format_a_line_per_section(name: str) -> None:
    import re

    template = TEMPLATES[name]
    regex = critique_regex(template.dimensions, max_tokens=2048, score_first=template.score_first)
    lines = ["# User Request Analysis", "A request.", "# Detailed Judgement"]
    for number, (key, label) in enumerate(template.dimensions, start=1):
        score = "## Score: N/A" if key == "text_rendering" else "## Score: 3.25"
        justification = "## Justification: Fine, but Score: is discussed."
        lines += [
            f"{number}. {label}:",
            *([score, justification] if template.score_first else [justification, score]),
        ]
    lines += [
        "# Summary: ok",
        "# User Request Refinement:",
        "## Refinement Comments: c",
        "## Refined Request: r",
    ]
    answer = "\n".join(lines)
    assert re.fullmatch(regex, answer)
    assert re.fullmatch(regex, answer.replace("## Score: 3.25", "## Score: 0")) is None
    assert parse_critique(answer, template.dimensions).overall == pytest.approx(2.25 / 3)


def _t2i_answer(text_rendering_justification: str, physical_quality_score: str = "3") -> str:
    return (
        "# User Request Analysis\nA sign.\n# Detailed Judgement\n1. Text Faithfulness:\n## Justification: ok\n"
        f"## Score: 3.5\n2. Physical and Visual Quality:\n## Justification: ok\n## Score: {physical_quality_score}\n"
        f"3. Text Rendering:\n## Justification: {text_rendering_justification}\n## Score: 2\n# Summary: s\n"
    )


@pytest.mark.parametrize(
    "line", ["image Faithfulness", "Text Faithfulness:", "2. Image Faithfulness", "Physical and Visual Quality"]
)
def test_a_dimension_name_in_running_text_is_not_a_header(line: str) -> None:
    # Found by the property test: the score under such a line went to the named dimension.
    raw = _t2i_answer(f"the letters are fine\n{line}\nis not what is judged here")
    critique = parse_critique(raw, TEMPLATES["t2i"].dimensions)
    assert critique.score("text_rendering") == 2.0
    assert critique.score(TEXT_FAITHFULNESS) == 3.5 and critique.score("physical_quality") == 3.0
    assert line in critique.dimensions["text_rendering"].justification


@pytest.mark.parametrize(
    "header",
    ["3. Text Rendering:", "3) Text Rendering:", "### Text Rendering", "**3. Text Rendering**", "**Text Rendering:**"],
)
def test_headers_in_the_format_still_open_a_block(header: str) -> None:
    critique = parse_critique(_t2i_answer("x").replace("3. Text Rendering:", header), TEMPLATES["t2i"].dimensions)
    assert critique.score("text_rendering") == 2.0


@pytest.mark.parametrize(
    ("template", "raw", "gone", "why"),
    [
        ("t2i", _t2i_answer("x", physical_quality_score="N/A"), "physical_quality", "N/A"),
        (
            "t2i",
            _t2i_answer("x", physical_quality_score="[ float score ]"),
            "physical_quality",
            "missing or unreadable",
        ),
        ("edit", _t2i_answer("x"), "image_faithfulness", "missing or unreadable"),
    ],
)
def test_an_answer_lacking_a_required_dimension_is_incomplete(template: str, raw: str, gone: str, why: str) -> None:
    # An overall averaged over the other dimensions would measure something else.
    with pytest.raises(CritiqueUnparseable) as info:
        parse_critique(raw, TEMPLATES[template].dimensions)
    assert info.value.missing == [f"score: {gone}"]
    assert f"{gone} ({why})" in info.value.message and "incomplete" in info.value.message


@pytest.mark.parametrize(
    ("written", "request_"),
    [
        ('"a red apple on a table"<|im_end|>', "a red apple on a table"),
        ("```\na red apple\n```", "a red apple"),
        ('**"a cat on a mat"**', "a cat on a mat"),
        ("“a cat on a mat”<|endoftext|>", "a cat on a mat"),
        ("<|im_start|>assistant a cat", "a cat"),
        ("<think>\n</think>\na cat", "a cat"),
        ("`a cat`", "a cat"),
        ("'a cat'", "a cat"),
        ('a "quoted" word stays', 'a "quoted" word stays'),
        ("'Hello' on a board, 'Bye' below", "'Hello' on a board, 'Bye' below"),
        ('"OPEN" on the door, "CLOSED" inside', '"OPEN" on the door, "CLOSED" inside'),
        ("a  double  space stays", "a  double  space stays"),
        ("<|im_end|>", None),
    ],
)
def test_a_refined_request_is_cleaned_of_what_wraps_it(written: str, request_: str | None) -> None:
    raw = _t2i_answer("no text") + f"# User Request Refinement:\n## Refined Request: {written}"
    assert parse_critique(raw, TEMPLATES["t2i"].dimensions).refined_request == request_


def test_drafts_in_the_reasoning_are_never_read_as_the_answer() -> None:
    # A thinking model whose template opened `<think>` itself: the output starts inside the
    # reasoning, drafts the format there, and answers after `</think>` with no format at all.
    raw = "Let me draft the judgement first.\n" + _t2i_answer("none") + "</think>\nI cannot judge this image."
    with pytest.raises(CritiqueUnparseable):
        parse_critique(raw, TEMPLATES["t2i"].dimensions)


def test_many_think_tags_are_read_in_linear_time() -> None:
    raw = _t2i_answer("none") + "</think>\n" * 4000
    start = time.perf_counter()
    assert parse_critique(raw, TEMPLATES["t2i"].dimensions).score("text_rendering") == 2.0
    assert time.perf_counter() - start < 1.0  # quadratic: ~2.5 s here
