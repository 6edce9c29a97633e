"""Webhooks: a signed JSON summary POSTed to the job's `callback_url` when it ends.

The signature header is `X-Gcr-Signature: t=<unix seconds>,v1=<hex>`, where hex is
HMAC-SHA256(GCR_WEBHOOK_SECRET, "<t>.<body>"). Receivers check it with
`verify_signature` (or the same three lines in their language) and reject old
timestamps, which stops replays. Deliveries are retried with exponential backoff;
the outcome is recorded on the job as `webhook`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx

from service.errors import GcrError, InvalidInput
from service.netguard import check_public_url
from service.protocol import JobDocument, WebhookStatus
from service.retrying import retrying
from service.settings import Settings
from service.store import JobStore

log = logging.getLogger("gcr.webhooks")

SIGNATURE_HEADER = "X-Gcr-Signature"
BACKOFF_MAX_S = 60.0


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify_signature(secret: str, body: bytes, header: str, tolerance_s: float = 300.0) -> bool:
    """True when `header` signs `body` with `secret` and is at most `tolerance_s` old."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def payload(doc: JobDocument, public_url: str | None) -> dict[str, Any]:
    """The webhook body. Links are absolute: GCR_PUBLIC_URL, else the base URL the client
    submitted to (the gateway stores it on the job)."""
    base = (public_url or doc.base_url or "").rstrip("/")
    best = None
    if doc.best is not None:
        link = f"{base}/jobs/{doc.id}/images/{doc.best.round}/{doc.best.candidate}"
        best = {**doc.best.model_dump(), "image_url": link}
    return {
        "id": doc.id,
        "status": doc.status,
        "stop_reason": doc.stop_reason,
        "best": best,
        "summary": doc.summary.model_dump() if doc.summary else None,
        "error": doc.error.model_dump() if doc.error else None,
        "finished_at": doc.finished_at,
        "job_url": f"{base}/jobs/{doc.id}",
    }


class _NotDelivered(Exception):
    """This attempt did not deliver (the reason is on the status): try again."""


class WebhookNotifier:
    """Delivers webhooks in background tasks, so a slow receiver never holds a job slot."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._tasks: set[asyncio.Task[WebhookStatus]] = set()
        self._http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)

    def notify(self, doc: JobDocument) -> None:
        if doc.spec.callback_url is None:
            return
        task = asyncio.create_task(self.deliver(doc, doc.spec.callback_url))
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[WebhookStatus]) -> None:
        self._tasks.discard(task)
        # `deliver` records every failure itself; this only retrieves what would otherwise
        # end as "Task exception was never retrieved" if that ever regressed.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("webhook delivery task crashed", exc_info=exc)

    async def aclose(self, grace_s: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        await self._http.aclose()

    async def deliver(self, doc: JobDocument, url: str) -> WebhookStatus:
        """Deliver with retries and record the outcome, delivered or failed, on the job."""
        status = WebhookStatus(state="pending")
        try:
            await self._attempt(doc, url, status)
        except Exception as exc:
            # Not an HTTP failure (httpx lets a bad port out as ValueError or an exception
            # group, for one): retrying will not help, but the job must still say it failed.
            log.exception("webhook for job %s could not be sent", doc.id)
            status.last_error = f"{type(exc).__name__}: {exc}"
        if status.state != "delivered":
            status.state = "failed"
            log.warning("webhook for job %s failed after %d attempt(s): %s", doc.id, status.attempts, status.last_error)
        try:
            await self.store.force_update(doc.id, webhook=status)
        except GcrError as exc:
            log.warning("could not record webhook status of job %s: %s", doc.id, exc.message)
        return status

    async def _attempt(self, doc: JobDocument, url: str, status: WebhookStatus) -> None:
        """POST until delivered or out of attempts, keeping `status` current after each."""
        body = json.dumps(payload(doc, self.settings.public_url)).encode()
        delivery = retrying(
            on=_NotDelivered,
            first_s=self.settings.webhook_backoff_s,
            cap_s=BACKOFF_MAX_S,
            attempts=self.settings.webhook_attempts,
        )
        try:
            async for attempt in delivery:
                with attempt:
                    status.attempts = attempt.retry_state.attempt_number
                    await self._post_once(url, body, status)
        except _NotDelivered:
            return  # out of attempts; the last error is on `status`
        except InvalidInput as exc:
            status.last_error = exc.message  # the address is refused: retrying will not change that

    async def _post_once(self, url: str, body: bytes, status: WebhookStatus) -> None:
        """One POST; `_NotDelivered` (retried) unless the receiver took it."""
        await check_public_url(url, field="callback_url", allow_private=self.settings.webhook_allow_private)
        headers = {"content-type": "application/json", "user-agent": "gcr-webhook/1"}
        secret = self.settings.webhook_secret
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(secret.get_secret_value(), body)
        try:
            response = await self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            status.last_error = f"{type(exc).__name__}: {exc}"
            raise _NotDelivered from exc
        if response.status_code >= 300:
            status.last_error = f"receiver answered {response.status_code}"
            raise _NotDelivered
        status.state, status.delivered_at, status.last_error = "delivered", time.time(), None
