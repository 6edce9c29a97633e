"""The refine loop through OpenAI's streaming images API, driven by the `openai` package
(`images.generate(..., stream=True, partial_images=N)` and `images.edit`), at its defaults."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest
from openai.types import ImageGenStreamEvent
from PIL import Image, ImageChops, ImageStat

from tests.e2e.openai_client import openai_client, start_worker_scoring
from tests.stack import Stack
from workers.critics.standin_config import Fault, StandinConfig, StandinRule


async def _streamed(stack: Stack, prompt: str, gcr: dict[str, Any], **options: Any) -> list[ImageGenStreamEvent]:
    """The events of one `images.generate(..., stream=True)` call, read to the end."""
    async with openai_client(stack) as client:
        stream = await client.images.generate(prompt=prompt, stream=True, extra_body={"gcr": gcr}, **options)
        return [event async for event in stream]


def _source_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 40).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


async def _stored(stack: Stack, job_id: str, round_index: int, candidate: int) -> bytes:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.get(f"/jobs/{job_id}/images/{round_index}/{candidate}")
    response.raise_for_status()
    return response.content


def _extra(event: Any) -> dict[str, Any]:
    return dict((event.model_extra or {}).get("gcr") or {})


def _difference(a: bytes, b: bytes) -> float:
    """Mean absolute pixel difference of two encoded images (0: the same picture)."""
    with Image.open(io.BytesIO(a)) as one, Image.open(io.BytesIO(b)) as other:
        return float(sum(ImageStat.Stat(ImageChops.difference(one.convert("RGB"), other.convert("RGB"))).mean) / 3)


async def test_generate_streams_the_last_rounds_then_the_best(stack: Stack) -> None:
    await start_worker_scoring(stack, "harbour", [0.3, 0.5, 0.6])
    loop = {"max_rounds": 3, "threshold": 0.9, "patience": None}
    events = await _streamed(stack, "a harbour at dawn", {"loop": loop}, size="64x64", partial_images=2)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    job_id = _extra(events[-1])["job_id"]
    job = await stack.client.get(job_id)
    assert len(job.rounds) == 3 and job.best is not None and job.best.round == 2
    # Two slots, three rounds: the two most recent, in order, each the round's chosen image.
    partials = events[:2]
    assert [_extra(e)["round"] for e in partials] == [1, 2]
    assert [e.partial_image_index for e in partials] == [0, 1]  # type: ignore[union-attr]
    for event in partials:
        round_ = job.rounds[_extra(event)["round"]]
        assert round_.chosen is not None
        image = base64.b64decode(event.b64_json)
        assert Image.open(io.BytesIO(image)).format == "PNG"
        assert image == await _stored(stack, job_id, round_.index, round_.chosen)
    completed = events[-1]
    best = base64.b64decode(completed.b64_json)
    assert best == await _stored(stack, job_id, job.best.round, job.best.candidate)
    assert (completed.model_extra or {})["revised_prompt"] == job.rounds[2].prompt
    usage = completed.usage  # type: ignore[union-attr]
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert completed.size == "64x64" and completed.output_format == "png"


async def test_a_job_that_stops_early_still_gets_its_last_rounds_in_order(stack: Stack) -> None:
    # max_rounds 5 and 2 slots: rounds 3 and 4 would be streamed live, but it is accepted at round 1.
    await start_worker_scoring(stack, "kite", [0.3, 0.95])
    loop = {"max_rounds": 5, "threshold": 0.9}
    events = await _streamed(stack, "a kite", {"loop": loop}, size="32x32", partial_images=2)
    assert [e.type for e in events][-1] == "image_generation.completed"
    assert [_extra(e)["round"] for e in events[:-1]] == [0, 1]
    assert _extra(events[-1])["stop_reason"] == "accepted"


async def test_partial_images_zero_streams_only_the_result(stack: Stack) -> None:
    await stack.start_worker()
    events = await _streamed(stack, "a kite", {"loop": {"max_rounds": 2}}, size="32x32")
    assert [e.type for e in events] == ["image_generation.completed"]


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
async def test_edits_stream_in_the_asked_format(stack: Stack, output_format: str, pil_format: str) -> None:
    await start_worker_scoring(stack, "blue", [0.3, 0.5])
    async with openai_client(stack) as client:
        stream = await client.images.edit(  # type: ignore[call-overload]
            image=("source.png", _source_png(), "image/png"),
            prompt="make it blue",
            stream=True,
            partial_images=3,
            output_format=output_format,
            output_compression=90,
            extra_body={"gcr": '{"loop": {"max_rounds": 2, "threshold": 0.9, "patience": null}}'},
        )
        events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.partial_image", "image_edit.completed"]
    job = await stack.client.get(_extra(events[-1])["job_id"])
    stored = {r.index: await _stored(stack, job.id, r.index, r.chosen or 0) for r in job.rounds}
    for event in events[:-1]:
        image = base64.b64decode(event.b64_json)
        assert Image.open(io.BytesIO(image)).format == pil_format and event.output_format == output_format
        own = _difference(image, stored[_extra(event)["round"]])
        others = [_difference(image, png) for index, png in stored.items() if index != _extra(event)["round"]]
        assert own < 12 and all(own * 3 < other for other in others), (own, others)  # its round, lossily encoded


async def test_a_job_that_fails_ends_the_stream_with_the_packages_error(stack: Stack) -> None:
    await stack.configure_critic(StandinConfig(faults=[Fault(kind="status", status=503, times=100)]))
    await stack.start_worker(critic_outage_s=0)  # no wait for the critic to come back
    async with openai_client(stack) as client:
        stream = await client.images.generate(
            prompt="a doomed kite", stream=True, partial_images=1, extra_body={"gcr": {"loop": {"max_rounds": 1}}}
        )
        with pytest.raises(openai.APIError) as failed:
            _ = [event async for event in stream]
    assert "critic" in failed.value.message and failed.value.code == "critic_unavailable"


async def test_vllm_omni_extras_and_output_format_without_streaming(stack: Stack) -> None:
    await stack.start_worker()
    async with openai_client(stack) as client:
        result = await client.images.generate(
            prompt="a kite",
            size="48x32",
            output_format="webp",
            output_compression=80,
            extra_body={
                "seed": 1234,
                "num_inference_steps": 3,
                "guidance_scale": 2.5,
                "negative_prompt": "blurry",
                "gcr": {"loop": {"max_rounds": 1}},
            },
        )
        with pytest.raises(openai.BadRequestError) as disagree:
            await client.images.generate(prompt="a kite", extra_body={"seed": 1, "gcr": {"generation": {"seed": 2}}})
    assert result.output_format == "webp" and result.data
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert image.format == "WEBP" and image.size == (48, 32)
    assert result.usage is not None and result.usage.total_tokens > 0
    generation = (await stack.client.get((result.model_extra or {})["gcr"]["job_id"])).spec.generation
    assert (generation.seed, generation.steps, generation.guidance_scale, generation.negative_prompt) == (
        1234,
        3,
        2.5,
        "blurry",
    )
    assert disagree.value.param == "seed" and "disagree" in disagree.value.message


async def test_a_stream_over_critiques_slower_than_the_keep_alive(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    """Keep-alives (SSE comments) flow while the critic thinks; the package skips them."""
    async with Stack(redis_url, redis_prefix, standin_url, sse_keepalive_s=0.2) as stack:
        rules = [StandinRule(instruction="slow", rounds=[0.3, 0.5])]
        await stack.configure_critic(StandinConfig(rules=rules, latency_s=1.0))
        await stack.start_worker()
        gcr = {"loop": {"max_rounds": 2, "threshold": 0.9, "patience": None}}
        body = {"prompt": "a slow kite", "size": "32x32", "stream": True, "partial_images": 2, "gcr": gcr}
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
            http.stream("POST", "/v1/images/generations", json=body) as raw,
        ):
            lines = [line async for line in raw.aiter_lines()]
        assert sum(line.startswith(":") for line in lines) >= 3  # quiet for 2 s: keep-alives were sent
        events = await _streamed(stack, "a slow kite", gcr, size="32x32", partial_images=2)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
