"""A second `vllm serve`, started with smaller limits and the guidance backend: what the real
server refuses becomes a clear job error, and the constrained re-ask compiles in guidance too.

Its arguments are docker-compose.yml's with three replaced by name: `--max-model-len
3072` (a critique of a 4000-character prompt no longer fits), `--limit-mm-per-prompt` one
image (an edit critique sends two) and `--structured-outputs-config` guidance (vLLM takes
the backend per server, not per request).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client import REGISTRY

from service.cli.vllm_dev import VllmServer
from service.critic.client import OpenAICritic
from service.settings import Settings
from tests.stack import Stack
from tests.vllm.conftest import VLLM, start_vllm
from workers.critics.tiny_model import SERVED_NAME

pytestmark = VLLM

LIMITS = {
    "--max-model-len": "3072",
    "--limit-mm-per-prompt": '{"image": 1, "video": 0}',
    "--structured-outputs-config": '{"backend": "guidance"}',
}
CRITIC: dict[str, Any] = {"critic_model": SERVED_NAME, "critic_max_tokens": 1024, "critic_timeout_s": 120}


@pytest.fixture(scope="module")
def limited(tiny_critic: Path) -> Iterator[VllmServer]:
    server = start_vllm(tiny_critic, "limits-guidance", replace=LIMITS)
    yield server
    server.stop()


@pytest.fixture
async def stack(redis_url: str, redis_prefix: str, limited: VllmServer) -> AsyncIterator[Stack]:
    async with Stack(redis_url, redis_prefix, limited.base_url, generator="tiny:sd", **CRITIC) as running:
        yield running


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(out, format="PNG")
    return out.getvalue()


def retries() -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "gcr_critic_retries"
        for sample in metric.samples
        if sample.name == "gcr_critic_retries_total"
    )


async def test_the_constrained_reask_compiles_and_ends_under_guidance(limited: VllmServer) -> None:
    settings = Settings(critic_base_url=limited.base_url, **CRITIC)
    async with OpenAICritic(settings) as critic:
        for shade in (0, 120, 240):
            critique = await critic.critique("a blue circle", png((0, shade, 200)))
            assert critique.reasked and critique.model == SERVED_NAME
            assert critique.refined_request and all(" " <= ch <= "~" for ch in critique.refined_request)


async def test_too_many_images_fail_the_job_clearly_and_are_not_retried(stack: Stack) -> None:
    await stack.start_worker(generator="tiny:kontext")
    before = retries()
    job = await stack.client.generate(
        "make the square green", mode="edit", source_image=png((200, 0, 0)), loop={"max_rounds": 3}
    )
    doc = await stack.wait(job.id, timeout_s=120)
    assert doc.status == "failed" and doc.error is not None
    assert doc.error.code == "critic_refused" and not doc.error.retryable
    assert "--limit-mm-per-prompt" in doc.error.message and "At most 1 image(s)" in doc.error.message
    assert retries() == before
    [round_] = doc.rounds  # the edit was made and kept, unjudged
    assert round_.chosen is None and round_.candidates[0].image_url is not None


async def test_a_critique_longer_than_the_context_fails_the_job_clearly(stack: Stack) -> None:
    await stack.start_worker()
    before = retries()
    words = " ".join(f"zq{n}x" for n in range(560))  # ~3,900 characters the tiny BPE reads a few a token
    doc = await stack.wait((await stack.client.submit({"prompt": words})).id, timeout_s=120)
    assert doc.status == "failed" and doc.error is not None
    assert doc.error.code == "critic_refused" and "--max-model-len" in doc.error.message
    assert "maximum context length" in doc.error.message
    assert retries() == before
