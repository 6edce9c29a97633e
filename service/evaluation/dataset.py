"""The prompt set of an evaluation: a JSONL file, one item per line.

Each line is a JSON object with

- `id` (required): a string (or integer) of letters, digits, `_`, `.`, `-`; it
  names the item's result line and its image file, and is what a re-run skips by;
- `prompt` (required): the instruction;
- `source_image` (optional, makes the item an edit): a path to a PNG/JPEG/WebP file,
  relative to the JSONL file's folder (or absolute), or the image itself as base64
  or a `data:` URI;
- `mode` (optional): `t2i` or `edit`; default `edit` when a source image is given;
- any other field (a benchmark's category, tags, ...) is kept as `meta` and copied
  into the item's result line, so results can be grouped by it later.

Blank lines are skipped. Every problem of the file is reported at once, with its
line number, before anything is submitted.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcr.types import Mode

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SOURCES_HINT = (
    "hint: source images are missing; for the bundled example sets, generate them first with "
    "`python examples/make_edit_sources.py`"
)
# Problems listed in one error before the rest are summarised as a count.
MAX_LISTED_PROBLEMS = 20
_KNOWN_FIELDS = frozenset({"id", "prompt", "source_image", "mode"})


class DatasetError(ValueError):
    """The prompts file is unusable; `problems` holds one line per problem found."""

    def __init__(self, path: Path, problems: list[str], hint: str | None = None) -> None:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        text = "\n".join(f"  {p}" for p in listed) + (f"\n  ... and {more} more" if more else "")
        super().__init__(f"{path}: {len(problems)} problem(s):\n{text}" + (f"\n{hint}" if hint else ""))
        self.path = path
        self.problems = problems
        self.hint = hint


@dataclass(frozen=True)
class EvalItem:
    """One prompt of the set. The source image is read only when the item is submitted."""

    id: str
    prompt: str
    mode: Mode = "t2i"
    source_path: Path | None = None
    source_inline: str | None = None
    # What the result line records instead of the bytes: the path as written, or "inline".
    source_ref: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def source_image(self) -> str | None:
        """The source image as the gateway takes it (base64 or a data: URI), or None for t2i."""
        if self.source_path is not None:
            return base64.b64encode(self.source_path.read_bytes()).decode("ascii")
        return self.source_inline


def load_prompts(path: Path) -> list[EvalItem]:
    """Read and validate the whole file; raises `DatasetError` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, [f"cannot read the file: {exc}"]) from exc
    items: list[EvalItem] = []
    problems: list[str] = []
    missing_source = False
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = _parse_line(raw, path.parent)
        except _LineProblem as exc:
            problems.append(f"line {number}: {exc}")
            missing_source = missing_source or isinstance(exc, _MissingSource)
            continue
        if item.id in first_line:
            problems.append(f"line {number}: duplicate id {item.id!r} (first on line {first_line[item.id]})")
            continue
        first_line[item.id] = number
        items.append(item)
    if not items and not problems:
        problems.append("no items (the file is empty)")
    if problems:
        raise DatasetError(path, problems, SOURCES_HINT if missing_source else None)
    return items


class _LineProblem(Exception):
    pass


class _MissingSource(_LineProblem):
    pass


def _parse_line(raw: str, base: Path) -> EvalItem:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _LineProblem(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise _LineProblem("not a JSON object")
    item_id = _read_id(data)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _LineProblem(f"id {item_id!r}: missing or blank `prompt`")
    source = data.get("source_image")
    mode = data.get("mode", "edit" if source is not None else "t2i")
    if mode not in ("t2i", "edit"):
        raise _LineProblem(f"id {item_id!r}: `mode` must be t2i or edit, not {mode!r}")
    if mode == "edit" and source is None:
        raise _LineProblem(f"id {item_id!r}: mode edit needs a `source_image`")
    if mode == "t2i" and source is not None:
        raise _LineProblem(f"id {item_id!r}: mode t2i takes no `source_image`")
    meta = {k: v for k, v in data.items() if k not in _KNOWN_FIELDS}
    if source is None:
        return EvalItem(id=item_id, prompt=prompt, mode=mode, meta=meta)
    if not isinstance(source, str) or not source:
        raise _LineProblem(f"id {item_id!r}: `source_image` must be a path or base64 string")
    return _with_source(item_id, prompt, source, base, meta)


def _read_id(data: dict[str, Any]) -> str:
    value = data.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _LineProblem("missing `id` (a string or an integer)")
    item_id = str(value)
    if not ID_PATTERN.match(item_id):
        raise _LineProblem(
            f"id {item_id!r}: use letters, digits, `_`, `.` and `-` only (it names the result's image file)"
        )
    return item_id


def _with_source(item_id: str, prompt: str, source: str, base: Path, meta: dict[str, Any]) -> EvalItem:
    if source.startswith("data:"):
        return EvalItem(item_id, prompt, "edit", source_inline=source, source_ref="inline", meta=meta)
    if source.lower().endswith(IMAGE_SUFFIXES):
        path = Path(source) if Path(source).is_absolute() else base / source
        if not path.is_file():
            raise _MissingSource(f"id {item_id!r}: source image {str(path)!r} does not exist")
        return EvalItem(item_id, prompt, "edit", source_path=path, source_ref=source, meta=meta)
    try:
        base64.b64decode(source, validate=True)
    except (binascii.Error, ValueError):
        raise _LineProblem(
            f"id {item_id!r}: `source_image` is neither a path ending in {'/'.join(IMAGE_SUFFIXES)} nor valid base64"
        ) from None
    return EvalItem(item_id, prompt, "edit", source_inline=source, source_ref="inline", meta=meta)
