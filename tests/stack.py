"""An in-process gcr stack for integration tests: real Redis, real HTTP, real worker."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import uvicorn

from service.api import create_app
from service.client import GcrClient
from service.devstack import free_port
from service.protocol import JobDocument
from service.settings import Settings
from workers.critics.client import OpenAICritic
from workers.critics.standin_config import StandinConfig
from workers.generators import load_generator
from workers.worker import Worker


class Stack:
    """Gateway under uvicorn on a loopback port, workers as tasks in this event loop."""

    def __init__(self, redis_url: str, prefix: str, standin_url: str, **overrides: Any) -> None:
        self.standin_url = standin_url
        self.settings = Settings(
            redis_url=redis_url,
            redis_prefix=prefix,
            critic_base_url=standin_url,
            critic_model="gcr-standin-critic",
            critic_retries=1,
            critic_timeout_s=10,
            generator="sim:0.0",
            heartbeat_s=0.2,
            visibility_timeout_s=3.0,
            worker_stale_s=3.0,
            batch_window_ms=5,
            progress_interval_s=0.0,
            **{"auth_disabled": True, "rate_limit_per_s": 0, **overrides},
        )
        self.workers: list[tuple[Worker, asyncio.Task[None], OpenAICritic]] = []
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self.url = ""
        self.client: GcrClient

    async def __aenter__(self) -> Stack:
        port = free_port()
        config = uvicorn.Config(create_app(self.settings), host="127.0.0.1", port=port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._server_task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._server_task.done():
                await self._server_task
            await asyncio.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        self.client = GcrClient(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_workers()
        await self.client.aclose()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            await self._server_task

    async def configure_critic(self, config: StandinConfig) -> None:
        base = self.standin_url.removesuffix("/v1")
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{base}/standin/config", content=config.model_dump_json())
            response.raise_for_status()

    async def critic_stats(self) -> dict[str, Any]:
        base = self.standin_url.removesuffix("/v1")
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{base}/standin/stats")
            return dict(response.json())

    async def start_worker(self, **overrides: Any) -> Worker:
        settings = self.settings.model_copy(update={"worker_id": f"w{len(self.workers)}", **overrides})
        generator = await asyncio.to_thread(load_generator, settings)
        critic = OpenAICritic(settings)
        worker = Worker(settings, generator, critic)
        task = asyncio.create_task(worker.run(drain_grace_s=2.0))
        self.workers.append((worker, task, critic))
        return worker

    async def stop_workers(self) -> None:
        for worker, task, critic in self.workers:
            worker.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=10)
            await critic.aclose()
        self.workers.clear()

    async def submit(self, prompt: str, **body: Any) -> str:
        return await self.client.submit({"prompt": prompt, **body})

    async def wait(self, job_id: str, timeout_s: float = 30.0) -> JobDocument:
        """Poll until the job is terminal."""
        async with asyncio.timeout(timeout_s):
            while True:
                doc = await self.client.job(job_id)
                if doc.status in ("succeeded", "failed", "cancelled", "expired"):
                    return doc
                await asyncio.sleep(0.05)
