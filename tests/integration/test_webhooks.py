"""Webhooks: signed, retried, recorded on the job; private targets refused."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gcr.types import GenerateRequest, JobDocument
from service.jobs.connection import connect
from service.jobs.keys import Keys
from service.jobs.lifecycle import JobLifecycle
from service.jobs.records import StoredJob
from service.jobs.store import JobStore
from service.servers import serving
from service.settings import Settings
from tests.stack import Stack
from workers.webhooks import WebhookNotifier

# A Standard Webhooks secret: whsec_ + base64 of 32 bytes.
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


class Receiver:
    """A real HTTP receiver on loopback that answers `fail_with` to the first `fail_first` deliveries."""

    def __init__(self, fail_first: int = 0, fail_with: int = 500) -> None:
        self.fail_first = fail_first
        self.fail_with = fail_with
        self.received: list[tuple[bytes, dict[str, str]]] = []
        self.url = ""

    async def hook(self, request: Request) -> Response:
        self.received.append((await request.body(), dict(request.headers)))
        return Response(status_code=self.fail_with if len(self.received) <= self.fail_first else 204)


@asynccontextmanager
async def receiving(fail_first: int = 0, fail_with: int = 500) -> AsyncIterator[Receiver]:
    rec = Receiver(fail_first, fail_with)
    async with serving(Starlette(routes=[Route("/hook", rec.hook, methods=["POST"])])) as url:
        rec.url = f"{url}/hook"
        yield rec


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving(fail_first=1) as rec:
        yield rec


def _by_spec(secret: str, headers: dict[str, str], body: bytes) -> str:
    """The signature as the Standard Webhooks spec defines it, computed here by hand."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


async def _finished(stack: Stack, job_id: str) -> JobDocument:
    await stack.wait(job_id)
    async with asyncio.timeout(10):
        while (doc := await stack.client.get(job_id)).webhook is None or doc.webhook.state == "pending":
            await asyncio.sleep(0.05)
    return doc


async def test_webhook_is_signed_per_standard_webhooks_retried_with_one_id_and_recorded(
    redis_url: str, redis_prefix: str, standin_url: str, receiver: Receiver
) -> None:
    async with Stack(
        redis_url, redis_prefix, standin_url, webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff_s=0.05
    ) as stack:
        await stack.start_worker()
        job_id = await stack.submit("a kite", loop={"max_rounds": 1}, callback_url=receiver.url)
        doc = await _finished(stack, job_id)
    assert doc.webhook is not None and doc.webhook.state == "delivered" and doc.webhook.attempts == 2
    (first_body, first), (body, headers) = receiver.received
    assert first["webhook-id"] == headers["webhook-id"]  # one delivery, one id, however many attempts
    assert headers["webhook-signature"] == _by_spec(SECRET, headers, body)
    sent = Webhook(SECRET).verify(body, headers)  # the standardwebhooks package accepts it
    assert sent == json.loads(first_body)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"another key of 24 bytes!").decode()).verify(body, headers)
    assert sent["event"] == "completed" and sent["status"] == "succeeded" and sent["id"] == job_id
    # absolute without GCR_PUBLIC_URL: the base URL the client submitted to
    assert sent["job_url"] == f"{stack.url}/jobs/{job_id}"
    assert sent["best"]["image_url"] == f"{stack.url}/jobs/{job_id}/images/0/0"


@pytest.mark.parametrize(("status", "attempts"), [(400, 1), (410, 1), (301, 1), (408, 3), (429, 3), (503, 3)])
async def test_only_answers_a_retry_can_change_are_retried(
    redis_url: str, redis_prefix: str, standin_url: str, status: int, attempts: int
) -> None:
    async with (
        receiving(fail_first=2, fail_with=status) as rec,
        Stack(
            redis_url, redis_prefix, standin_url, webhook_allow_private=True, webhook_backoff_s=0.01, webhook_attempts=5
        ) as stack,
    ):
        await stack.start_worker()
        job_id = await stack.submit("a kite", loop={"max_rounds": 1}, callback_url=rec.url)
        doc = await _finished(stack, job_id)
    assert doc.webhook is not None and doc.webhook.attempts == attempts, doc.webhook
    assert doc.webhook.state == ("delivered" if attempts == 3 else "failed")
    assert len(rec.received) == attempts and len({h["webhook-id"] for _b, h in rec.received}) == 1


