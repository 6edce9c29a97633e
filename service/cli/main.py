"""The `gcr` command: serve, worker, generate, critique, up, dev tools.

Every command builds its role's settings from `GCR_*` variables (`gcr serve` the
gateway's, `gcr worker` the worker's, `gcr up --dev` all of them); options given on
the command line override them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from gcr.types import STRATEGIES, Critique, Mode
from service.errors import ConfigurationError, GcrError
from service.settings import GatewaySettings, SharedSettings, WorkerSettings

if TYPE_CHECKING:
    from service.critic.client import OpenAICritic


class SizeParam(click.ParamType[str]):
    """WIDTHxHEIGHT, each side a multiple of 16 between 16 and 2048 (what the gateway accepts)."""

    name = "WIDTHxHEIGHT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        width, sep, height = str(value).lower().partition("x")
        sides = [int(side) for side in (width, height) if side.isdigit()]
        if not sep or len(sides) != 2 or any(side % 16 or not 16 <= side <= 2048 for side in sides):
            self.fail(f"{value!r} is not WIDTHxHEIGHT with sides that are multiples of 16 in 16-2048, e.g. 1024x1024")
        return f"{sides[0]}x{sides[1]}"


SIZE = SizeParam()


RoleSettings = TypeVar("RoleSettings", bound=SharedSettings)


def _settings(role: type[RoleSettings], **overrides: Any) -> RoleSettings:
    """The settings of one role (GCR_* variables of other roles are not its business)."""
    try:
        return role(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic's ValidationError: one line per bad variable is enough
        raise click.ClickException(f"invalid configuration: {exc}") from exc


def _settings_epilog(role: type[SharedSettings]) -> str:
    """One line per setting the role reads: the GCR_ variable, its default, what it does."""
    lines = ["\b", "Settings it reads (environment variables):"]
    for name, field in role.model_fields.items():
        default = "-" if field.default is None or field.default_factory is not None else field.default
        lines.append(f"  GCR_{name.upper():28s} {default!s:14.14s} {field.description or ''}")
    return "\n".join(lines)


def _logging(fmt: str = "json") -> None:
    from service import logs

    logs.configure(fmt)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """gcr: Generate-Critique-Refine image generation as a service."""


@main.command(epilog=_settings_epilog(GatewaySettings))
@click.option("--host", default=None, help="Bind address (GCR_HOST).")
@click.option("--port", type=int, default=None, help="Port (GCR_PORT).")
def serve(host: str | None, port: int | None) -> None:
    """Run the HTTP gateway."""
    import uvicorn

    from service.gateway.app import create_app

    settings = _settings(GatewaySettings, host=host, port=port)
    _logging(settings.log_format)
    # Bounded graceful shutdown: SSE clients may hold connections open indefinitely.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,
        timeout_graceful_shutdown=10,
    )


@main.command(epilog=_settings_epilog(WorkerSettings))
def worker() -> None:
    """Run a GPU worker: load the generator, then claim and run jobs until SIGTERM."""
    settings = _settings(WorkerSettings)
    _logging(settings.log_format)
    try:
        asyncio.run(run_worker(settings))
    except GcrError as exc:
        raise click.ClickException(exc.message) from exc
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc


async def run_worker(settings: WorkerSettings) -> None:
    """Build the worker's backends and run it; SIGTERM/SIGINT drain it (and end it at once
    while the model is still loading: nothing is claimed yet)."""
    from service.critic.client import OpenAICritic
    from workers.generators import load_generator
    from workers.generators.loading import resolve_device
    from workers.health import HealthServer
    from workers.preflight import checked_model, hold_until_it_fits
    from workers.worker import Worker, connect_worker, served_model

    log = logging.getLogger("gcr.worker")
    loop = asyncio.get_running_loop()

    def stop_while_loading(signum: int) -> None:
        # NOTE: the download and the load run in a thread that cannot be interrupted, and
        # an exit waits for it. With no job claimed, leave now: as PID 1 in a container
        # (no init), waiting would cost the whole grace period before the SIGKILL.
        log.info("%s while loading the model: exiting; no job was claimed", signal.Signals(signum).name)
        logging.shutdown()
        os._exit(128 + signum)

    _on_stop_signals(loop, stop_while_loading)
    if settings.generator:
        served_model(settings, settings.generator)  # a name jobs cannot route by fails before any loading
    critic = OpenAICritic(settings)
    if settings.critic_wait_before_load:
        await wait_for_critic(critic, log)
    model = checked_model(settings)
    if model is not None:
        # Before anything is downloaded: a cuda worker without a usable GPU exits here, saying why.
        device = await asyncio.to_thread(resolve_device, settings.generator_device)
        if device.startswith("cuda"):
            await hold_until_it_fits(settings, model, device)
    generator = await asyncio.to_thread(load_generator, settings)
    log.info("loaded generator %s (modes %s)", generator.name, sorted(generator.modes))
    worker = Worker(settings, generator, critic, connect_worker(settings, generator))
    _on_stop_signals(loop, lambda _signum: worker.stop())
    health = None
    if settings.worker_metrics_port:
        health = HealthServer(
            settings.worker_metrics_port,
            lambda: worker.scheduler.alive(settings.worker_stall_s),
            host=settings.worker_metrics_host,
        )
        await health.start()
    try:
        await worker.run(drain_grace_s=settings.drain_grace_s)
    finally:
        if health is not None:
            await health.stop()
        await critic.aclose()


async def wait_for_critic(critic: OpenAICritic, log: logging.Logger, every_s: float = 5.0) -> None:
    """Hold the model load until the critic answers (GCR_CRITIC_WAIT_BEFORE_LOAD)."""
    while not await critic.probe():
        log.info("waiting for the critic to answer before loading the model (GCR_CRITIC_WAIT_BEFORE_LOAD)")
        await asyncio.sleep(every_s)


def _on_stop_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[int], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, handler, int(sig))
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass


@main.command()
@click.argument("prompt")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Gateway base URL.")
@click.option("--model", default=None, help="A model live workers serve (GET /v1/models); default: the fleet's.")
@click.option("--mode", type=click.Choice(["t2i", "edit"]), default=None, help="Default: edit with --source-image.")
@click.option("--source-image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--max-rounds", type=click.IntRange(1, 20), default=None, help="1-20 rounds at most.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Accept at this overall score (0-1).")
@click.option("--candidates", type=click.IntRange(1, 8), default=None, help="Candidates per round (1-8).")
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default=None,
    help="How later rounds refine: rewrite the prompt (default), edit the best image, or auto (docs/loop.md).",
)
@click.option("--edit-model", default=None, help="The model edit rounds run on; default: the fleet's edit model.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None)
@click.option("--steps", type=click.IntRange(1, 200), default=None, help="Denoising steps (1-200).")
@click.option("--size", type=SIZE, default=None, help="WIDTHxHEIGHT, each a multiple of 16 in 16-2048, e.g. 1024x1024.")
@click.option("--wait/--no-wait", default=False, help="Follow the job to its end and save the best image.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("best.png"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final job document as JSON.")
@click.option("--api-key", envvar="GCR_API_KEY", default=None, help="Bearer key (env GCR_API_KEY).")
def generate(
    prompt: str,
    url: str,
    model: str | None,
    mode: str | None,
    source_image: Path | None,
    max_rounds: int | None,
    threshold: float | None,
    candidates: int | None,
    strategy: str | None,
    edit_model: str | None,
    seed: int | None,
    steps: int | None,
    size: str | None,
    wait: bool,
    out: Path,
    as_json: bool,
    api_key: str | None,
) -> None:
    """Submit PROMPT to a running gateway; with --wait, show progress and save the best image.

    Rounds are numbered from 1 in what it prints (the job's JSON keeps `index` from 0)."""
    from service.cli.console import build_request, submit_and_follow

    body = build_request(
        prompt, mode, source_image, max_rounds, threshold, candidates, seed, steps, size, model, strategy, edit_model
    )
    code = asyncio.run(submit_and_follow(url, body, wait=wait, out=out, as_json=as_json, api_key=api_key))
    sys.exit(code)


@main.command()
@click.option("--instruction", required=True)
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--source-image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--mode", type=click.Choice(["t2i", "edit"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the whole Critique as JSON (default: a summary).")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Gateway base URL.")
@click.option("--api-key", envvar="GCR_API_KEY", default=None, help="Bearer key (env GCR_API_KEY).")
@click.option("--direct", is_flag=True, help="Call the critic of GCR_CRITIC_* directly instead of a gateway.")
def critique(
    instruction: str,
    image: Path,
    source_image: Path | None,
    mode: str | None,
    as_json: bool,
    url: str,
    api_key: str | None,
    direct: bool,
) -> None:
    """Critique one image with the reward model, through a gateway (POST /critique); prints the Critique.

    Exits non-zero with a one-line reason when the gateway or the critic is unreachable or
    its answer unparseable."""
    chosen: Mode = "edit" if mode == "edit" or (mode is None and source_image) else "t2i"
    result = (
        _critique_direct(instruction, image, source_image, chosen)
        if direct
        else _critique_via(url, api_key, instruction, image, source_image, chosen)
    )
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    click.echo(f"overall {result.overall:.3f}  ({result.model})")
    for name, dim in result.dimensions.items():
        click.echo(f"  {name:20s} {'N/A' if dim.score is None else f'{dim.score:.2f}'}")
    click.echo(f"refined request: {result.refined_request}")


