"""Terminal side of `gcr generate`: build the request, follow the job, print its trajectory.

For people, rounds count from 1 ("round 1" is the first); the JSON keeps `index` from 0.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from gcr import AsyncClient
from gcr.errors import APIConnectionError, GcrError
from gcr.types import JobDocument, Round

PIPED_WIDTH = 160
# Piped or logged (no terminal), rich would lay tables out at 80 columns, a word per line of
# a prompt: give them room instead. A terminal keeps its own width.
console = Console(stderr=True, width=None if sys.stderr.isatty() else PIPED_WIDTH)


def build_request(
    prompt: str,
    mode: str | None,
    source_image: Path | None,
    max_rounds: int | None,
    threshold: float | None,
    candidates: int | None,
    seed: int | None,
    steps: int | None,
    size: str | None,
    model: str | None = None,
    strategy: str | None = None,
    edit_model: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "mode": mode or ("edit" if source_image else "t2i")}
    if model is not None:
        body["model"] = model
    if source_image is not None:
        body["source_image"] = base64.b64encode(source_image.read_bytes()).decode()
    generation: dict[str, Any] = {"seed": seed, "steps": steps}
    if size:
        width, _, height = size.lower().partition("x")
        generation.update(width=int(width), height=int(height))
    loop = {
        "max_rounds": max_rounds,
        "threshold": threshold,
        "candidates_per_round": candidates,
        "strategy": strategy,
        "edit_model": edit_model,
    }
    body["generation"] = {k: v for k, v in generation.items() if v is not None}
    body["loop"] = {k: v for k, v in loop.items() if v is not None}
    return body


def rounds_table(doc: JobDocument) -> Table:
    table = Table(title=f"job {doc.id}: {doc.status} ({doc.stop_reason})")
    columns = ("round", "action", "prompt", "candidates (overall)", "chosen", "delta", "gen s", "critic s")
    for column in columns:  # rounds and candidates 1-based
        table.add_column(column)
    for r in doc.rounds:
        scores = ", ".join("err" if c.overall is None else f"{c.overall:.3f}" for c in r.candidates)
        # A prompt shortened to what the generator's encoder reads says so (docs/loop.md).
        cut = f" [cut to {r.prompt_fit.limit} tokens]" if r.prompt_fit is not None and r.prompt_fit.cut else ""
        table.add_row(
            str(r.index + 1),
            describe_action(r),
            Text(shortened(r.prompt) + cut),  # text, not markup: "[refined r1 c0]" is no style tag
            scores,
            "" if r.chosen is None else str(r.chosen + 1),
            "" if r.delta is None else f"{r.delta:+.3f}",
            f"{r.timings.generate_ms / 1000:.2f}",
            f"{r.timings.critique_ms / 1000:.2f}",
        )
    return table


def shortened(prompt: str, head: int = 44, tail: int = 20) -> str:
    """A long prompt's start and end: a refinement's changes are often at its end."""
    return prompt if len(prompt) <= head + tail + 1 else f"{prompt[:head]}…{prompt[-tail:]}"


def describe_action(round_: Round) -> str:
    """`generate`, or `edit` with the image it edited (`edit r2c1`: round 2, candidate 1)."""
    source = round_.edited_from
    if round_.action == "edit" and source is not None:
        return f"edit r{source.round + 1}c{source.candidate + 1}"
    return round_.action


async def follow(client: AsyncClient, job_id: str) -> JobDocument:
    """Show stage and step progress until the job ends."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        # Steps only once a denoising step is known: never "0/None".
        TextColumn("{task.fields[steps]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("queued", total=None, steps="")
        async for event in client.events(job_id):
            data = event.data
            if event.type == "stage":
                label = f"round {data['round'] + 1}: {data['stage']}"
                progress.update(task, description=label, completed=0, total=None, steps="")
            elif event.type == "progress":
                steps = f"step {data['step']}/{data['total']}"
                progress.update(task, completed=data["step"], total=data["total"], steps=steps)
            elif event.type == "round":
                overall = data["round"].get("overall")
                if overall is not None:
                    console.print(f"round {data['round']['index'] + 1}: overall {overall:.3f}")
    return await client.get(job_id)


async def submit_and_follow(
    url: str,
    body: dict[str, Any],
    *,
    wait: bool,
    out: Path,
    as_json: bool,
    api_key: str | None = None,
    studio_link: bool = True,
) -> int:
    replaced = ""
    async with AsyncClient(url, api_key=api_key) as client:
        try:
            job = await client.submit(body)
            if not wait:
                print(job.id)
                return 0
            doc = await follow(client, job.id)
            if doc.best is not None:
                replaced = " (it replaced the file there)" if out.exists() else ""
                out.write_bytes(await client.best_image(doc.id))
        except APIConnectionError as exc:
            # One line however narrow the terminal: rich would wrap a long URL and reason.
            console.print(f"[red]error[/red] {exc.message}", soft_wrap=True)
            return 2
        except GcrError as exc:
            console.print(f"[red]error[/red] {exc}", soft_wrap=True)
            return 2
    # The table is for people (stderr); --json puts the document on stdout for programs.
    console.print(rounds_table(doc))
    if doc.best:
        console.print(
            f"best: round {doc.best.round + 1} candidate {doc.best.candidate + 1}, "
            f"overall {doc.best.overall:.3f} -> saved {out}{replaced}"
        )
    if doc.error:
        console.print(f"[red]{doc.error.code}[/red]: {doc.error.message}")
    if studio_link:
        console.print(f"studio: {url.rstrip('/')}/studio/jobs/{doc.id}", soft_wrap=True)
    if as_json:
        print(doc.model_dump_json(indent=2))
    return 0 if doc.status == "succeeded" else 1
