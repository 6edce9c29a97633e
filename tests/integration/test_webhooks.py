"""Webhooks: signed, retried, recorded on the job; private targets refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.webhooks import SIGNATURE_HEADER, sign, verify_signature
from tests.stack import Stack, free_port

SECRET = "s3cret"


class Receiver:
    """A real HTTP receiver on loopback that fails the first `fail_first` deliveries."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[bytes, str]] = []
        self.url = ""

    async def hook(self, request: Request) -> Response:
        self.received.append((await request.body(), request.headers.get(SIGNATURE_HEADER, "")))
        return Response(status_code=500 if len(self.received) <= self.fail_first else 204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(fail_first=1)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/hook", rec.hook, methods=["POST"])]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    server.should_exit = True
    await task


def test_signature_round_trip_and_tampering() -> None:
    body = b'{"id": "x"}'
    header = sign(SECRET, body)
    assert verify_signature(SECRET, body, header)
    assert not verify_signature(SECRET, body + b" ", header)
    assert not verify_signature("other", body, header)
    assert not verify_signature(SECRET, body, sign(SECRET, body, timestamp=1))  # too old: replay
    assert not verify_signature(SECRET, body, "garbage")


async def test_webhook_is_signed_retried_and_recorded(
    redis_url: str, redis_prefix: str, standin_url: str, receiver: Receiver
) -> None:
    async with Stack(
        redis_url, redis_prefix, standin_url, webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff_s=0.05
    ) as stack:
        await stack.start_worker()
        job_id = await stack.submit("a kite", loop={"max_rounds": 1}, callback_url=receiver.url)
        await stack.wait(job_id)
        async with asyncio.timeout(10):
            while (doc := await stack.client.job(job_id)).webhook is None:
                await asyncio.sleep(0.05)
    assert doc.webhook.state == "delivered" and doc.webhook.attempts == 2
    body, header = receiver.received[-1]
    assert verify_signature(SECRET, body, header)
    assert b'"status": "succeeded"' in body and job_id.encode() in body


async def test_private_callback_urls_are_refused_at_submit(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        for url in ("http://127.0.0.1/x", "http://10.0.0.1/x", "http://169.254.169.254/x", "http://localhost/x"):
            response = await http.post("/generate", json={"prompt": "p", "callback_url": url})
            assert response.status_code == 422, url
            assert response.json()["error"]["field"] == "callback_url"
