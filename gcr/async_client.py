"""`gcr.AsyncClient`: the asyncio client of a gcr gateway (`gcr.Client` mirrors it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, Unpack

import httpx
from httpx_sse import aconnect_sse

from gcr import _base
from gcr._base import EventCallback, GenerateOptions, ImageInput
from gcr.errors import GcrError, WaitTimeout
from gcr.types import TERMINAL_STATUSES, Critique, JobDocument, JobEvent


class AsyncClient(_base.BaseClient[httpx.AsyncClient]):
    """Submit jobs, follow them and fetch their images.

    `api_key` defaults to none (a gateway with auth off); errors are `gcr.errors` classes
    chosen by the answer's `code`; 429/503 and connection errors are retried
    `max_retries` times (after `Retry-After` when given)."""

    _http_class = httpx.AsyncClient

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- requests, with the retry policy ---------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retries = _base.Retries(self.max_retries)
        while True:
            try:
                with _base.connection_errors(self.http.base_url):
                    response = await self.http.request(method, path, **kwargs)
                _base.raise_for_status(response)
                return response
            except GcrError as error:
                await asyncio.sleep(retries.after(error))

    # --- jobs ------------------------------------------------------------------------------
    async def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> JobDocument:
        """POST /generate with a raw request body; returns the queued job."""
        headers = _base.idempotency_header(idempotency_key)
        response = await self._request("POST", "/generate", json=dict(body), headers=headers)
        return JobDocument.model_validate(response.json())

    async def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> JobDocument:
        """Submit a job (`options`: model, mode, source_image, generation, loop, priority,
        callback_url, idempotency_key); with `wait` (True, or a timeout in seconds) return it
        finished, `on_event` seeing its events meanwhile."""
        call = _base.GenerateCall.of(prompt, options)
        job = await self.submit(call.body, idempotency_key=call.idempotency_key)
        if call.wait is False:
            return job
        return await self.wait(job.id, timeout=call.timeout, on_event=call.on_event)

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
        while not stream.ended:
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
                        if stream.ended:
                            break
            except httpx.TransportError as exc:
                await asyncio.sleep(stream.interrupted(exc))

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
        body = _base.critique_body(instruction, image, source_image, mode)
        return Critique.model_validate((await self._request("POST", "/critique", json=body)).json())

    async def models(self) -> list[dict[str, Any]]:
        """The models live workers serve (GET /v1/models `data`), with gcr's details in `gcr`."""
        listed: list[dict[str, Any]] = (await self._request("GET", "/v1/models")).json()["data"]
        return listed

    async def ready(self) -> dict[str, Any]:
        """GET /readyz (200 or 503 alike): the gateway's readiness report."""
        with _base.connection_errors(self.http.base_url):
            response = await self.http.get("/readyz")
        return _base.readiness(response, self.http.base_url)