def _critique_via(
    url: str, api_key: str | None, instruction: str, image: Path, source_image: Path | None, mode: Mode
) -> Critique:
    import gcr
    from gcr.errors import APIStatusError, GcrError

    try:
        with gcr.Client(url, api_key=api_key) as client:
            return client.critique(instruction, image, source_image=source_image, mode=mode)
    except APIStatusError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from exc
    except GcrError as exc:
        raise click.ClickException(exc.message) from exc


def _critique_direct(instruction: str, image: Path, source_image: Path | None, mode: Mode) -> Critique:
    from service.critic.client import OpenAICritic, redacted

    settings = _settings(SharedSettings)

    async def run() -> Critique:
        critic = OpenAICritic(settings)
        try:
            return await critic.critique(
                instruction, image.read_bytes(), source_image.read_bytes() if source_image else None, mode=mode
            )
        finally:
            await critic.aclose()

    # One line on failure, below: the client's own warning (with the URL) would be a second.
    logging.getLogger("gcr.critic").setLevel(logging.ERROR)
    try:
        return asyncio.run(run())
    except GcrError as exc:
        where = redacted(settings.critic_base_url)
        raise click.ClickException(f"{exc.code}: {exc.message} (GCR_CRITIC_BASE_URL={where})") from exc


@main.command("model-defaults")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the defaults as JSON.")
def model_defaults(model: str, as_json: bool) -> None:
    """What a job on MODEL (hub id or local folder) gets for each value it leaves unset.

    Reads the per-model table and the folder's gcr_defaults.json; loads no weights."""
    from workers.generators.model_defaults import job_defaults, known_models

    defaults = job_defaults(model)
    if as_json:
        click.echo(json.dumps(defaults, indent=2))
        return
    if not defaults["known"]:
        click.echo(f"{model}: not in the table of known models; a job gets the pipeline's own defaults.")
        click.echo("known models: " + ", ".join(known_models()))
        return
    click.echo(f"{model} (defaults of {defaults['defaults_of']}):")
    for name in (
        "width",
        "height",
        "steps",
        "guidance_scale",
        "true_cfg_scale",
        "negative_prompt",
        "max_sequence_length",
    ):
        if defaults[name] is not None:
            click.echo(f"  {name:20s} {defaults[name]!r}")
    click.echo(f"  source: {defaults['source']}")


