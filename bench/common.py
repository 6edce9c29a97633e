"""What every benchmark script does: take its options, and show and write its results.

The servers it measures against are in `bench.servers`, the load client in `bench.loadgen`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# NOTE: redis is imported inside the functions that use it. bench/gpu_validate.py uses
# this module's output helpers on the GPU machine, which has no redis package (see
# bench/gpu_kit.py: every top-level import here is a wheel to carry there).

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
D = TypeVar("D", bound="DataclassInstance")


# --- options ---------------------------------------------------------------------------------------


def argument_parser(doc: str | None, *, redis_url: bool = True) -> argparse.ArgumentParser:
    """A benchmark's options: described by the first line of its docstring, with `--json`
    (and `--redis-url`, the Redis it runs on)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    if redis_url:
        parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    return parser


def add_simulation_options(parser: argparse.ArgumentParser, *, t_critic: float) -> None:
    """The simulated jobs: rounds each (all of them run), and the generator's and critic's times."""
    parser.add_argument("--rounds", type=int, default=3, help="rounds per job, forced (default 3)")
    parser.add_argument("--t-gen", type=float, default=1.0, help="seconds per simulated generator call (default 1.0)")
    parser.add_argument("--t-critic", type=float, default=t_critic, help=f"seconds per critique (default {t_critic})")


def from_options(cls: type[D], args: argparse.Namespace, **values: Any) -> D:
    """The dataclass `cls`, its fields taken from the options of the same names unless given."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in vars(args).items() if name in names} | values)


# --- reporting ---------------------------------------------------------------------------------


def machine_info(redis_url: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    import redis as redis_sync

    redis_version = "unknown"
    with contextlib.suppress(redis_sync.RedisError):
        client = redis_sync.Redis.from_url(redis_url)
        redis_version = str(client.info("server").get("redis_version", "unknown"))
        client.close()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpus_usable": usable,
        "redis_version": redis_version,
        # Other work on a small machine moves the numbers: this says how busy it was.
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


@dataclass(frozen=True)
class Column:
    """One column of a results table: a key of the row dicts and how to show it."""

    key: str
    title: str
    fmt: str = "{}"


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column.title, justify="right" if column.fmt != "{}" else "left")
    for row in rows:
        table.add_row(*(_cell(column, row.get(column.key)) for column in columns))
    Console().print(table)


def print_targets(rows: Sequence[Mapping[str, Any]], *, title: str = "targets", value_fmt: str = "{:.3f}") -> None:
    """The table of a benchmark's targets: rows of metric, value, target and ok."""
    columns = [
        Column("metric", "metric"),
        Column("value", "value", value_fmt),
        Column("target", "target"),
        Column("ok", "ok"),
    ]
    print_table(title, columns, rows)


def _cell(column: Column, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    try:
        return column.fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def write_json(path: Path | None, data: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run_info(name: str, redis_url: str | None = None) -> dict[str, Any]:
    """The head of a benchmark's result: which one, the command that ran it and, given the
    Redis it ran on, the machine (`machine_info`)."""
    info: dict[str, Any] = {"benchmark": name, "command": " ".join(["python", f"bench/{name}.py", *sys.argv[1:]])}
    if redis_url is not None:
        info["machine"] = machine_info(redis_url)
    return info


def finish(result: Mapping[str, Any], json_path: Path | None, show: Callable[[Any], None], *, ok: bool = True) -> int:
    """Show the result and write it to `--json`; the exit status: 1 unless `ok`."""
    show(result)
    write_json(json_path, result)
    return 0 if ok else 1
