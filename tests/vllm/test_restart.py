"""vLLM SIGKILLed in the middle of a critique, then restarted (with the Kubernetes manifest's
arguments): the job waits for it and finishes with every round once; the worker's
`GCR_CRITIC_WAIT_BEFORE_LOAD` wait and the gateway's /readyz follow the real server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli.main import wait_for_critic
from service.cli.vllm_dev import VllmServer, deployed_args, serve_args
from service.critic.client import OpenAICritic
from tests.stack import Stack
from tests.vllm.conftest import VLLM
from workers.critics.tiny_model import SERVED_NAME

pytestmark = VLLM

CRITIC: dict[str, Any] = {"critic_model": SERVED_NAME, "critic_max_tokens": 1024, "critic_timeout_s": 120}


@pytest.fixture
async def stack(redis_url: str, redis_prefix: str, vllm: VllmServer) -> AsyncIterator[Stack]:
    async with Stack(redis_url, redis_prefix, vllm.base_url, generator="tiny:sd", **CRITIC) as running:
        yield running


async def _readyz(stack: Stack, critic: str, timeout_s: float) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=stack.url) as http, asyncio.timeout(timeout_s):
        while (report := (await http.get("/readyz")).json()).get("critic") != critic:
            await asyncio.sleep(0.2)
    return dict(report)


async def test_vllm_killed_mid_critique_and_restarted(stack: Stack, vllm: VllmServer, tiny_critic: Path) -> None:
    await stack.start_worker(critic_retries=1, critic_breaker_failures=2, critic_breaker_cooldown_s=2)
    loop = {"max_rounds": 2, "threshold": 1.0, "min_scores": {"text_rendering": 4.0}, "patience": None}
    job = await stack.client.submit({"prompt": "a lighthouse on a cliff", "loop": loop})
    async with asyncio.timeout(120):
        while (await stack.client.get(job.id)).stage != "critiquing":
            await asyncio.sleep(0.05)
    vllm.kill()  # as an OOM kill: the critique in flight loses its connection
    killed_at = time.monotonic()
    assert (await _readyz(stack, "down", 60))["ready"] is False

    # A worker set to wait for its critic before loading its model waits while vLLM is away...
    async with OpenAICritic(stack.settings) as probe:
        waiting = asyncio.create_task(wait_for_critic(probe, logging.getLogger("test"), every_s=0.5))
        await asyncio.sleep(3)
        assert not waiting.done()
        assert (await stack.client.get(job.id)).status == "running"
        # ...and vLLM comes back, as the Kubernetes manifest starts it.
        vllm.args = serve_args(deployed_args("k8s"), tiny_critic, vllm.port, SERVED_NAME)
        vllm.start()
        await asyncio.to_thread(vllm.wait_ready)
        outage_s = time.monotonic() - killed_at
        async with asyncio.timeout(10):
            await waiting
    await _readyz(stack, "ok", 30)
    doc = await stack.wait(job.id, timeout_s=240)
    assert doc.status == "succeeded" and doc.stop_reason == "max_rounds", doc.error
    assert [r.index for r in doc.rounds] == [0, 1]  # every round once
    assert all(r.chosen is not None for r in doc.rounds)
    # Round 1's critique waited out the outage rather than failing the job.
    assert doc.rounds[0].timings.critique_ms / 1000 >= outage_s
