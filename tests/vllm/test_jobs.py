"""Jobs through gateway, worker and the real `vllm serve`, asserting on what the rounds stored.

The critic is a random-weight Qwen3-VL: its first answer never parses, so every round
below lives on the constrained re-ask (the bounded regex, xgrammar). The generators are
the tiny diffusers pipelines (real code path, random weights, 32 px).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from gcr.types import IMAGE_FAITHFULNESS, JobDocument, TokenUsage
from service.cli.vllm_dev import VllmServer
from service.critic.client import CriticLoad, OpenAICritic
from service.errors import CritiqueUnparseable
from service.settings import Settings
from tests.stack import Stack
from tests.vllm.conftest import VLLM
from workers.critics.tiny_model import SERVED_NAME

pytestmark = VLLM

# Long enough for the tiny CLIP tokenizer (characters, no merges) to cut a refinement at 77 tokens.
PROMPT = "a red bicycle leaning against a blue wall"
# Random weights give extreme scores, 4.0 everywhere now and then: acceptance also asks for
# a text-rendering score of 4, which this critic gives as N/A for prompts without text.
NEVER_ACCEPT = {"threshold": 1.0, "min_scores": {"text_rendering": 4.0}, "patience": None}


def critic_settings(vllm: VllmServer) -> dict[str, Any]:
    return {
        "critic_model": SERVED_NAME,
        "critic_max_tokens": 1024,
        "critic_timeout_s": 120,
        "critic_retries": 2,
    }


@pytest.fixture
async def stack(redis_url: str, redis_prefix: str, vllm: VllmServer) -> AsyncIterator[Stack]:
    async with Stack(redis_url, redis_prefix, vllm.base_url, generator="tiny:sd", **critic_settings(vllm)) as running:
        yield running


def png(colour: tuple[int, int, int], size: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def tokens_counted(kind: str) -> float:
    return REGISTRY.get_sample_value("gcr_critic_tokens_total", {"kind": kind}) or 0.0


def assert_judged_by_vllm(doc: JobDocument) -> None:
    """Every round judged by the served model, on the re-ask, with its tokens counted."""
    for round_ in doc.rounds:
        assert round_.chosen is not None
        critique = round_.candidates[round_.chosen].critique
        assert critique is not None and critique.model == SERVED_NAME
        assert critique.reasked, "a random-weight model's first answer never parses"
        assert critique.usage is not None and critique.usage["completion_tokens"] > 0
        assert round_.critic_usage is not None and round_.critic_usage.total_tokens == critique.usage["total_tokens"]
    assert doc.critic_model == SERVED_NAME
    assert doc.summary is not None
    assert doc.summary.critic_usage == sum((r.critic_usage for r in doc.rounds if r.critic_usage), TokenUsage())


async def test_a_text_to_image_job(stack: Stack) -> None:
    await stack.start_worker()
    prompt_before, completion_before = tokens_counted("prompt"), tokens_counted("completion")
    job = await stack.client.submit({"prompt": PROMPT, "loop": {"max_rounds": 2, **NEVER_ACCEPT}})
    doc = await stack.wait(job.id, timeout_s=240)
    assert doc.status == "succeeded" and doc.stop_reason == "max_rounds", doc.error
    assert [r.index for r in doc.rounds] == [0, 1]
    assert_judged_by_vllm(doc)
    assert doc.summary is not None and doc.summary.critic_usage is not None
    assert tokens_counted("prompt") - prompt_before == doc.summary.critic_usage.prompt_tokens
    assert tokens_counted("completion") - completion_before == doc.summary.critic_usage.completion_tokens
    # Round 2 generates from round 1's refined request, as SD's CLIP tokenizer reads it.
    first, second = doc.rounds
    assert first.prompt == PROMPT and first.prompt_fit is not None and not first.prompt_fit.cut
    refined = first.candidates[0].critique.refined_request  # type: ignore[union-attr]
    assert refined and "<" not in refined and "#" not in refined
    fit = second.prompt_fit
    assert fit is not None and fit.encoder == "CLIPTokenizer" and fit.limit == 77
    if fit.cut:  # the bounded refinement (~140 characters) is longer than 77 character tokens
        assert fit.tokens > 77 and fit.dropped
        assert refined.startswith(second.prompt) and refined.endswith(fit.dropped)
    else:
        assert second.prompt == refined
    for round_ in doc.rounds:
        assert (await stack.client.image(doc.id, round_.index, 0)).startswith(b"\x89PNG")


async def test_an_edit_job_sends_two_images_per_critique(stack: Stack) -> None:
    await stack.start_worker(generator="tiny:kontext")
    job = await stack.client.generate(
        "make the square green", mode="edit", source_image=png((200, 0, 0)), loop={"max_rounds": 1}
    )
    doc = await stack.wait(job.id, timeout_s=240)
    assert doc.status == "succeeded", doc.error
    assert_judged_by_vllm(doc)
    critique = doc.rounds[0].candidates[0].critique
    assert critique is not None
    # The edit template (source first, edited second) judges image faithfulness too.
    assert critique.score(IMAGE_FAITHFULNESS) is not None


async def test_an_auto_job_hops_to_an_edit_worker(stack: Stack) -> None:
    await stack.start_worker()
    await stack.start_worker(generator="tiny:kontext", model_name="tiny-edit")
    loop = {"max_rounds": 2, "strategy": "auto", "edit_above": 0.0, "edit_model": "tiny-edit", **NEVER_ACCEPT}
    job = await stack.client.submit({"prompt": PROMPT, "loop": loop})
    doc = await stack.wait(job.id, timeout_s=240)
    assert doc.status == "succeeded", doc.error
    generated, edited = doc.rounds
    assert (generated.action, generated.model) == ("generate", "tiny:sd")
    assert (edited.action, edited.model) == ("edit", "tiny-edit")
    assert edited.edited_from is not None and edited.edited_from.round == 0
    assert_judged_by_vllm(doc)
    # A text-to-image job is judged as text-to-image, whatever made the image.
    assert all(r.candidates[0].critique.score(IMAGE_FAITHFULNESS) is None for r in doc.rounds)  # type: ignore[union-attr]


@pytest.mark.parametrize("with_source", [False, True], ids=["t2i", "edit"])
async def test_the_first_answer_does_not_parse_and_the_constrained_reask_does(
    vllm: VllmServer, with_source: bool
) -> None:
    settings = Settings(critic_base_url=vllm.base_url, **critic_settings(vllm))
    source = png((0, 0, 200)) if with_source else None
    async with OpenAICritic(settings.model_copy(update={"critic_structured_outputs": False})) as free:
        with pytest.raises(CritiqueUnparseable) as unconstrained:
            await free.critique("a green square", png((0, 200, 0)), source_image=source)
    assert unconstrained.value.usage is not None and unconstrained.value.usage["completion_tokens"] > 0
    async with OpenAICritic(settings) as critic:
        for shade in (0, 100, 200):
            critique = await critic.critique("a green square", png((0, 200, shade)), source_image=source)
            assert critique.reasked and 0.0 <= critique.overall <= 1.0
            # Both answers' tokens: the first ran on (to max_tokens, as a rambling model does), the
            # re-ask ended within max_tokens, as the bounded regex guarantees (a cut one raises).
            assert critique.usage is not None and critique.usage["completion_tokens"] < 2 * 1024
            assert critique.refined_request


async def test_a_critique_that_fails_for_good_keeps_its_images(
    redis_url: str, redis_prefix: str, vllm: VllmServer
) -> None:
    """Without the constrained re-ask a random-weight model never parses: the round is stored
    unjudged, the job ends failed with the reason, and its image downloads."""
    overrides = {**critic_settings(vllm), "critic_structured_outputs": False}
    async with Stack(redis_url, redis_prefix, vllm.base_url, generator="tiny:sd", **overrides) as stack:
        await stack.start_worker()
        doc = await stack.wait((await stack.client.submit({"prompt": PROMPT})).id, timeout_s=240)
        assert doc.status == "failed" and doc.stop_reason == "failed"
        assert doc.error is not None and doc.error.code == "critique_unparseable"
        assert "could not be judged" in doc.error.message and "after one re-ask" in doc.error.message
        [round_] = doc.rounds
        assert round_.chosen is None and round_.candidates[0].image_url is not None
        assert round_.critic_usage is not None and round_.critic_usage.completion_tokens > 0
        assert (await stack.client.image(doc.id, 0, 0)).startswith(b"\x89PNG")


async def test_openai_usage_counts_the_critics_tokens(stack: Stack) -> None:
    await stack.start_worker()
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=240) as client:
        result = await client.images.generate(
            prompt=PROMPT, size="32x32", extra_body={"gcr": {"loop": {"max_rounds": 1}}}
        )
    doc = await stack.client.get(result.model_extra["gcr"]["job_id"])  # type: ignore[index]
    assert doc.summary is not None and doc.summary.critic_usage is not None
    assert result.usage is not None
    assert result.usage.input_tokens == doc.summary.critic_usage.prompt_tokens > 0
    assert result.usage.output_tokens == doc.summary.critic_usage.completion_tokens > 0


async def test_the_served_model_and_its_health_answer(vllm: VllmServer) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{vllm.root_url}/health")).status_code == 200
        models = (await http.get(f"{vllm.base_url}/models")).json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]


async def test_the_critique_limit_reads_vllms_own_load_gauges(vllm: VllmServer) -> None:
    critic = OpenAICritic(Settings(critic_base_url=vllm.base_url, **critic_settings(vllm)))
    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    try:
        assert await critic.load() == CriticLoad(running=0, waiting=0)
        async with httpx.AsyncClient(timeout=120) as http:
            answer = asyncio.create_task(http.post(f"{vllm.base_url}/chat/completions", json=body))
            seen = CriticLoad(running=0, waiting=0)
            while not answer.done() and seen.running == 0:
                seen = await critic.load() or seen
                await asyncio.sleep(0.02)
            assert (await answer).status_code == 200
        assert seen.running == 1, "vLLM's /metrics counts the request it decodes"
    finally:
        await critic.aclose()
