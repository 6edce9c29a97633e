"""Read a RationalRewards answer into a `Critique`, or say exactly what is missing.

The answer format (shared/reference/rationalrewards)::

    # User Request Analysis
    ...
    # Detailed Judgement
    1. Text Faithfulness:
    ## Justification: ...
    ## Score: 3.5
    ...
    # Summary: ...
    # User Request Refinement:
    ## Refinement Comments: ...
    ## Refined Request: ...

The parser is line based and tolerant of what models actually write: `## Score:`
before or after `## Justification:`, bold or `3.5/4` scores, trailing remarks,
`N/A`, multi-line fields, missing blank lines, header variants (`1.Text
Faithfulness:`, `### 2. Physical and Visual Quality`, `**3. Text Rendering**`),
a leading `<think>...</think>` block. Only a header line (`## Score:` or a bold
`**Score:**` opening a line) gives a score; "Score:" in running text never does.
A score belongs to the dimension block it stands in: blocks run from one
dimension header to the next, so the order of fields inside a block is free.

A dimension header looks like one in the format: numbered with a colon (`2.
Image Faithfulness:`, `2) ...:`), or marked up (`### Image Faithfulness`, `**2.
Image Faithfulness**`, a line that is only `**Image Faithfulness:**`). A line of
running text that merely says a dimension's name (`image Faithfulness`) is text
of the block it stands in, never a new block.

What makes an answer unparseable (`CritiqueUnparseable`, never a score of 0):
- no declared dimension with a numeric score (truncated, all N/A, refusal);
- no numeric score for a required dimension (missing, unreadable or N/A): every
  declared one but text rendering, the only one the format lets be N/A
  (t2i: text faithfulness, physical and visual quality; edit adds image
  faithfulness). Without one the overall would measure something else, so the
  answer is incomplete rather than averaged over what is left.
Text rendering, missing or unreadable, gets `score=None` exactly like N/A. A
missing refined request gives `refined_request=None` (the loop then stops with
`no_refinement`). Dimensions the template does not declare are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from gcr.types import (
    IMAGE_FAITHFULNESS,
    PHYSICAL_QUALITY,
    SCORE_MAX,
    TEXT_FAITHFULNESS,
    TEXT_RENDERING,
    Critique,
    DimensionScore,
    clamp_score,
    overall_score,
)
from service.errors import CritiqueUnparseable

Dimensions = Sequence[tuple[str, str]]
"""(key, header label) pairs, in the order the template asks for them."""

NOT_APPLICABLE_ALLOWED = frozenset({TEXT_RENDERING})
"""The dimensions the format lets be N/A; every other declared one is required."""

# Labels of the standard dimensions and the variants models write. A template's
# own labels are added at parse time; undeclared ones still delimit blocks, so an
# extra dimension's score is never taken for the previous one's.
_STANDARD_LABELS: dict[str, tuple[str, ...]] = {
    TEXT_FAITHFULNESS: ("text faithfulness",),
    IMAGE_FAITHFULNESS: ("image faithfulness",),
    PHYSICAL_QUALITY: ("physical and visual quality", "physical visual quality", "visual quality"),
    TEXT_RENDERING: ("text rendering",),
}

_SECTIONS = {
    "user request analysis": "analysis",
    "detailed judgement": "judgement",
    "detailed judgment": "judgement",
    "summary": "summary",
    "user request refinement": "refinement",
}
_FIELDS = {
    "score": "score",
    "justification": "justification",
    "refinement comments": "comments",
    "refined request": "refined",
}

_BOLD = r"(?:\*\*|__)"
# A closing `**` is markup only when one was opened before the title; otherwise it
# belongs to the text after the colon (`## Justification: **The cat** is ...`).
_CLOSE = rf"(?(b1){_BOLD}?|(?(b2){_BOLD}?))"
# `#`s, optional bold, optional number, the title; `rest` is what follows the colon.
_HEADER = re.compile(
    rf"^\s*(?P<hashes>#{{1,6}})?\s*(?P<b1>{_BOLD})?\s*"
    rf"(?:(?P<num>\d{{1,2}})\s*[.):]\s*(?P<b2>{_BOLD})?\s*)?"
    rf"(?P<title>[A-Za-z][A-Za-z &/-]*)(?:\([^)]*\))?\s*{_CLOSE}\s*(?P<colon>:)?\s*{_CLOSE}"
    r"\s*(?P<rest>.*)$"
)
_NOT_APPLICABLE = re.compile(r"^(?:n\s*/\s*a|na|not\s+applicable|none)\b", re.IGNORECASE)
_NUMBER = re.compile(r"^([+-]?\d+(?:[.,]\d+)?|[+-]?\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?))?")
_FENCE = re.compile(r"^\s*```\w*\s*$")


def _norm(title: str) -> str:
    return " ".join(re.sub(r"[^a-z]+", " ", title.lower().replace("&", " and ")).split())


@dataclass
class _Header:
    kind: str  # "section" | "field" | "dimension"
    name: str
    rest: str
    hashed: bool = False


@dataclass
class _ScoreLine:
    text: str
    hashed: bool
    """A `## Score:` header; a bold `**Score:**` one only counts when no hashed one does."""


@dataclass
class _Block:
    """One dimension's lines: free text, justification, score line(s)."""

    key: str
    loose: list[str] = field(default_factory=list)
    justification: list[str] = field(default_factory=list)
    scores: list[_ScoreLine] = field(default_factory=list)
    score_extra: list[str] = field(default_factory=list)
    current: str = "loose"


