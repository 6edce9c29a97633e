"""One `openai` call makes one job: the package at its DEFAULT settings (max_retries=2, no
idempotency key of its own) against a real stack, counting the jobs stored in Redis."""

from __future__ import annotations

import asyncio
import contextlib

import openai
import pytest
import redis.asyncio as redis

from service.jobs.keys import Keys
from tests.e2e.openai_client import openai_client, outlasted_wait, stack_slower_than_the_wait
from tests.stack import Stack
from workers.critics.standin_config import Fault, StandinConfig


async def _jobs(stack: Stack) -> int:
    client = redis.Redis.from_url(stack.settings.redis_url)
    try:
        return int(await client.zcard(Keys(stack.settings.redis_prefix).all_jobs()))
    finally:
        await client.aclose()


def _default_client(stack: Stack) -> openai.AsyncOpenAI:
    # Nothing but the address and a key: every other setting is the package's default.
    return openai_client(stack)


async def test_a_wait_that_runs_out_makes_one_job_not_three(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    async with stack_slower_than_the_wait(redis_url, redis_prefix, standin_url, "sim:1.5") as stack:
        async with _default_client(stack) as client:
            assert client.max_retries == 2  # the package's default, which retried 504s into new jobs
            slow = await outlasted_wait(client)
        assert await _jobs(stack) == 1
        response = slow.response
        assert response.status_code == 504 and response.headers["x-should-retry"] == "false"
        assert slow.code == "job_still_running"
        assert (await stack.wait(response.headers["X-Gcr-Job-Id"])).status == "succeeded"


async def test_a_failed_job_makes_one_job_even_when_its_error_is_retryable(stack: Stack) -> None:
    # Every critique fails with a 503: the job ends failed with the retryable `critic_unavailable`.
    await stack.configure_critic(StandinConfig(faults=[Fault(kind="status", status=503, times=100)]))
    await stack.start_worker(critic_outage_s=0)  # no wait for the critic to come back
    async with _default_client(stack) as client:
        with pytest.raises(openai.APIStatusError) as failed:
            await client.images.generate(prompt="a doomed one", extra_body={"gcr": {"loop": {"max_rounds": 1}}})
    assert await _jobs(stack) == 1
    assert failed.value.response.headers["x-should-retry"] == "false"


async def test_an_idempotency_key_on_v1_returns_the_same_job(stack: Stack) -> None:
    await stack.start_worker()
    async with _default_client(stack) as client:
        first = await client.images.with_raw_response.generate(
            prompt="a kite", size="32x32", extra_headers={"Idempotency-Key": "kite-1"}
        )
        again = await client.images.with_raw_response.generate(
            prompt="a kite", size="32x32", extra_headers={"Idempotency-Key": "kite-1"}
        )
        with pytest.raises(openai.BadRequestError) as reused:
            await client.images.generate(prompt="another", extra_headers={"Idempotency-Key": "kite-1"})
    assert first.headers["X-Gcr-Job-Id"] == again.headers["X-Gcr-Job-Id"]
    assert again.parse().data == first.parse().data
    assert reused.value.param == "Idempotency-Key"
    assert await _jobs(stack) == 1


async def test_a_v1_call_past_the_stream_limit_is_refused_before_it_makes_a_job(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    """/v1 waits and streams hold stream slots like GET /events; past the limit the call is a
    retryable 429 decided before any job exists, so the package's retries make no job."""
    async with Stack(redis_url, redis_prefix, standin_url, max_open_streams_per_key=1) as stack:
        await stack.register_idle_worker()  # accepted and never run: the first call keeps waiting
        async with _default_client(stack) as client:
            holding = asyncio.create_task(client.images.generate(prompt="holds the one slot"))
            async with asyncio.timeout(10):
                while await _jobs(stack) < 1:
                    await asyncio.sleep(0.05)
            with pytest.raises(openai.RateLimitError) as refused:
                await client.with_options(max_retries=0).images.generate(prompt="one too many")
            assert refused.value.code == "too_many_streams"
            assert await _jobs(stack) == 1
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding


async def test_the_openai_package_asks_for_refine_by_editing_through_gcr_loop(stack: Stack) -> None:
    """`extra_body={"gcr": {"loop": {"strategy": "edit"}}}` at the package's defaults: one job,
    which generates on the text-to-image model and then edits on the edit model."""
    await stack.start_worker(model_name="painter")
    await stack.start_worker(model_name="editor")
    loop = {"max_rounds": 2, "threshold": 1.0, "patience": None, "strategy": "edit", "edit_model": "editor"}
    async with _default_client(stack) as client:
        result = await client.images.generate(prompt="a fox", model="painter", extra_body={"gcr": {"loop": loop}})
    assert await _jobs(stack) == 1
    doc = await stack.client.get(result.model_extra["gcr"]["job_id"])  # type: ignore[index]
    assert [(r.action, r.model) for r in doc.rounds] == [("generate", "painter"), ("edit", "editor")]
    assert result.data is not None and result.data[0].revised_prompt == doc.rounds[doc.best.round].prompt  # type: ignore[union-attr]
