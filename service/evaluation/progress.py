"""The terminal progress bar of `gcr eval`: items done/total, rounds completed, ETA."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichProgress:
    """A `ProgressSink` drawing one rich progress line; use as a context manager."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]eval[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("items · {task.fields[rounds]} rounds ·"),
            TimeElapsedColumn(),
            TextColumn("· ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task: TaskID | None = None
        self._rounds = 0

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def start(self, total: int, done: int) -> None:
        # Items finished by earlier runs fill the bar but are no samples of speed: the
        # ETA comes only from what this run finishes.
        self._task = self._progress.add_task("eval", total=total, completed=done, rounds=0)

    def item_done(self) -> None:
        if self._task is not None:
            self._progress.advance(self._task)

    def round_done(self) -> None:
        self._rounds += 1
        if self._task is not None:
            self._progress.update(self._task, rounds=self._rounds)