@dataclass
class _Reading:
    analysis: list[str] = field(default_factory=list)
    preamble: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    refined: list[str] | None = None
    blocks: list[_Block] = field(default_factory=list)


def strip_thinking(raw: str, labels: dict[str, str]) -> str:
    """The answer without a reasoning block; '' when the model never stopped thinking.

    The block ends at the last `</think>` that an answer follows (a section or dimension
    header after it): drafts of the format inside the reasoning are dropped with it, and a
    stray `</think>` a model wrote into its answer's text (seen from a random-weight Qwen3-VL)
    does not cut the answer off. Without such a header, the text is an answer only if it opens
    with one (its `</think>` was stray); else the block ends at the last `</think>`, and the
    drafts before it are never read as the answer."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    ends = [m.end() for m in re.finditer("</think>", text)]
    # From the last `</think>` back, each looks only as far as the next one: the text after
    # that was looked at already (linear in the answer, however many a model writes).
    until = len(text)
    for end in reversed(ends):
        if any(_opens_answer(line, labels) for line in text[end:until].split("\n")):
            return text[end:]
        until = end - len("</think>")
    first_line = text.lstrip().split("\n", 1)[0]
    if ends and not _opens_answer(first_line, labels):
        return text[ends[-1] :]
    if text.lstrip().startswith("<think>"):
        return ""
    return text


def _opens_answer(line: str, labels: dict[str, str]) -> bool:
    header = _classify(line, labels)
    return header is not None and header.kind in ("section", "dimension")


def parse_critique(
    raw: str,
    dimensions: Dimensions,
    *,
    model: str = "",
    latency_ms: float = 0.0,
    usage: dict[str, int] | None = None,
) -> Critique:
    """Parse a critic answer for a template declaring `dimensions` (see module docstring)."""
    labels = _label_index(dimensions)
    reading = _read(strip_thinking(raw, labels), labels)
    declared = [key for key, _ in dimensions]
    scores: dict[str, DimensionScore] = {}
    missing: list[str] = []
    for key in declared:
        entry, found = _dimension_score(reading.blocks, key)
        scores[key] = entry
        if not found:
            missing.append(f"score: {key}")
    numeric = [scores[key].score for key in declared if scores[key].score is not None]
    if not reading.blocks:
        raise CritiqueUnparseable(
            "critic answer has no dimension judgement (a refusal, cut off, or off-format)",
            missing=[f"score: {key}" for key in declared],
            raw=raw,
        )
    if not numeric:
        gone = [f"score: {key}" for key in declared]
        raise CritiqueUnparseable(
            "critic answer has no numeric dimension score (every dimension N/A, missing or unreadable; "
            f"missing: {', '.join(missing) or 'none'})",
            missing=gone,
            raw=raw,
        )
    lacking = [key for key in declared if key not in NOT_APPLICABLE_ALLOWED and scores[key].score is None]
    if lacking:
        what = ", ".join(
            f"{key} ({'missing or unreadable' if f'score: {key}' in missing else 'N/A'})" for key in lacking
        )
        raise CritiqueUnparseable(
            f"critic answer is incomplete: no score for required dimension(s) {what}",
            missing=[f"score: {key}" for key in lacking],
            raw=raw,
        )
    return Critique(
        dimensions=scores,
        overall=overall_score([entry.score for entry in scores.values()]),
        analysis=_join(reading.analysis or reading.preamble),
        summary=_join(reading.summary),
        refinement_comments=_join(reading.comments),
        refined_request=_clean_request(reading.refined),
        raw=raw,
        model=model,
        latency_ms=latency_ms,
        usage=usage,
    )


def _label_index(dimensions: Dimensions) -> dict[str, str]:
    """Normalised header title -> dimension key (undeclared standard ones included)."""
    index = {_norm(label): key for key, labels in _STANDARD_LABELS.items() for label in labels}
    index.update({_norm(label): key for key, label in dimensions})
    return index


def _classify(line: str, labels: dict[str, str]) -> _Header | None:
    match = _HEADER.match(line)
    if match is None:
        return None
    title = _norm(match["title"])
    marked = bool(match["hashes"] or match["b1"] or match["b2"])
    rest = match["rest"].strip()
    hashed = bool(match["hashes"])
    if title in _SECTIONS and (marked or not rest):
        return _Header("section", _SECTIONS[title], rest, hashed)
    if title in _FIELDS and match["num"] is None:
        # Only a marked header gives a score; "Score:" at the start of running text does not.
        if marked or (title != "score" and match["colon"]):
            return _Header("field", _FIELDS[title], rest, hashed)
        return None
    if title in labels:
        bold = bool(match["b1"] or match["b2"])
        numbered = match["num"] is not None and bool(match["colon"] or bold)
        # A bare label is a dimension's name said in running text, and a bold label
        # followed by text is emphasis: neither opens a block.
        if hashed or numbered or (bold and not rest):
            return _Header("dimension", labels[title], rest, hashed)
    return None


def _read(text: str, labels: dict[str, str]) -> _Reading:
    lines = [line for line in text.split("\n") if not _FENCE.match(line)]
    has_judgement = any(
        (h := _classify(line, labels)) is not None and h.kind == "section" and h.name == "judgement" for line in lines
    )
    reading = _Reading()
    section = "preamble"
    block: _Block | None = None
    target: list[str] = reading.preamble
    for line in lines:
        header = _classify(line, labels)
        if header is not None and header.kind == "dimension":
            # Before the judgement section a numbered label is part of the analysis,
            # unless the answer has no judgement header at all.
            in_judgement = section == "judgement" or (not has_judgement and section in ("preamble", "analysis"))
            if not in_judgement:
                header = None
        if header is None:
            if block is not None:
                _block_line(block, line)
            else:
                target.append(line)
            continue
        if header.kind == "section":
            section, block = header.name, None
            target = {
                "analysis": reading.analysis,
                "judgement": [],
                "summary": reading.summary,
                "refinement": reading.comments,
            }[header.name]
            if header.rest:
                target.append(header.rest)
        elif header.kind == "dimension":
            section = "judgement"
            block = _Block(header.name)
            reading.blocks.append(block)
            if header.rest:
                block.loose.append(header.rest)
        elif block is not None and header.name in ("score", "justification"):
            block.current = header.name
            if header.name == "score":
                block.scores.append(_ScoreLine(header.rest, header.hashed))
            else:
                block.justification.append(header.rest)
        elif header.name in ("comments", "refined"):
            section, block = "refinement", None
            if header.name == "refined":
                reading.refined = [header.rest]
                target = reading.refined
            else:
                target = reading.comments
                target.append(header.rest)
        else:
            # A score or justification header outside any dimension block cannot be
            # attributed to a dimension; keep it as text of the current section.
            target.append(line)
    return reading


def _block_line(block: _Block, line: str) -> None:
    if block.current == "justification":
        block.justification.append(line)
    elif block.current == "score":
        last = block.scores[-1]
        if not last.text.strip() and line.strip():
            last.text = line  # "## Score:" with the value on the next line
            return
        block.score_extra.append(line)
    else:
        block.loose.append(line)


def _dimension_score(blocks: list[_Block], key: str) -> tuple[DimensionScore, bool]:
    """The dimension's entry and whether the answer gave a score (a number or N/A)."""
    candidates = [b for b in blocks if b.key == key]
    readings = [
        (line.hashed, block, parsed)
        for block in candidates
        for line in block.scores
        if (parsed := _parse_score(line.text)) is not None
    ]
    # The first hashed score wins; a bold one only when the block has no hashed one.
    readings.sort(key=lambda item: not item[0])
    if not readings:
        justification = _join(candidates[0].justification or candidates[0].loose) if candidates else ""
        return DimensionScore(score=None, justification=justification, clamped=False), False
    _, block, (value, remark) = readings[0]
    justification = _join(block.justification) or _join(block.loose + block.score_extra) or remark
    if value is None:
        return DimensionScore(score=None, justification=justification, clamped=False), True
    clamped = clamp_score(value)
    return DimensionScore(score=clamped, justification=justification, clamped=clamped != value), True


