"""The OpenAI images API, driven by the official `openai` package as users' tools drive it."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.openai_client import openai_client, outlasted_wait, stack_slower_than_the_wait, start_worker_scoring
from tests.stack import Stack


def _client(stack: Stack) -> openai.AsyncOpenAI:
    return openai_client(stack, max_retries=0)


def _png(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


async def test_images_generate_runs_the_loop_and_returns_the_best_png(stack: Stack) -> None:
    await start_worker_scoring(stack, "harbour", [0.4, 0.9])
    async with _client(stack) as client:
        result = await client.images.generate(
            prompt="a harbour at dawn",
            size="96x64",
            response_format="b64_json",
            extra_body={"gcr": {"loop": {"max_rounds": 4, "threshold": 0.8}}},
        )
    assert result.data is not None
    [image] = result.data
    assert image.b64_json is not None
    png = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
    assert png.format == "PNG" and png.size == (96, 64)
    assert image.revised_prompt == "a harbour at dawn [refined r0 c0]"  # the prompt of the round that made it
    extra = result.model_extra or {}
    job = await stack.client.get(extra["gcr"]["job_id"])
    assert len(job.rounds) == 2 and job.stop_reason == "accepted"


async def test_images_edit_and_url_responses(stack: Stack) -> None:
    await stack.start_worker()  # the simulated generator serves edits too
    async with _client(stack) as client:
        result = await client.images.edit(
            image=("source.png", _png(), "image/png"),
            prompt="make it blue",
            n=2,
            response_format="url",
            extra_body={"gcr": '{"loop": {"max_rounds": 1}}'},
        )
    data = result.data or []
    assert len(data) == 2 and all(d.url and d.revised_prompt == "make it blue" for d in data)
    async with httpx.AsyncClient() as http:
        fetched = await http.get(data[0].url or "")
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (64, 48)


async def test_models_lists_what_live_workers_serve_and_unknown_models_are_refused(stack: Stack) -> None:
    await stack.start_worker()
    async with _client(stack) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["sim:0.0"]
        with pytest.raises(openai.BadRequestError) as refused:  # OpenAI answers invalid requests 400
            await client.images.generate(prompt="x", model="no-such-model")
    assert "no-such-model" in str(refused.value) and "sim:0.0" in str(refused.value)


async def test_a_job_that_outlasts_the_wait_names_the_job_to_poll(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    async with stack_slower_than_the_wait(redis_url, redis_prefix, standin_url, "sim:2.0") as stack:
        async with _client(stack) as client:
            slow = await outlasted_wait(client)
        assert slow.status_code == 504
        body = slow.body
        assert isinstance(body, dict) and body["code"] == "job_still_running"
        job_id = slow.response.headers["X-Gcr-Job-Id"]
        assert job_id in body["message"]
        assert (await stack.wait(job_id)).status == "succeeded"


async def test_v1_answers_the_image_the_job_names_its_best_when_scores_tie(stack: Stack) -> None:
    """Two candidates of equal overall score: the loop's tie-break (text faithfulness) picks the
    second, and /v1 answers with that one, as `gcr.best` says (it used to answer the first)."""
    from workers.critics.standin_config import StandinConfig

    tie = [
        {"overall": 0.5, "scores": {"text_faithfulness": 2.0, "physical_quality": 4.0}},
        {"overall": 0.5, "scores": {"text_faithfulness": 4.0, "physical_quality": 2.0}},
    ]
    await stack.configure_critic(StandinConfig.model_validate({"rules": [{"instruction": "tie", "rounds": [tie]}]}))
    await stack.start_worker()
    async with _client(stack) as client:
        result = await client.images.generate(
            prompt="a tie", extra_body={"gcr": {"loop": {"max_rounds": 1, "candidates_per_round": 2}}}
        )
    gcr = result.model_extra["gcr"]  # type: ignore[index]
    assert (gcr["best"]["round"], gcr["best"]["candidate"]) == (0, 1)
    doc = await stack.client.get(gcr["job_id"])
    assert doc.rounds[0].chosen == 1 and doc.best is not None and doc.best.candidate == 1
    assert result.data is not None and result.data[0].b64_json is not None
    assert base64.b64decode(result.data[0].b64_json) == await stack.client.image(doc.id, 0, 1)
