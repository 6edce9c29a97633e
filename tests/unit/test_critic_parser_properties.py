"""Properties of the critic parser over generated answers.

Well-formed answers are generated in every style the parser claims to read (orders,
header variants, bold and `/4` scores, remarks, N/A, a reasoning block, running text
that says "Score:" or a dimension's name); the parser must give back exactly the
scores written, and must refuse an answer that lacks a required dimension.

Every test runs derandomized, so CI sees the same examples on every run; each failure
ever found is kept as an explicit `@example`, so it is checked even if generation changes.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gcr.types import TEXT_FAITHFULNESS
from service.critic.parser import NOT_APPLICABLE_ALLOWED, critique_regex, parse_critique
from service.critic.templates import Template, load_templates
from service.errors import CritiqueUnparseable

TEMPLATES = load_templates()
WORDS = [
    "the", "image", "shows", "a", "red", "fox", "lighting", "is", "good", "but", "minor", "flaws",
    "Score:", "score:", "Score: 1", "Score: 2.5/4", "4.0", "N/A", "(see", "above)", "—", "*emphasis*",
    "Text", "Faithfulness", "Quality", "request", "3.", "#1", "score", "Score:**",
    "Text Faithfulness", "image Faithfulness", "Physical and Visual Quality", "Text Rendering",
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


Answer = tuple[Template, str, dict[str, float | None], str | None]
"""(template, raw answer, the scores written (None: N/A or left out), the refined request)."""

# How an answer can lack a required dimension's score.
LACKS = ["block", "score line", "N/A", "unreadable"]


@st.composite
def answers(draw: st.DrawFn, lacking: bool = False) -> Answer:
    """A well-formed answer; with `lacking`, one required dimension has no numeric score."""
    template = TEMPLATES[draw(st.sampled_from(sorted(TEMPLATES)))]
    required = [key for key, _ in template.dimensions if key not in NOT_APPLICABLE_ALLOWED]
    gone, how = (draw(st.sampled_from(required)), draw(st.sampled_from(LACKS))) if lacking else (None, None)
    written: dict[str, float | None] = {}
    lines: list[str] = []
    if draw(st.booleans()):
        lines += ["<think>", "1. Text Faithfulness:", "## Score: 1.0", draw(running_text()), "</think>"]
    lines += ["# User Request Analysis", draw(running_text()), "# Detailed Judgement"]
    blank = "\n" if draw(st.booleans()) else ""
    for number, (key, label) in enumerate(template.dimensions, start=1):
        if key == gone and how == "block":
            written[key] = None
            continue
        if (key in NOT_APPLICABLE_ALLOWED and draw(st.booleans())) or (key == gone and how == "N/A"):
            written[key] = None
            score_text = draw(st.sampled_from(NA_STYLES))
        elif key == gone and how == "unreadable":
            written[key] = None
            score_text = draw(st.sampled_from(["[ float score ]", "good", "?", ""]))
        else:
            value = draw(st.integers(100, 400)) / 100
            written[key] = value
            score_text = draw(st.sampled_from(SCORE_STYLES)).format(v=f"{value:.2f}")
        score_block = f"{draw(st.sampled_from(SCORE_HEADERS))} {score_text}"
        justification = f"{draw(st.sampled_from(JUSTIFICATION_HEADERS))} {draw(running_text())}"
        header = draw(st.sampled_from(DIMENSION_HEADERS)).format(n=number, label=label)
        body = [score_block, justification] if draw(st.booleans()) else [justification, score_block]
        if key == gone and how == "score line":
            written[key], body = None, [justification]
        lines += [blank + header, *body]
    lines += [f"# Summary: {draw(running_text())}", "", "# User Request Refinement:"]
    lines.append(f"## Refinement Comments: {draw(running_text())}")
    refined = draw(st.none() | st.text(st.sampled_from("abcdefgh ,"), min_size=1).map(str.strip).filter(bool))
    if refined is not None:
        lines.append(f"## Refined Request: {refined}")
    return template, "\n".join(lines), written, refined


# Failures found by random runs before the parser required headers to look like headers:
# a justification line that is only a dimension's name opened a block, so the score
# under it went to that dimension.
FOUND_NAME_IN_TEXT_RENDERING = (
    TEMPLATES["t2i"],
    "# User Request Analysis\nthe\n# Detailed Judgement\n1. Text Faithfulness:\n## Justification: the\n"
    "## Score: 1.00\n2. Physical and Visual Quality:\n## Justification: the\n## Score: 2.00\n"
    "3. Text Rendering:\n## Justification: the\nimage Faithfulness\n## Score: 1.00\n# Summary: the\n\n"
    "# User Request Refinement:\n## Refinement Comments: the",
    {"text_faithfulness": 1.0, "physical_quality": 2.0, "text_rendering": 1.0},
    None,
)
FOUND_NAME_IN_TEXT_FAITHFULNESS = (
    TEMPLATES["edit"],
    "# User Request Analysis\nshows image\n# Detailed Judgement\n\n1) Text Faithfulness:\n"
    "##Justification: score: fox Text good lighting Score:** shows above) but Score: 1 *emphasis*\n"
    "fox red image above) Text\nabove) is N/A\nimage Faithfulness\n## Score: 3.00 / 4.0\n\n"
    "2.Image Faithfulness:\n## **Score:** 2.50\n##Justification: Score: 2.5/4 above) request\n\n"
    "3.Physical and Visual Quality:\n### Score: **3.62**\n##Justification: fox\n\n"
    "**4. Text Rendering:**\n## **Score:** 1.40/4\n**Justification:** red red\n"
    "# Summary: score Text good\n\n# User Request Refinement:\n## Refinement Comments: image request",
    {"text_faithfulness": 3.0, "image_faithfulness": 2.5, "physical_quality": 3.62, "text_rendering": 1.4},
    None,
)
FOUND_NAME_IN_PHYSICAL_QUALITY = (
    TEMPLATES["t2i"],
    "# Detailed Judgement\n1. Text Faithfulness:\n## Score: 3.00\n## Justification: fine\n"
    "2. Physical and Visual Quality:\n## Justification: the\nText Faithfulness\n## Score: 2.00\n"
    "3. Text Rendering:\n## Score: N/A\n## Justification: no text\n# Summary: s\n"
    "# User Request Refinement:\n## Refinement Comments: c\n## Refined Request: r",
    {"text_faithfulness": 3.0, "physical_quality": 2.0, "text_rendering": None},
    "r",
)


@given(answers())
@example(FOUND_NAME_IN_TEXT_RENDERING)
@example(FOUND_NAME_IN_TEXT_FAITHFULNESS)
@example(FOUND_NAME_IN_PHYSICAL_QUALITY)
@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_recovers_the_written_scores(case: Answer) -> None:
    template, raw, written, refined = case
    critique = parse_critique(raw, template.dimensions)
    assert {key: entry.score for key, entry in critique.dimensions.items()} == written
    assert not any(entry.clamped for entry in critique.dimensions.values())
    present = [v for v in written.values() if v is not None]
    assert critique.overall == pytest.approx((sum(present) / len(present) - 1) / 3)
    assert 0.0 <= critique.overall <= 1.0
    assert critique.refined_request == refined


@given(answers(lacking=True))
@settings(max_examples=200, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_an_answer_lacking_a_required_dimension_is_unparseable(case: Answer) -> None:
    template, raw, written, _ = case
    with pytest.raises(CritiqueUnparseable) as info:
        parse_critique(raw, template.dimensions)
    gone = {key for key, value in written.items() if value is None and key not in NOT_APPLICABLE_ALLOWED}
    assert set(info.value.missing) == {f"score: {key}" for key in gone}
    assert all(key in info.value.message for key in gone)
    assert info.value.raw == raw


FRAGMENTS = [
    "# Detailed Judgement", "1. Text Faithfulness:", "2. Physical and Visual Quality:",
    "2. Image Faithfulness:", "3. Text Rendering:", "## Score: 3.5", "## Score: N/A", "## Score: 9",
    "## Score: -2", "## Score:",
    "## Justification: x", "# Summary: s", "## Refined Request: r", "<think>", "</think>", "Score: 2", "",
    "**Score:** 1e9", "## Score: 4/0", "## Score: nan", "## Score: 99999999999999999999999",
]  # fmt: skip


@given(st.one_of(st.text(), st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8)).map("\n".join)))
@settings(max_examples=500, derandomize=True)
def test_arbitrary_text_parses_or_is_unparseable(raw: str) -> None:
    for template in TEMPLATES.values():
        try:
            critique = parse_critique(raw, template.dimensions)
        except CritiqueUnparseable as exc:
            assert exc.missing
            assert exc.raw == raw
            continue
        assert 0.0 <= critique.overall <= 1.0
        for key, _ in template.dimensions:
            assert key in NOT_APPLICABLE_ALLOWED or critique.score(key) is not None
        for entry in critique.dimensions.values():
            assert entry.score is None or 1.0 <= entry.score <= 4.0


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@given(data=st.data())
@settings(max_examples=40, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_every_answer_the_regex_admits_parses(name: str, data: st.DataObject) -> None:
    template = TEMPLATES[name]
    regex = critique_regex(template.dimensions, max_tokens=1024, score_first=template.score_first)
    raw = data.draw(st.from_regex(re.compile(regex), fullmatch=True))
    critique = parse_critique(raw, template.dimensions)
    assert critique.score(TEXT_FAITHFULNESS) is not None
    assert 0.0 <= critique.overall <= 1.0


SCORE_REGEX = r"([1-3](\.[0-9]{1,2})?|4(\.00?)?)"


def _longest_answer(regex: str) -> str:
    """The longest text `regex` admits: every bounded run at its bound, scores at 4 characters
    ("3.25"), optional pieces taken. Built from the regex's own text, not from the code that wrote it."""
    text = regex.replace(f"({SCORE_REGEX}|N/A)", "3.25").replace(SCORE_REGEX, "3.25")
    text = re.sub(r"\[[^\]]*\]\[[^\]]*\]\{0,(\d+)\}", lambda m: "r" * (int(m[1]) + 1), text)
    text = re.sub(r"\[[^\]]*\]\{0,(\d+)\}", lambda m: "x" * int(m[1]), text)
    text = text.replace("\\n?", "\n").replace("\\n", "\n")
    return re.sub(r"\\(.)", r"\1", text)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("max_tokens", [600, 1024, 2048, 20480])