@main.command()
@click.option("--dev", is_flag=True, help="The offline stack: tiny pipelines and a local critic (the only one so far).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--generator", default="tiny:sd", show_default=True, help="GCR_GENERATOR for the worker.")
@click.option(
    "--edit-generator",
    default="tiny:kontext",
    show_default=True,
    help="GCR_GENERATOR for the edit worker (strategies that edit run on it); 'none': no edit worker.",
)
@click.option("--demo", is_flag=True, help="Submit one demo job, print it, and keep serving until Ctrl-C.")
@click.option(
    "--critic-latency",
    type=click.FloatRange(0, 600),
    default=0.0,
    show_default=True,
    help="Seconds the stand-in critic takes per critique; RationalRewards on a GPU takes 10-60.",
)
@click.option("--once", is_flag=True, help="With --demo: exit with the demo job's status instead of serving on.")
@click.option("--json", "as_json", is_flag=True, help="With --demo: also print the finished job as JSON (stdout).")
@click.option(
    "--critic",
    type=click.Choice(["standin", "vllm"]),
    default="standin",
    show_default=True,
    help="standin: scripted scores; vllm: the real `vllm serve` on a tiny random-weight Qwen3-VL "
    "(vLLM's CPU build: ./scripts/setup-vllm).",
)
def up(
    dev: bool,
    port: int,
    generator: str,
    edit_generator: str,
    demo: bool,
    critic_latency: float,
    once: bool,
    as_json: bool,
    critic: str,
) -> None:
    """Run the whole stack on this machine: Redis (if none answers), gateway, workers, a critic."""
    from service.cli.devstack import run_dev_stack

    if not dev:
        raise click.UsageError(
            "gcr up runs the offline stack only: add --dev. On a GPU host use docker compose (docs/gpu.md)."
        )
    if critic == "vllm" and critic_latency:
        raise click.UsageError("--critic-latency paces the stand-in critic; a real vLLM takes the time it takes")
    _logging("text")
    try:
        code = asyncio.run(
            run_dev_stack(
                port=port,
                generator=generator,
                demo=demo,
                critic_latency_s=critic_latency,
                once=once,
                edit_generator=None if edit_generator == "none" else edit_generator,
                critic="vllm" if critic == "vllm" else "standin",
                as_json=as_json,
            )
        )
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C or SIGTERM: the stack cleaned up
        click.echo("gcr dev stack stopped; its Redis keys are deleted", err=True)
        code = 0
    except (RuntimeError, GcrError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


def _register_eval() -> None:
    from service.evaluation.cli import eval_command

    main.add_command(eval_command)


_register_eval()


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("new")
@click.option("--tenant", required=True, help="Name of the tenant this key acts for.")
def keys_new(tenant: str) -> None:
    """Make a new API key; prints the key (give it to the client) and the GCR_API_KEYS entry (keep only that)."""
    from service.gateway.auth import new_key
    from service.settings import TENANT_NAME, TENANT_RULE

    if not TENANT_NAME.fullmatch(tenant):
        raise click.BadParameter(TENANT_RULE, param_hint="--tenant")
    key, digest = new_key()
    click.echo(f"key:   {key}")
    click.echo(f'entry: "{digest}": "{tenant}"   (GCR_API_KEYS=\'{{"{digest}": "{tenant}"}}\')')


@main.group()
def dev() -> None:
    """Developer tools: tiny test pipelines, the tiny critic model, the stand-in critic."""


@dev.command("build-tiny-pipeline")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(["sd", "flux", "kontext"]), default="sd", show_default=True)
def build_tiny_pipeline(directory: Path, kind: str) -> None:
    """Build a tiny random-weight diffusers pipeline into DIRECTORY (for tests; its images are noise)."""
    from workers.generators.tiny import build_tiny_pipeline as build

    path = build(kind, directory)
    click.echo(f"built tiny {kind} pipeline in {path}; serve it with GCR_GENERATOR={path}")


