"""An in-process gcr stack for integration tests: real Redis, real HTTP, real worker."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn

from gcr import AsyncClient
from gcr.types import JobDocument
from service import servers
from service.critic.client import OpenAICritic
from service.errors import GcrError
from service.gateway.app import create_app
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.queue import JobQueue
from service.jobs.registry import WorkerHeartbeat, WorkerRegistry
from service.servers import free_port
from service.settings import Settings
from workers.critics.standin_config import StandinConfig
from workers.generators import load_generator
from workers.worker import Worker, WorkerConnections, connect_worker


class Stack:
    """Gateway under uvicorn on a loopback port, workers as tasks in this event loop."""

    def __init__(self, redis_url: str, prefix: str, critic_url: str, **overrides: Any) -> None:
        """`critic_url`: the critic's OpenAI-compatible base URL (the stand-in's, or a real vLLM's)."""
        self.critic_url = critic_url
        defaults: dict[str, Any] = {
            "redis_url": redis_url,
            "redis_prefix": prefix,
            "critic_base_url": critic_url,
            "critic_model": "gcr-standin-critic",
            "critic_retries": 1,
            "critic_timeout_s": 10,
            "generator": "sim:0.0",
            "heartbeat_s": 0.2,
            "visibility_timeout_s": 3.0,
            "worker_stale_s": 3.0,
            "batch_window_ms": 5,
            "progress_interval_s": 0.0,
            "auth_disabled": True,
            "rate_limit_per_s": 0,
            "artifact_url": f"file://{tempfile.mkdtemp(prefix='gcr-artifacts-')}",
        }
        self.settings = Settings(**{**defaults, **overrides})
        self.workers: list[tuple[Worker, asyncio.Task[None], OpenAICritic]] = []
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self.url = ""
        self.client: AsyncClient
        self._background: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._redis_client: Any = None

    async def __aenter__(self) -> Stack:
        port = free_port()
        self._server = servers.EmbeddedServer(servers.config(create_app(self.settings), port))
        self._server_task = await servers.start(self._server)
        self.url = f"http://127.0.0.1:{port}"
        self.client = AsyncClient(self.url, max_retries=0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        if self._redis_client is not None:
            await self._redis_client.aclose()
        await self.stop_workers()
        await self.client.aclose()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            await self._server_task

    async def configure_critic(self, config: StandinConfig) -> None:
        base = self.critic_url.removesuffix("/v1")
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{base}/standin/config", content=config.model_dump_json())
            response.raise_for_status()

    async def critic_stats(self) -> dict[str, Any]:
        base = self.critic_url.removesuffix("/v1")
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{base}/standin/stats")
            return dict(response.json())

    async def register_idle_worker(
        self, modes: tuple[str, ...] = ("t2i", "edit"), model: str | None = None, worker_id: str = "idle-test-worker"
    ) -> None:
        """Heartbeat, until the stack stops, as a worker that serves `modes` of `model` (default:
        the stack's) and claims nothing.

        The gateway refuses jobs that no live worker serves; tests that need jobs to stay
        queued (cancel while queued, queue caps, workers started later) register this
        instead of a real worker. Its info says what it is."""
        registry = WorkerRegistry(self._redis(), Keys(self.settings.redis_prefix))
        # By default it announces the stack's model: a real worker started later claims what it let in.
        model = model or self.settings.model_name or self.settings.generator
        # Its queues' consumer groups, as a real worker makes them before its first heartbeat.
        await JobQueue(self._redis(), Keys(self.settings.redis_prefix), model, modes).ensure_groups()
        heartbeat = WorkerHeartbeat(id=worker_id, model=model, modes=list(modes), generator="none")

        async def beat() -> None:
            # Stopped by an event, never cancelled mid-command (see workers/runner.py).
            while not self._stopping.is_set():
                with contextlib.suppress(GcrError):
                    await registry.heartbeat(heartbeat, ttl_s=5)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), min(0.5, self.settings.worker_stale_s / 3))

        await registry.heartbeat(heartbeat, ttl_s=5)
        self._background.append(asyncio.create_task(beat()))

    def _redis(self) -> Any:
        if self._redis_client is None:
            self._redis_client = connect(self.settings.redis_url)
        return self._redis_client

    async def start_worker(
        self,
        *,
        wait: bool = True,
        redis_client: Any = None,
        adapt: Callable[[WorkerConnections], WorkerConnections] | None = None,
        **overrides: Any,
    ) -> Worker:
        """A worker of the stack's settings with `overrides`; `redis_client` replaces its Redis
        client, and `adapt` may swap any of its connections for a failing one."""
        settings = self.settings.model_copy(update={"worker_id": f"w{len(self.workers)}", **overrides})
        generator = await asyncio.to_thread(load_generator, settings)
        critic = OpenAICritic(settings)
        connections = connect_worker(settings, generator, redis_client)
        worker = Worker(settings, generator, critic, adapt(connections) if adapt else connections)
        task = asyncio.create_task(worker.run(drain_grace_s=2.0))
        self.workers.append((worker, task, critic))
        if wait:
            await self.wait_for_heartbeat(worker, task)
        return worker

    async def wait_for_heartbeat(self, worker: Worker, task: asyncio.Task[None], timeout_s: float = 10.0) -> None:
        """Until the gateway can see the worker (it refuses jobs of modes no live worker serves)."""
        visible = asyncio.create_task(worker.visible.wait())
        await asyncio.wait({visible, task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            await task
        if not worker.visible.is_set():
            visible.cancel()
            raise TimeoutError(f"worker {worker.id} sent no heartbeat within {timeout_s}s")

    async def stop_workers(self) -> None:
        for worker, task, critic in self.workers:
            worker.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=10)
            await critic.aclose()
        self.workers.clear()

    async def submit(self, prompt: str, **body: Any) -> str:
        return (await self.client.submit({"prompt": prompt, **body})).id

    async def wait(self, job_id: str, timeout_s: float = 30.0) -> JobDocument:
        """Poll until the job is terminal."""
        async with asyncio.timeout(timeout_s):
            while True:
                doc = await self.client.get(job_id)
                if doc.status in ("succeeded", "failed", "cancelled", "expired"):
                    return doc
                await asyncio.sleep(0.05)