def test_no_answer_the_regex_admits_is_longer_than_max_tokens(name: str, max_tokens: int) -> None:
    """Every free section is ASCII (a byte a character, and a byte-level BPE token holds at
    least one byte) and bounded: the longest admitted answer, in bytes, bounds its tokens."""
    template = TEMPLATES[name]
    regex = critique_regex(template.dimensions, max_tokens=max_tokens, score_first=template.score_first)
    longest = _longest_answer(regex)
    assert re.fullmatch(regex, longest), "the longest answer is one the regex admits"
    assert not re.fullmatch(regex, longest.replace("x", "xx", 1)), "and its free text cannot grow"
    assert max_tokens * 0.8 < len(longest.encode()) <= max_tokens
    parse_critique(longest, template.dimensions)


@pytest.mark.parametrize("text", ["</think>", "<|im_end|>", "#", "é", "\n\n"])
def test_the_regex_admits_no_tag_header_or_non_ascii_in_free_text(text: str) -> None:
    template = TEMPLATES["t2i"]
    regex = critique_regex(template.dimensions, max_tokens=1024)
    answer = _longest_answer(regex).replace("xxxx", "x" + text, 1)
    assert re.fullmatch(regex, answer) is None


def test_a_max_tokens_too_small_for_the_skeleton_is_refused() -> None:
    with pytest.raises(ValueError, match="too small for a constrained critique"):
        critique_regex(TEMPLATES["edit"].dimensions, max_tokens=400)