def _parse_score(text: str) -> tuple[float | None, str] | None:
    """(value or None for N/A, trailing remark), or None when no score can be read."""
    cleaned = re.sub(r"[*_`\[\]]", "", text).strip()
    na = _NOT_APPLICABLE.match(cleaned)
    if na:
        return None, cleaned[na.end() :].strip(" :-()—")
    number = _NUMBER.match(cleaned)
    if number is None:
        return None
    value = float(number[1].replace(",", "."))
    if number[2] is not None and float(number[2]) > 0 and float(number[2]) != SCORE_MAX:
        # "7/10": the model used another scale; read it as a fraction of ours.
        value = value * SCORE_MAX / float(number[2])
    return value, cleaned[number.end() :].strip(" :-()—")


def _join(lines: list[str]) -> str:
    return "\n".join(lines).strip()


# Chat-template and reasoning tokens a model may write into its text (vLLM drops special
# tokens from the text it returns, but not every server does, and Qwen's <think> tags are
# ordinary added tokens): none of them is part of a request to a generator.
_TEMPLATE_TOKEN = re.compile(
    r"[ \t]*(?:<\|im_start\|>\s*(?:system|user|assistant)?|<\|[A-Za-z0-9_]+\|>|</?think>)[ \t]*"
)
_WRAPPERS = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("[", "]"), ("`", "`"))


