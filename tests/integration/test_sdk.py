"""The Python SDK (`gcr.Client`, `gcr.AsyncClient`) against a real stack, and its contract at
the HTTP seam (typed errors, retries that honour Retry-After, safe retried submits)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import gcr
from gcr import errors
from tests.interpreter import modules_loaded_by
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule

LOOP = {"max_rounds": 3, "threshold": 0.8}


def _rule() -> StandinConfig:
    return StandinConfig(rules=[StandinRule(instruction="lighthouse", rounds=[0.5, 0.9])])


async def test_async_client_generates_and_waits(stack: Stack) -> None:
    await stack.configure_critic(_rule())
    await stack.start_worker()
    seen: list[str] = []
    async with gcr.AsyncClient(stack.url) as client:
        job = await client.generate("a lighthouse", loop=LOOP, wait=True, on_event=lambda e: seen.append(e.type))
        assert job.status == "succeeded" and len(job.rounds) == 2 and job.best is not None
        assert seen[-1] == "end" and "round" in seen
        png = await client.best_image(job.id)
        assert png.startswith(b"\x89PNG") and png == await client.image(job.id, job.best.round, job.best.candidate)
        with pytest.raises(errors.NotFoundError) as missing:
            await client.get("A" * 22)
        assert missing.value.status == 404 and not missing.value.retryable


async def test_sync_client_generates_and_waits(stack: Stack) -> None:
    await stack.configure_critic(_rule())
    await stack.start_worker()

    def run() -> gcr.JobDocument:
        with gcr.Client(stack.url) as client:
            return client.generate("a lighthouse, sync", loop=LOOP, wait=True)

    job = await asyncio.to_thread(run)  # a blocking client: off this loop, where the stack runs
    assert job.status == "succeeded" and job.best is not None and job.best.round == 1


async def test_errors_are_typed_by_code(stack: Stack) -> None:
    async with gcr.AsyncClient(stack.url, max_retries=0) as client:
        with pytest.raises(errors.NoWorkerError) as nobody:
            await client.generate("nobody serves this")
        assert nobody.value.retryable and nobody.value.code == "no_worker"
        await stack.start_worker()
        with pytest.raises(errors.InvalidInputError) as bad:
            await client.generate("x", loop={"max_rounds": 0})
        assert bad.value.field == "loop.max_rounds"
    async with gcr.AsyncClient("http://127.0.0.1:9") as client:
        with pytest.raises(errors.APIConnectionError, match=r"cannot reach the gateway at http://127\.0\.0\.1:9"):
            await client.get("A" * 22)


def test_503_and_429_are_retried_after_retry_after_with_one_idempotency_key() -> None:
    answers = [
        httpx.Response(
            503, headers={"Retry-After": "0"}, json={"error": {"code": "store_unavailable", "message": "x"}}
        ),
        httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"code": "queue_full", "message": "y"}}),
        httpx.Response(202, json=json.loads(_queued_job())),
    ]
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        return answers.pop(0)

    with gcr.Client(
        "http://gateway", http_client=httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(handler))
    ) as client:
        job = client.generate("retried")
    assert job.id == "J" * 22 and len(keys) == 3 and len(set(keys)) == 1 and keys[0]


def test_a_final_error_is_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(422, json={"error": {"code": "invalid_input", "message": "no", "field": "prompt"}})

    transport = httpx.MockTransport(handler)
    with gcr.Client(http_client=httpx.Client(base_url="http://gateway", transport=transport)) as client:
        with pytest.raises(errors.InvalidInputError):
            client.generate("x")
    assert len(calls) == 1


def test_a_502_the_table_calls_final_is_not_retried() -> None:
    """critique_unparseable is a 502, a status the SDK retries; the code table says a retry
    cannot help, and each retry of POST /critique would be another long reasoning call."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(502, json={"error": {"code": "critique_unparseable", "message": "no scores"}})

    transport = httpx.MockTransport(handler)
    with gcr.Client(http_client=httpx.Client(base_url="http://gateway", transport=transport)) as client:
        with pytest.raises(errors.CriticError):
            client.critique("a red apple", b"\x89PNG\r\n\x1a\n")
    assert len(calls) == 1


def _queued_job() -> str:
    return json.dumps(
        {"id": "J" * 22, "status": "queued", "spec": {"prompt": "retried"}, "created_at": 1.0, "links": {}}
    )


def test_importing_the_sdk_pulls_no_server_stack_or_torch() -> None:
    # (click and rich are left out: httpx itself imports them, for its own CLI, whenever they are installed.)
    heavy = ("fastapi", "starlette", "uvicorn", "redis", "torch", "diffusers", "pydantic_settings")
    assert modules_loaded_by("import gcr", heavy) == []


def test_a_misspelt_job_option_is_a_type_error_not_a_silent_default() -> None:
    with gcr.Client("http://127.0.0.1:9") as client, pytest.raises(TypeError, match="lopo"):
        client.generate("x", lopo={"max_rounds": 2})  # type: ignore[call-arg]
