"""Webhooks, per Standard Webhooks: a signed JSON POST to the job's `callback_url`.

Which events: the request's `webhook_events_filter`, like Replicate's: `start` (a worker
began the job), `round` (a round finished; the body carries it), `completed` (the job
ended, whatever its status). Default: `["completed"]`, one delivery per job.

Each delivery has three headers (https://www.standardwebhooks.com):
- `webhook-id`: the delivery's id, the same on every retry of it and made from the job,
  the event and the round, so a receiver can drop duplicates (a resumed job re-sends);
- `webhook-timestamp`: unix seconds of this attempt;
- `webhook-signature`: `v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>`, when
  `GCR_WEBHOOK_SECRET` (`whsec_<base64>`) is set.

Receivers verify with any Standard Webhooks library, e.g. Python's `standardwebhooks`:
`Webhook(secret).verify(body, headers)`, which also refuses timestamps older than 5
minutes (replays). Signing uses that same package, the spec authors' reference code, so
the format cannot drift from what receivers check.

Only answers a retry can change are retried (408, 429, 5xx and network errors), with
exponential backoff; any other answer fails the delivery at once. The `completed`
delivery's outcome is recorded on the job as `webhook`; the others are logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from standardwebhooks import Webhook

from gcr.types import WebhookStatus
from service.errors import GcrError, InvalidInput
from service.jobs.presenter import base_of, present
from service.jobs.records import StoredJob
from service.jobs.store import JobStore
from service.netguard import check_public_url
from service.retrying import retrying
from service.settings import WorkerSettings

log = logging.getLogger("gcr.webhooks")

WebhookEvent = Literal["start", "round", "completed"]
BACKOFF_MAX_S = 60.0
RETRIED_STATUSES = frozenset({408, 429})


def delivery_id(job_id: str, event: WebhookEvent, round_index: int | None = None) -> str:
    """The same for every attempt, and for a re-sent event of a resumed job."""
    suffix = f"_{round_index}" if event == "round" and round_index is not None else ""
    return f"msg_{job_id}_{event}{suffix}"


def signed_headers(secret: str | None, message_id: str, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, timestamped now (no signature without a secret)."""
    timestamp = datetime.fromtimestamp(int(time.time()), tz=UTC)
    headers = {"webhook-id": message_id, "webhook-timestamp": str(int(timestamp.timestamp()))}
    if secret is not None:
        headers["webhook-signature"] = Webhook(secret).sign(message_id, timestamp, body.decode())
    return headers


def payload(
    job: StoredJob, public_url: str | None, event: WebhookEvent = "completed", round_index: int | None = None
) -> dict[str, Any]:
    """The webhook body: the event, the job's summary (and for `round`, that round), as the
    presenter shows the job: links absolute, from GCR_PUBLIC_URL, else the base URL the
    client submitted to."""
    doc = present(job, base_of(job, public_url))
    body: dict[str, Any] = {
        "event": event,
        "id": doc.id,
        "status": doc.status,
        "stop_reason": doc.stop_reason,
        "best": doc.best.model_dump() if doc.best else None,
        "summary": doc.summary.model_dump() if doc.summary else None,
        "error": doc.error.model_dump() if doc.error else None,
        "finished_at": doc.finished_at,
        "job_url": doc.links["self"],
        "rounds": len(doc.rounds),
    }
    if event == "round" and round_index is not None:
        round_ = next((r for r in doc.rounds if r.index == round_index), None)
        if round_ is not None:
            body["round"] = round_.model_dump(
                mode="json", exclude={"candidates": {"__all__": {"critique": {"raw", "analysis"}}}}
            )
    return body


class _NotDelivered(Exception):
    """This attempt did not deliver (the reason is on the status): try again."""


class _Refused(Exception):
    """The receiver answered something a retry will not change (a 4xx but 408 and 429, a 3xx)."""


class WebhookNotifier:
    """Delivers webhooks in background tasks, so a slow receiver never holds a job slot."""

    def __init__(self, settings: WorkerSettings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._tasks: set[asyncio.Task[WebhookStatus]] = set()
        self._http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)

    def notify(self, job: StoredJob, event: WebhookEvent = "completed", round_index: int | None = None) -> None:
        """Deliver `event` in the background if the job has a callback and its filter takes it."""
        if job.spec.callback_url is None or event not in job.spec.webhook_events_filter:
            return
        task = asyncio.create_task(self.deliver(job, job.spec.callback_url, event, round_index))
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

    async def deliver(
        self, job: StoredJob, url: str, event: WebhookEvent = "completed", round_index: int | None = None
    ) -> WebhookStatus:
        """Deliver with retries; the `completed` delivery's outcome is recorded on the job."""
        status = WebhookStatus(state="pending")
        try:
            await self._attempt(job, url, status, event, round_index)
        except Exception as exc:
            # Not an HTTP failure (httpx lets a bad port out as ValueError or an exception
            # group, for one): retrying will not help, but the job must still say it failed.
            log.exception("webhook for job %s could not be sent", job.id)
            status.last_error = f"{type(exc).__name__}: {exc}"
        if status.state != "delivered":
            status.state = "failed"
            log.warning(
                "%s webhook for job %s failed after %d attempt(s): %s",
                event,
                job.id,
                status.attempts,
                status.last_error,
            )
        if event != "completed":
            return status
        try:
            await self.store.record_webhook(job.id, status)
        except GcrError as exc:
            log.warning("could not record webhook status of job %s: %s", job.id, exc.message)
        return status

    async def _attempt(
        self, job: StoredJob, url: str, status: WebhookStatus, event: WebhookEvent, round_index: int | None
    ) -> None:
        """POST until delivered or out of attempts, keeping `status` current after each."""
        body = json.dumps(payload(job, self.settings.public_url, event, round_index)).encode()
        message_id = delivery_id(job.id, event, round_index)
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
                    await self._post_once(url, message_id, body, status)
        except (_NotDelivered, _Refused):
            return  # out of attempts, or refused for good; the last error is on `status`
        except InvalidInput as exc:
            status.last_error = exc.message  # the address is refused: retrying will not change that

    async def _post_once(self, url: str, message_id: str, body: bytes, status: WebhookStatus) -> None:
        """One POST; `_NotDelivered` (retried) when a retry may help, `_Refused` when not."""
        await check_public_url(url, field="callback_url", allow_private=self.settings.webhook_allow_private)
        secret = self.settings.webhook_secret
        headers = {
            "content-type": "application/json",
            "user-agent": "gcr-webhook/1",
            **signed_headers(secret.get_secret_value() if secret else None, message_id, body),
        }
        try:
            response = await self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            status.last_error = f"{type(exc).__name__}: {exc}"
            raise _NotDelivered from exc
        if response.status_code >= 300:
            status.last_error = f"receiver answered {response.status_code}"
            if response.status_code in RETRIED_STATUSES or response.status_code >= 500:
                raise _NotDelivered
            raise _Refused
        status.state, status.delivered_at, status.last_error = "delivered", time.time(), None