def clean_request(text: str) -> str | None:
    """A refined request as a generator should read it: without the chat-template tokens, code
    fences, markup and quotes that a model wraps around it; None when nothing is left."""
    text = _TEMPLATE_TOKEN.sub(" ", text)
    lines = [line for line in text.split("\n") if not _FENCE.match(line)]
    text = "\n".join(lines).strip()
    while True:
        stripped = text.strip("*_ \n\t")
        for left, right in _WRAPPERS:
            if len(stripped) > len(left) + len(right) and stripped.startswith(left) and stripped.endswith(right):
                inner = stripped[len(left) : -len(right)]
                # One pair around the whole text: `'Hello' on a board, 'Bye'` is two quotes.
                if left not in inner:
                    stripped = inner
                    break
        stripped = stripped.strip()
        if stripped == text:
            break
        text = stripped
    return text or None


def _clean_request(lines: list[str] | None) -> str | None:
    return None if lines is None else clean_request(_join(lines))


# --- Constrained decoding ------------------------------------------------------------

# Free text of a constrained answer: printable ASCII without '#' (it cannot open a header)
# and '<' (no chat-template or reasoning token such as `</think>`, which a random-weight
# model wrote into its text on a live vLLM, and after which the parser reads on), one line
# per section. ASCII keeps a character at one byte, and a byte-level BPE token holds at
# least one byte, so a section of N characters costs at most N tokens: the bounds below
# then guarantee that the answer ends within `max_tokens`, however a model rambles (an
# unbounded section ran to max_tokens on a real vLLM, and the job failed).
_PROSE = r'[ -"$-;=-~]'
_PROSE_START = r'[!-"$-;=-~]'  # a refined request starts with a visible character
_SCORE = r"([1-3](\.[0-9]{1,2})?|4(\.00?)?)"
_SCORE_CHARS = 4  # "3.25"
_END_TOKENS = 8  # the end-of-sequence token, and slack
MIN_SECTION_CHARS = 16

