"""Webhooks: signed, retried, recorded on the job; private targets refused."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.keys import Keys
from service.protocol import GenerateRequest, JobDocument
from service.redis_client import connect
from service.servers import serving
from service.settings import Settings
from service.store import JobStore
from service.webhooks import SIGNATURE_HEADER, WebhookNotifier, sign, verify_signature
from tests.stack import Stack

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
    async with serving(Starlette(routes=[Route("/hook", rec.hook, methods=["POST"])])) as url:
        rec.url = f"{url}/hook"
        yield rec


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
            while (doc := await stack.client.get(job_id)).webhook is None:
                await asyncio.sleep(0.05)
    assert doc.webhook.state == "delivered" and doc.webhook.attempts == 2
    body, header = receiver.received[-1]
    assert verify_signature(SECRET, body, header)
    assert b'"status": "succeeded"' in body and job_id.encode() in body
    sent = json.loads(body)
    # absolute without GCR_PUBLIC_URL: the base URL the client submitted to
    assert sent["job_url"] == f"{stack.url}/jobs/{job_id}"
    assert sent["best"]["image_url"] == f"{stack.url}/jobs/{job_id}/images/0/0"


async def test_private_callback_urls_are_refused_at_submit(stack: Stack) -> None:
    await stack.start_worker()  # so that the only reason to refuse is the URL
    async with httpx.AsyncClient(base_url=stack.url) as http:
        for url in ("http://127.0.0.1/x", "http://10.0.0.1/x", "http://169.254.169.254/x", "http://localhost/x"):
            response = await http.post("/generate", json={"prompt": "p", "callback_url": url})
            assert response.status_code == 422, url
            error = response.json()["error"]
            assert error["field"] == "callback_url"
            assert "GCR_WEBHOOK_ALLOW_PRIVATE" in error["message"]


MALFORMED = ("http://127.0.0.1:99999/", "http://host:abc/", "http://[::1/")


@pytest.mark.parametrize("allow_private", [False, True])
async def test_malformed_callback_urls_answer_422(
    redis_url: str, redis_prefix: str, standin_url: str, allow_private: bool
) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, webhook_allow_private=allow_private) as stack:
        await stack.start_worker()
        async with httpx.AsyncClient(base_url=stack.url) as http:
            for url in MALFORMED:
                response = await http.post("/generate", json={"prompt": "p", "callback_url": url})
                assert response.status_code == 422, (url, response.text)
                error = response.json()["error"]
                assert error["code"] == "invalid_input" and error["field"] == "callback_url", url


async def _stored_job(store: JobStore, job_id: str, callback_url: str) -> JobDocument:
    """A finished job that holds `callback_url` as it was stored (e.g. before a stricter check)."""
    spec = GenerateRequest.model_construct(
        **{**GenerateRequest(prompt="p", model="sim:0.0").__dict__, "callback_url": callback_url}
    )
    doc = JobDocument(id=job_id, status="succeeded", spec=spec, created_at=time.time(), finished_at=time.time())
    await store.create(doc)
    return await store.get(job_id)


@pytest.fixture
async def notifier_and_store(redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[WebhookNotifier, JobStore]]:
    settings = Settings(
        redis_url=redis_url, redis_prefix=redis_prefix, webhook_allow_private=True, webhook_backoff_s=0.01
    )
    client = connect(redis_url)
    store = JobStore(client, Keys(redis_prefix), 600)
    notifier = WebhookNotifier(settings, store)
    yield notifier, store
    await notifier.aclose()
    await client.aclose()


async def test_a_stored_bad_port_callback_ends_failed_on_the_job(
    notifier_and_store: tuple[WebhookNotifier, JobStore],
) -> None:
    notifier, store = notifier_and_store
    doc = await _stored_job(store, "bad-port-job-0001", "http://127.0.0.1:99999/hook")
    status = await notifier.deliver(doc, "http://127.0.0.1:99999/hook")
    assert status.state == "failed" and status.last_error and "99999" in status.last_error
    recorded = (await store.get(doc.id)).webhook
    assert recorded is not None and recorded.state == "failed" and recorded.last_error == status.last_error


@pytest.mark.parametrize(
    "error",
    [ValueError("port out of range"), ExceptionGroup("connect", [OverflowError("port must be 0-65535")])],
)
async def test_any_delivery_error_is_recorded_and_the_task_ends_cleanly(
    notifier_and_store: tuple[WebhookNotifier, JobStore], error: Exception
) -> None:
    notifier, store = notifier_and_store

    def explode(request: httpx.Request) -> httpx.Response:
        raise error

    # The HTTP client is the seam: httpx lets some errors out that are not httpx.HTTPError.
    await notifier._http.aclose()
    notifier._http = httpx.AsyncClient(transport=httpx.MockTransport(explode))
    doc = await _stored_job(store, "exploding-job-0001", "http://127.0.0.1:9/hook")
    notifier.notify(doc)
    [task] = notifier._tasks
    status = await task  # the task returns a status instead of dying with the exception
    assert status.state == "failed" and status.attempts == 1
    assert status.last_error is not None and type(error).__name__ in status.last_error
    recorded = (await store.get(doc.id)).webhook
    assert recorded is not None and recorded.state == "failed" and recorded.last_error == status.last_error