async def test_the_event_filter_sends_start_each_round_and_completed(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    async with (
        receiving() as rec,
        Stack(redis_url, redis_prefix, standin_url, webhook_secret=SECRET, webhook_allow_private=True) as stack,
    ):
        await stack.start_worker()
        job_id = await stack.submit(
            "a kite",
            loop={"max_rounds": 2, "threshold": 1.0},
            callback_url=rec.url,
            webhook_events_filter=["start", "round", "completed"],
        )
        await _finished(stack, job_id)
        only_completed = await stack.submit("a kite", loop={"max_rounds": 2}, callback_url=rec.url)
        await _finished(stack, only_completed)
    bodies = [Webhook(SECRET).verify(body, headers) for body, headers in rec.received]
    # Deliveries are independent (a slow receiver never holds the job): compare them unordered.
    events = sorted((b["id"] == only_completed, b["event"], b.get("round", {}).get("index", -1)) for b in bodies)
    assert events == sorted(
        [
            (False, "start", -1),
            (False, "round", 0),
            (False, "round", 1),
            (False, "completed", -1),
            (True, "completed", -1),
        ]
    )
    # Each round's delivery carries the job as it was then.
    assert {b["round"]["index"]: b["rounds"] for b in bodies if b["event"] == "round"} == {0: 1, 1: 2}
    ids = [headers["webhook-id"] for _body, headers in rec.received]
    assert len(set(ids)) == len(ids)


def test_a_secret_that_is_not_a_standard_webhooks_secret_is_refused_at_start_up() -> None:
    with pytest.raises(ValidationError, match="whsec_"):
        Settings(webhook_secret="s3cret")


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


async def _stored_job(store: JobStore, job_id: str, callback_url: str) -> StoredJob:
    """A finished job that holds `callback_url` as it was stored (e.g. before a stricter check)."""
    spec = GenerateRequest.model_construct(
        **{**GenerateRequest(prompt="p", model="sim:0.0").__dict__, "callback_url": callback_url}
    )
    job = StoredJob(id=job_id, status="queued", spec=spec, created_at=time.time())
    await JobLifecycle(store.redis, store.keys, store.ttl_s).create(job)
    assert await JobLifecycle(store.redis, store.keys, store.ttl_s).cancel(job_id) == "cancelled"
    return await store.get(job_id)


@pytest.fixture
async def store(redis_url: str, redis_prefix: str) -> AsyncIterator[JobStore]:
    client = connect(redis_url)
    yield JobStore(client, Keys(redis_prefix), 600)
    await client.aclose()


@pytest.fixture
async def notifier(redis_url: str, redis_prefix: str, store: JobStore) -> AsyncIterator[WebhookNotifier]:
    settings = Settings(
        redis_url=redis_url, redis_prefix=redis_prefix, webhook_allow_private=True, webhook_backoff_s=0.01
    )
    notifier = WebhookNotifier(settings, store)
    yield notifier
    await notifier.aclose()


async def test_a_stored_bad_port_callback_ends_failed_on_the_job(notifier: WebhookNotifier, store: JobStore) -> None:
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
    notifier: WebhookNotifier, store: JobStore, error: Exception
) -> None:
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


async def test_a_job_cancelled_while_queued_gets_its_webhook_from_a_worker_at_once(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    """A cancelled queued job leaves the queue at once; its `completed` webhook is owed to the
    outbox, and a worker of any model sends it (it used to wait until a worker of the job's
    own model claimed the stale entry)."""
    async with (
        receiving() as rec,
        Stack(redis_url, redis_prefix, standin_url, webhook_allow_private=True) as stack,
    ):
        await stack.register_idle_worker(model="nobody-runs-this")
        job_id = await stack.submit("never runs", model="nobody-runs-this", callback_url=rec.url)
        await stack.client.cancel(job_id)
        await stack.start_worker()  # another model's worker
        doc = await _finished(stack, job_id)
    assert doc.status == "cancelled" and doc.webhook is not None and doc.webhook.state == "delivered"
    [(body, headers)] = rec.received
    assert json.loads(body)["status"] == "cancelled" and headers["webhook-id"] == f"msg_{job_id}_completed"