@dev.command("build-tiny-critic")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def build_tiny_critic(directory: Path) -> None:
    """Build a tiny random-weight Qwen3-VL (RationalRewards' architecture) into DIRECTORY, for
    `vllm serve` in tests: it proves the protocol and the server, its judgments are noise."""
    from workers.critics.tiny_model import SERVED_NAME
    from workers.critics.tiny_model import build_tiny_critic as build

    path = build(directory)
    click.echo(
        f"built the tiny critic in {path}; serve it with: vllm serve {path} --served-model-name {SERVED_NAME} "
        f"(GCR_CRITIC_MODEL={SERVED_NAME})"
    )


@dev.command("standin-critic")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8001, show_default=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="StandinConfig as JSON (scores, schedules, latency, faults).",
)
@click.option(
    "--latency",
    type=click.FloatRange(0, 600),
    default=None,
    help="Seconds per critique (overrides the config's latency_s); RationalRewards on a GPU takes 10-60.",
)
def standin_critic(host: str, port: int, config_path: Path | None, latency: float | None) -> None:
    """Run the stand-in critic: OpenAI-compatible, deterministic scores, NOT a real judgment."""
    from workers.critics.standin import serve_standin
    from workers.critics.standin_config import StandinConfig

    config = StandinConfig.model_validate(json.loads(config_path.read_text())) if config_path else StandinConfig()
    if latency is not None:
        config = config.model_copy(update={"latency_s": latency})
    serve_standin(config, host, port)


if __name__ == "__main__":
    main()
