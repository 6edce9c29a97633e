"""The output folder of an evaluation, and how it is written so that it can be resumed.

Layout::

    DIR/runs.jsonl                  one `start` and one `end` record per invocation
    DIR/summary.json                rewritten at the end of every invocation, with
    DIR/summary.png                 the plots (best-so-far by round,
    DIR/score_vs_compute.png        and against images made and generation time)
    DIR/<policy>/policy.json        the policy's loop/generation objects (resume refuses others)
    DIR/<policy>/results.jsonl      one line per finished item, appended as items finish
    DIR/<policy>/images/<id>.png    the item's best image

A result line is appended with one `write` on an `O_APPEND` descriptor and
fsync'd, after the image is in place. An interrupt can therefore leave at most a
trailing partial line; readers ignore it, and the next run cuts it off before
appending, so it never glues onto the next good line. Only a complete line
counts as finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
RUNS = "runs.jsonl"
POLICY = "policy.json"
SUMMARY = "summary.json"
PLOT = "summary.png"
COMPUTE_PLOT = "score_vs_compute.png"
IMAGES = "images"
LOCK = ".lock"


class RecordsError(Exception):
    """The output folder cannot be used as it is (another policy, a corrupt line, a concurrent run)."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a JSONL file; a trailing line without its newline is ignored."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete, _, _partial = data.rpartition(b"\n")
    lines: list[dict[str, Any]] = []
    for number, raw in enumerate(complete.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
    return lines


def cut_partial_line(path: Path) -> bool:
    """Truncate a trailing partial line (left by an interrupt); True when one was cut."""
    try:
        with path.open("rb+") as handle:
            data = handle.read()
            if not data or data.endswith(b"\n"):
                return False
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())
            return True
    except FileNotFoundError:
        return False


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line durably: a single write, then fsync."""
    data = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file under a temporary name, then rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class PolicyFolder:
    """`DIR/<policy>/`: its results and images."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self.path = out_dir / name
        self.results = self.path / RESULTS
        self.images = self.path / IMAGES

    def prepare(self, spec: dict[str, Any]) -> None:
        """Create the folder, or check that it was made by the same policy; repair a cut line."""
        self.images.mkdir(parents=True, exist_ok=True)
        stored = self.path / POLICY
        if stored.exists():
            previous = json.loads(stored.read_text(encoding="utf-8"))
            if previous != spec:
                raise RecordsError(
                    f"{self.path} holds results of policy {self.name!r} = {json.dumps(previous)}, "
                    f"not {json.dumps(spec)}; use another --out or another policy name"
                )
        else:
            write_json(stored, spec)
        cut_partial_line(self.results)

    def lines(self) -> list[dict[str, Any]]:
        return read_jsonl(self.results)

    def finished_ids(self) -> set[str]:
        return {str(line["id"]) for line in self.lines()}

    def image_path(self, item_id: str) -> Path:
        return self.images / f"{item_id}.png"

    def record(self, line: dict[str, Any]) -> None:
        append_jsonl(self.results, line)


class RunLog:
    """`DIR/runs.jsonl`: when each invocation started and ended, for the wall-clock totals."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RUNS

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def start(self, policies: list[str]) -> int:
        cut_partial_line(self.path)
        number = 1 + max((int(r["run"]) for r in self.records()), default=0)
        append_jsonl(self.path, {"event": "start", "run": number, "at": time.time(), "policies": policies})
        return number

    def end(self, number: int, *, recorded: int, unfinished: int, interrupted: bool) -> None:
        append_jsonl(
            self.path,
            {
                "event": "end",
                "run": number,
                "at": time.time(),
                "recorded": recorded,
                "unfinished": unfinished,
                "interrupted": interrupted,
            },
        )


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Refuse a second `gcr eval` on the same folder while one runs (it would record items twice)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; run one evaluation per folder by hand
        yield
        return
    with (out_dir / LOCK).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecordsError(f"another gcr eval is writing to {out_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
