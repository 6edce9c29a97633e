"""`gcr.AsyncClient`: the asyncio client of a gcr gateway (`gcr.Client` mirrors it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Unpack

import httpx
from httpx_sse import aconnect_sse

from gcr import _base
from gcr._base import ImageInput, JobOptions
from gcr.errors import APIConnectionError, GcrError, WaitTimeout
from gcr.types import TERMINAL_STATUSES, Critique, JobDocument, JobEvent

EventCallback = Callable[[JobEvent], Any]


class AsyncClient:
    """Submit jobs, follow them and fetch their images.

    `api_key` defaults to none (a gateway with auth off); errors are `gcr.errors` classes
    chosen by the answer's `code`; 429/503 and connection errors are retried
    `max_retries` times (after `Retry-After` when given)."""

    def __init__(
        self,
        base_url: str = _base.DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.max_retries = max_retries
        self.http = http_client or httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=_base.headers(api_key), timeout=timeout_s
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- requests, with the retry policy ---------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                try:
                    response = await self.http.request(method, path, **kwargs)
                except httpx.TransportError as exc:
                    raise _base.unreachable(self.http.base_url, exc) from exc
                _base.raise_for_status(response)
                return response
            except GcrError as error:
                delay = _base.retry_delay(error, attempt, self.max_retries)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    # --- jobs ------------------------------------------------------------------------------
    async def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> JobDocument:
        """POST /generate with a raw request body; returns the queued job."""
        key = idempotency_key or _base.new_idempotency_key()
        response = await self._request("POST", "/generate", json=dict(body), headers={"Idempotency-Key": key})
        return JobDocument.model_validate(response.json())

    async def generate(
        self,
        prompt: str,
        *,
        wait: bool | float = False,
        on_event: EventCallback | None = None,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> JobDocument:
        """Submit a job (`options`: model, mode, source_image, generation, loop, priority,
        callback_url); with `wait` (True, or a timeout in seconds) return it finished."""
        body = _base.generate_body(prompt, **options)
        job = await self.submit(body, idempotency_key=idempotency_key)
        if wait is False:
            return job
        return await self.wait(job.id, timeout=None if wait is True else float(wait), on_event=on_event)

    async def get(self, job_id: str) -> JobDocument:
        return JobDocument.model_validate((await self._request("GET", f"/jobs/{job_id}")).json())

    async def cancel(self, job_id: str) -> JobDocument:
        return JobDocument.model_validate((await self._request("DELETE", f"/jobs/{job_id}")).json())

    async def wait(
        self, job_id: str, *, timeout: float | None = None, on_event: EventCallback | None = None
    ) -> JobDocument:
        """The job once it ended, following its events; `WaitTimeout` after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                async for event in self.events(job_id):
                    if on_event is not None:
                        on_event(event)
                doc = await self.get(job_id)
                while doc.status not in TERMINAL_STATUSES:  # the stream ended early (e.g. expired)
                    await asyncio.sleep(0.5)
                    doc = await self.get(job_id)
                return doc
        except TimeoutError:
            raise WaitTimeout(f"job {job_id} did not end within {timeout:g}s; it goes on", job_id) from None

    async def events(self, job_id: str, *, reconnects: int = 5) -> AsyncIterator[JobEvent]:
        """The job's events until `end`. A dropped connection is resumed with `Last-Event-ID`
        (up to `reconnects` times in a row without a new event)."""
        stream = _base.EventStream(self.http.base_url, job_id, reconnects=reconnects)
        while True:
            try:
                async with aconnect_sse(
                    self.http, "GET", stream.path, headers=stream.headers(), timeout=stream.timeout()
                ) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        _base.raise_for_status(source.response)
                    async for sse in source.aiter_sse():
                        if (event := stream.accept(sse)) is not None:
                            yield event
                            if event.type == "end":
                                return
            except httpx.ReadTimeout as exc:
                stream.read_timed_out(exc)
            except httpx.TransportError as exc:
                await asyncio.sleep(stream.dropped(exc))

    # --- images and critiques --------------------------------------------------------------
    async def image(self, job_id: str, round: int, candidate: int = 0) -> bytes:
        """PNG bytes of one candidate (`round` and `candidate` count from 0, as in the document)."""
        return (await self._request("GET", f"/jobs/{job_id}/images/{round}/{candidate}")).content

    async def best_image(self, job_id: str) -> bytes:
        """PNG bytes of the job's best candidate over all rounds."""
        doc = await self.get(job_id)
        if doc.best is None:
            raise GcrError(f"job {job_id} has no image yet (status {doc.status})")
        return await self.image(job_id, doc.best.round, doc.best.candidate)

    async def download(self, url: str) -> bytes:
        """The bytes behind a link of a job document (with this client's key)."""
        return (await self._request("GET", url)).content

    async def critique(
        self, instruction: str, image: ImageInput, *, source_image: ImageInput | None = None, mode: str | None = None
    ) -> Critique:
        """Judge one image with the gateway's reward model (POST /critique)."""
        body: dict[str, Any] = {"instruction": instruction, "image": _base.encode_image(image)}
        if source_image is not None:
            body["source_image"] = _base.encode_image(source_image)
        if mode is not None:
            body["mode"] = mode
        return Critique.model_validate((await self._request("POST", "/critique", json=body)).json())

    async def models(self) -> list[dict[str, Any]]:
        """The models live workers serve (GET /v1/models `data`), with gcr's details in `gcr`."""
        listed: list[dict[str, Any]] = (await self._request("GET", "/v1/models")).json()["data"]
        return listed

    async def ready(self) -> dict[str, Any]:
        """GET /readyz (200 or 503 alike): the gateway's readiness report."""
        try:
            response = await self.http.get("/readyz")
        except httpx.TransportError as exc:
            raise _base.unreachable(self.http.base_url, exc) from exc
        with contextlib.suppress(ValueError):
            report: dict[str, Any] = response.json()
            return report
        raise APIConnectionError(f"{self.http.base_url}/readyz did not answer JSON")
