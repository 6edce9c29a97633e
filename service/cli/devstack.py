"""`gcr up --dev`: the whole stack in one process, offline.

Redis (started here only if none answers), the gateway, a text-to-image worker and
an edit worker on tiny random-weight diffusers pipelines (SD and FLUX Kontext), and a
critic, one of:
- `standin` (the default): the STAND-IN critic, which answers in the RationalRewards
  format with scripted scores: it is not a real judgment, and every critique it writes
  says so;
- `vllm`: the real `vllm serve` (vLLM's CPU build, `./scripts/setup-vllm`) on a tiny
  random-weight Qwen3-VL, started as docker-compose.yml starts vLLM
  (`service.cli.vllm_dev`): the real server and protocol, random judgments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import redis as redis_sync
import uvicorn

from service import servers
from service.cli.console import console, submit_and_follow
from service.cli.vllm_dev import VllmServer, deployed_args, serve_args, vllm_binary
from service.gateway.app import create_app
from service.jobs.connection import delete_prefix
from service.servers import free_port
from service.settings import Settings

if TYPE_CHECKING:
    from workers.critics.standin_config import StandinConfig
    from workers.worker import Worker

log = logging.getLogger("gcr.up")

DEMO_PROMPT = "a red bicycle leaning against a blue wall, morning light"
# The stand-in's scripted scores for the demo: the critic is unhappy at first, then
# the refinements "improve" the image until it crosses the default threshold. With
# strategy auto (edit at 0.5 and above) round 2 rewrites the prompt and round 3 edits
# round 2's image on the edit worker.
DEMO_SCHEDULE = [0.42, 0.61, 0.83]
DEMO_REQUEST = {"prompt": DEMO_PROMPT, "loop": {"max_rounds": 4, "threshold": 0.75, "strategy": "auto"}}
DEV_EDIT_GENERATOR = "tiny:kontext"
CriticKind = Literal["standin", "vllm"]
# The tiny critic writes noise until max_tokens; a smaller budget keeps a CPU critique near 3 s.
DEV_VLLM_MAX_TOKENS = 1024


def redis_answers(url: str) -> bool:
    try:
        return bool(redis_sync.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis_sync.RedisError:
        return False


@contextlib.contextmanager
def local_redis(url: str) -> Iterator[str]:
    """Yield `url` if a Redis answers there; else start a throwaway redis-server."""
    if redis_answers(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(f"no Redis answers at {url} and redis-server is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gcr-redis-") as folder:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                folder,
            ],
            stdout=subprocess.DEVNULL,
        )
        started = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 10
            while not redis_answers(started):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            log.info("started redis-server on port %d", port)
            yield started
        finally:
            proc.terminate()
            proc.wait(10)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def run_dev_stack(
    port: int,
    generator: str,
    demo: bool,
    critic_latency_s: float = 0.0,
    once: bool = False,
    edit_generator: str | None = DEV_EDIT_GENERATOR,
    critic: CriticKind = "standin",
    as_json: bool = False,
) -> int:
    """`gcr up --dev [--demo]`: serve until interrupted. With `demo`, first run the demo job and
    keep serving, so that its links (the studio page, the images) work; with `once` too,
    return the demo's exit code instead (scripts). `as_json`: the finished demo job as JSON
    on stdout, after its table."""
    if not port_is_free(port):
        raise RuntimeError(f"port {port} is in use; pass --port to choose another")
    # SIGINT and SIGTERM stop the whole stack, its context managers deleting its keys; SIGINT
    # too where the shell started this with SIGINT ignored (a background job of a script).
    main = asyncio.current_task()
    if main is not None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signum, main.cancel)
    stack = dev_stack(
        generator, port=port, critic_latency_s=critic_latency_s, edit_generator=edit_generator, critic=critic
    )
    async with stack as url:
        pace = f", {critic_latency_s:g} s per critique" if critic_latency_s else ""
        editing = f", edit generator {edit_generator}" if edit_generator else ""
        judge = (
            "the real vllm serve on a tiny random-weight Qwen3-VL (random judgments)"
            if critic == "vllm"
            else f"stand-in critic (scripted scores, NOT a real judge{pace})"
        )
        console.print(
            f"gcr dev stack: gateway {url}, generator {generator}{editing}, {judge}, auth off", soft_wrap=True
        )
        if not once:  # with --once the stack is gone when the demo ends, and its links with it
            console.print(f"studio: {url}/studio   API docs: {url}/docs", soft_wrap=True)
        if demo:
            console.print(f"demo job: {DEMO_PROMPT!r}")
            code = await submit_and_follow(
                url, DEMO_REQUEST, wait=True, out=Path("gcr-demo.png"), as_json=as_json, studio_link=not once
            )
            if once:
                return code
            # The job, its images and its studio page live as long as this stack: say so.
            console.print(
                "the stack keeps serving so that the demo job's links work; "
                "Ctrl-C stops it and deletes its jobs (--once exits right after the demo)",
                soft_wrap=True,
            )
        console.print("serving until Ctrl-C")
        await asyncio.Event().wait()  # serve until Ctrl-C
    return 0


@contextlib.asynccontextmanager
async def dev_stack(
    generator: str = "tiny:sd",
    standin: StandinConfig | None = None,
    *,
    port: int | None = None,
    settings: Settings | None = None,
    critic_latency_s: float | None = None,
    edit_generator: str | None = DEV_EDIT_GENERATOR,
    critic: CriticKind = "standin",
) -> AsyncIterator[str]:
    """The `gcr up --dev` stack for the length of an `async with`; yields the gateway URL.

    Its workers: one on `generator` and, unless `edit_generator` is None, one on that edit
    model, so that strategies which edit (`loop.strategy`) run offline too.

    Redis is the configured one if it answers, else a throwaway redis-server. The
    stack's keys live under a fresh prefix, deleted on exit, so its jobs never mix
    with (or are claimed by) a real stack sharing that Redis. The critic is the
    stand-in (`standin`, default: the demo schedule for every instruction), taking
    `critic_latency_s` per critique when given. The
    worker installs no signal handlers: Ctrl-C stays with the caller.
    With `critic="vllm"` it is the real `vllm serve` on the tiny Qwen3-VL instead
    (`VllmMissing` says how to install it).
    """
    from service.critic.client import OpenAICritic
    from workers.critics.standin import running_standin
    from workers.critics.standin_config import StandinConfig, StandinRule
    from workers.critics.tiny_model import SERVED_NAME
    from workers.generators import load_generator
    from workers.worker import Worker, connect_worker

    base = settings or Settings()
    config = standin or StandinConfig(rules=[StandinRule(instruction="", rounds=list(DEMO_SCHEDULE))])
    if critic_latency_s is not None:
        config = config.model_copy(update={"latency_s": critic_latency_s})
    prefix = f"{base.redis_prefix}-dev-{secrets.token_hex(4)}"
    with contextlib.ExitStack() as resources:
        redis_url = resources.enter_context(local_redis(base.redis_url))
        resources.callback(_delete_keys, redis_url, prefix)
        if critic == "vllm":
            server = await asyncio.to_thread(_vllm_server, base.cache_dir)
            server.start()
            # Stopped however the wait ends: Ctrl-C during the minute it takes to start must not
            # leave it running (its own session: the terminal's signal does not reach it).
            resources.callback(server.stop)
            log.info("vllm serve answered after %.0f s", await asyncio.to_thread(server.wait_ready))
            critic_settings = {
                "critic_base_url": server.base_url,
                "critic_model": SERVED_NAME,
                "critic_max_tokens": DEV_VLLM_MAX_TOKENS,
                "critic_structured_outputs": True,
            }
        else:
            # A thread-hosted stand-in, as the tests use: it keeps answering while this loop is busy.
            critic_settings = {"critic_base_url": resources.enter_context(running_standin(config))}
            critic_settings["critic_model"] = config.model
        stack_settings = base.model_copy(
            update={
                "redis_url": redis_url,
                "redis_prefix": prefix,
                "generator": generator,
                **critic_settings,
                "critic_edit_model": None,
                "critic_api_key": None,
                "auth_disabled": True,
                # One local client: a per-key rate limit would only slow it down.
                "rate_limit_per_s": 0,
            }
        )
        critic_client = OpenAICritic(stack_settings)
        roles = {"worker": generator, "edit-worker": edit_generator}
        workers: list[Worker] = []
        for role, role_generator in roles.items():
            if role_generator:
                worker_settings = stack_settings.model_copy(
                    update={"generator": role_generator, "worker_id": f"{prefix}-{role}"}
                )
                backend = await asyncio.to_thread(load_generator, worker_settings)
                workers.append(
                    Worker(worker_settings, backend, critic_client, connect_worker(worker_settings, backend))
                )
        worker_tasks = [asyncio.create_task(worker.run(drain_grace_s=2.0)) for worker in workers]
        gateway: uvicorn.Server | None = None
        gateway_task: asyncio.Task[None] | None = None
        try:
            gateway = servers.EmbeddedServer(servers.config(create_app(stack_settings), port or free_port()))
            gateway_task = await servers.start(gateway)
            for worker, task in zip(workers, worker_tasks, strict=True):
                await _until_visible(worker, task)
            log.info("dev stack: gateway on port %d, Redis %s (prefix %s)", gateway.config.port, redis_url, prefix)
            yield f"http://127.0.0.1:{gateway.config.port}"
        finally:
            if gateway is not None:
                gateway.should_exit = True
            for worker in workers:
                worker.stop()
            for running in (gateway_task, *worker_tasks):
                if running is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.wait_for(running, timeout=10)
            await critic_client.aclose()


def _vllm_server(cache_dir: Path) -> VllmServer:
    """The real `vllm serve` on the tiny critic (built into `cache_dir` once), not started yet."""
    from workers.critics.tiny_model import SERVED_NAME, build_tiny_critic

    vllm_binary()  # before building anything: VllmMissing says how to install it
    model = cache_dir / "tiny-critic"
    if not (model / "config.json").exists():
        build_tiny_critic(model)
    server = VllmServer(
        serve_args(deployed_args("compose"), model, free_port(), SERVED_NAME), cache_dir / "vllm-dev.log"
    )
    console.print(f"starting vllm serve on the tiny critic (about a minute on a CPU; log: {server.log_path})")
    return server


async def _until_visible(worker: Worker, task: asyncio.Task[None], timeout_s: float = 30) -> None:
    """The gateway refuses jobs of models no live worker serves: wait for the worker's first heartbeat."""
    visible = asyncio.create_task(worker.visible.wait())
    await asyncio.wait({visible, task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        await task  # its own error says why it stopped
    if not worker.visible.is_set():
        visible.cancel()
        raise RuntimeError(
            f"dev worker {worker.id} did not start (no heartbeat within {timeout_s:g} s); see the log above"
        )


def _delete_keys(redis_url: str, prefix: str) -> None:
    try:
        delete_prefix(redis_url, prefix)
    except redis_sync.RedisError as exc:  # best effort: job keys still expire with their TTL
        log.warning("could not delete the dev stack's keys %s:*: %s", prefix, exc)