# How the tokens left after the fixed text are shared among the free sections.
_SHARE_ANALYSIS = 0.15
_SHARE_JUSTIFICATIONS = 0.45  # split evenly among the dimensions
_SHARE_SUMMARY = 0.1
_SHARE_COMMENTS = 0.1
_SHARE_REFINED = 0.2


def _escape(text: str) -> str:
    # Not re.escape: it also escapes spaces, which some structured-output regex
    # engines do not accept; escape only the metacharacters.
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", text)


@dataclass(frozen=True)
class _Free:
    """A free-text section, given `share` of the tokens the fixed text leaves."""

    share: float
    start_visible: bool = False


@dataclass(frozen=True)
class _Pattern:
    """A piece that is regex already, at most `chars` long."""

    regex: str
    chars: int


def critique_regex(dimensions: Dimensions, *, max_tokens: int, score_first: bool = False) -> str:
    """A regex of a well-formed answer of at most `max_tokens` tokens, for vLLM
    `structured_outputs: {"regex": ...}` (the constrained re-ask).

    It follows the training format (justification then score, or the reverse for the
    tuning variant); only `NOT_APPLICABLE_ALLOWED` may be N/A. Every answer it admits
    parses, and none is longer than `max_tokens` tokens (both tested, and checked
    against a live vLLM with the xgrammar and the guidance backends). Only what xgrammar
    and guidance both compile is used: no look-around, no digit class, no flags.
    `ValueError` when `max_tokens` leaves fewer than `MIN_SECTION_CHARS` for a section.
    """
    parts: list[str | _Free | _Pattern] = [
        "# User Request Analysis\n",
        _Free(_SHARE_ANALYSIS),
        "\n# Detailed Judgement\n",
    ]
    share = _SHARE_JUSTIFICATIONS / len(dimensions)
    for number, (key, label) in enumerate(dimensions, start=1):
        score = _Pattern(rf"({_SCORE}|N/A)" if key in NOT_APPLICABLE_ALLOWED else _SCORE, _SCORE_CHARS)
        justification: list[str | _Free | _Pattern] = ["## Justification: ", _Free(share), "\n"]
        score_line: list[str | _Free | _Pattern] = ["## Score: ", score, "\n"]
        parts.append(f"{number}. {label}:\n")
        parts.extend([*score_line, *justification] if score_first else [*justification, *score_line])
    parts += ["# Summary: ", _Free(_SHARE_SUMMARY), "\n# User Request Refinement:\n"]
    parts += ["## Refinement Comments: ", _Free(_SHARE_COMMENTS), "\n"]
    parts += ["## Refined Request: ", _Free(_SHARE_REFINED, start_visible=True), _Pattern(r"\n?", 1)]
    fixed = sum(len(p.encode()) if isinstance(p, str) else p.chars for p in parts if not isinstance(p, _Free))
    budget = max_tokens - fixed - _END_TOKENS
    regex = []
    for part in parts:
        if isinstance(part, str):
            regex.append(_escape(part).replace("\n", r"\n"))
            continue
        if isinstance(part, _Pattern):
            regex.append(part.regex)
            continue
        chars = int(budget * part.share)
        if chars < MIN_SECTION_CHARS:
            raise ValueError(
                f"max_tokens={max_tokens} is too small for a constrained critique: its fixed text takes "
                f"~{fixed} tokens and each free section needs at least {MIN_SECTION_CHARS}"
            )
        regex.append(f"{_PROSE_START}{_PROSE}{{0,{chars - 1}}}" if part.start_visible else f"{_PROSE}{{0,{chars}}}")
    return "".join(regex)
