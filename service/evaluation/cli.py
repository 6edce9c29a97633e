"""`gcr eval PROMPTS.jsonl --out DIR`: the evaluation command, and `run_eval` behind it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.logging import RichHandler

from gcr import AsyncClient
from service.evaluation.dataset import DatasetError, EvalItem, load_prompts
from service.evaluation.policies import Policy, PolicyError, build_policies
from service.evaluation.records import RecordsError
from service.evaluation.report import build_summary, summary_table, write_reports
from service.evaluation.runner import EvalAborted, EvalRunner, ProgressSink, RunOutcome

if TYPE_CHECKING:
    from workers.critics.standin_config import StandinConfig

DEFAULT_URL = "http://127.0.0.1:8000"
# Exit status of a run that left items unfinished (re-run to resume), and of Ctrl-C.
EXIT_UNFINISHED = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class InProcessStack:
    """With `--in-process`: what the dev stack started here runs (see `service.cli.devstack`)."""

    generator: str
    edit_generator: str | None
    standin: StandinConfig | None


async def run_eval(
    client: AsyncClient,
    items: Sequence[EvalItem],
    policies: Sequence[Policy],
    out_dir: Path,
    *,
    concurrency: int = 4,
    progress: ProgressSink | None = None,
    plot: bool = True,
) -> tuple[RunOutcome, dict[str, Any]]:
    """Run (or resume) an evaluation, then write `summary.json` and the plots."""
    runner = EvalRunner(client, items, policies, out_dir, concurrency=concurrency, progress=progress)
    outcome = await runner.run()
    summary = build_summary(out_dir, [p.name for p in policies], [i.id for i in items])
    await asyncio.to_thread(write_reports, out_dir, summary, plot=plot)
    return outcome, summary


@click.command("eval")
@click.argument("prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder; re-running into it resumes (finished ids are skipped).",
)
@click.option("--url", default=DEFAULT_URL, show_default=True, help="Gateway base URL.")
@click.option("--api-key", envvar="GCR_API_KEY", default=None, help="API key (env GCR_API_KEY).")
@click.option(
    "--in-process",
    is_flag=True,
    help="Start the offline dev stack here (Redis if none answers, stand-in critic, a worker).",
)
@click.option(
    "--generator",
    default="tiny:sd",
    show_default=True,
    help="With --in-process: the worker's generator (e.g. sim:0.1).",
)
@click.option(
    "--edit-generator",
    default="tiny:kontext",
    show_default=True,
    help="With --in-process: the edit worker's generator (strategies that edit run on it); 'none': no edit worker.",
)
@click.option(
    "--standin-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --in-process: the stand-in critic's scripted scores (JSON or YAML).",
)
@click.option(
    "--policy",
    "policy_options",
    multiple=True,
    metavar="NAME=JSON",
    help="A loop policy, e.g. paper='{\"max_rounds\": 2}'; repeatable.",
)
@click.option(
    "--policies",
    "policies_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A policy file (see examples/policies/).",
)
@click.option(
    "--generation",
    default=None,
    metavar="JSON",
    help="The `generation` object for every policy, e.g. '{\"seed\": 42}'.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 512),
    default=4,
    show_default=True,
    help="Jobs in flight at once, over all policies.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N prompts.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write summary.png and score_vs_compute.png.")
def eval_command(
    prompts: Path,
    out_dir: Path,
    url: str,
    api_key: str | None,
    in_process: bool,
    generator: str,
    edit_generator: str,
    standin_config: Path | None,
    policy_options: tuple[str, ...],
    policies_file: Path | None,
    generation: str | None,
    concurrency: int,
    limit: int | None,
    plot: bool,
) -> None:
    """Run PROMPTS (JSONL: id, prompt, optional source_image) under each policy.

    Writes DIR/<policy>/results.jsonl (one trajectory per item), the best images,
    DIR/summary.json, the plots DIR/summary.png and DIR/score_vs_compute.png, and
    prints a table. Interrupt at any time: the same command resumes, skipping
    finished ids. See docs/evaluation.md.
    """
    context = click.get_current_context()
    if in_process and context.get_parameter_source("url") == ParameterSource.COMMANDLINE:
        raise click.UsageError("--url and --in-process exclude each other")
    if standin_config is not None and not in_process:
        raise click.UsageError("--standin-config needs --in-process (a running stack has its own critic)")
    try:
        items = load_prompts(prompts)[:limit]
        policies = build_policies(policy_options, policies_file, generation)
        standin = _load_standin(standin_config) if standin_config else None
    except (DatasetError, PolicyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    local = None
    if in_process:
        local = InProcessStack(generator, None if edit_generator == "none" else edit_generator, standin)
    err = Console(stderr=True)
    _logging(err)
    try:
        outcome, summary = asyncio.run(
            _main(items, policies, out_dir, url, api_key, local, concurrency, plot, err)
        )
    except KeyboardInterrupt:
        _report_partial(out_dir, policies, items, plot, err)
        err.print(f"[yellow]interrupted[/yellow]: re-run the same command to resume into {out_dir}")
        sys.exit(EXIT_INTERRUPTED)
    except (EvalAborted, RecordsError) as exc:
        raise click.ClickException(str(exc)) from exc

    Console().print(summary_table(summary))
    err.print(
        f"results in {out_dir}: summary.json, summary.png, score_vs_compute.png, "
        "<policy>/results.jsonl, <policy>/images/"
    )
    if outcome.unfinished:
        err.print(
            f"[yellow]{outcome.unfinished} item(s) not finished[/yellow] (gateway unreachable or busy?); "
            "re-run the same command to retry them"
        )
        sys.exit(EXIT_UNFINISHED)


async def _main(
    items: list[EvalItem],
    policies: list[Policy],
    out_dir: Path,
    url: str,
    api_key: str | None,
    local: InProcessStack | None,
    concurrency: int,
    plot: bool,
    console: Console,
) -> tuple[RunOutcome, dict[str, Any]]:
    from service.evaluation.progress import RichProgress

    async with contextlib.AsyncExitStack() as stack:
        if local is not None:
            from service.cli.devstack import dev_stack

            started = dev_stack(local.generator, local.standin, edit_generator=local.edit_generator)
            url = await stack.enter_async_context(started)
        client = await stack.enter_async_context(AsyncClient(url, api_key=api_key))
        with RichProgress(console) as progress:
            return await run_eval(
                client, items, policies, out_dir, concurrency=concurrency, progress=progress, plot=plot
            )
    raise AssertionError("unreachable")  # mypy: the async with always returns


def _load_standin(path: Path) -> StandinConfig:
    from workers.critics.standin_config import load_standin_config

    return load_standin_config(path)


def _report_partial(out_dir: Path, policies: list[Policy], items: list[EvalItem], plot: bool, console: Console) -> None:
    """After Ctrl-C: the summary of what is finished so far, so a long run can be looked at."""
    with contextlib.suppress(OSError, RecordsError):
        summary = build_summary(out_dir, [p.name for p in policies], [i.id for i in items])
        write_reports(out_dir, summary, plot=plot)
        console.print(summary_table(summary))


def _logging(console: Console) -> None:
    # Warnings (an item left unfinished) are printed above the progress bar, not through it.
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logger = logging.getLogger("gcr.eval")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(handler)
        logger.propagate = False
