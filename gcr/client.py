"""`gcr.Client`: the blocking client of a gcr gateway, method for method `gcr.AsyncClient`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Unpack

import httpx
from httpx_sse import connect_sse

from gcr import _base
from gcr._base import EventCallback, GenerateOptions, ImageInput
from gcr.errors import GcrError, WaitTimeout
from gcr.types import TERMINAL_STATUSES, Critique, JobDocument, JobEvent


class Client(_base.BaseClient[httpx.Client]):
    """Submit jobs, follow them and fetch their images (see `gcr.AsyncClient`)."""

    _http_class = httpx.Client

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retries = _base.Retries(self.max_retries)
        while True:
            try:
                with _base.connection_errors(self.http.base_url):
                    response = self.http.request(method, path, **kwargs)
                _base.raise_for_status(response)
                return response
            except GcrError as error:
                time.sleep(retries.after(error))

    def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> JobDocument:
        headers = _base.idempotency_header(idempotency_key)
        return JobDocument.model_validate(self._request("POST", "/generate", json=dict(body), headers=headers).json())

    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> JobDocument:
        """Submit a job (`options`: model, mode, source_image, generation, loop, priority,
        callback_url, idempotency_key); with `wait` (True, or a timeout in seconds) return it
        finished, `on_event` seeing its events meanwhile."""
        call = _base.GenerateCall.of(prompt, options)
        job = self.submit(call.body, idempotency_key=call.idempotency_key)
        if call.wait is False:
            return job
        return self.wait(job.id, timeout=call.timeout, on_event=call.on_event)

    def get(self, job_id: str) -> JobDocument:
        return JobDocument.model_validate(self._request("GET", f"/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> JobDocument:
        return JobDocument.model_validate(self._request("DELETE", f"/jobs/{job_id}").json())

    def wait(self, job_id: str, *, timeout: float | None = None, on_event: EventCallback | None = None) -> JobDocument:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for event in self._events(job_id, deadline=deadline):
                if on_event is not None:
                    on_event(event)
        except WaitTimeout:
            raise WaitTimeout(f"job {job_id} did not end within {timeout:g}s; it goes on", job_id) from None
        doc = self.get(job_id)
        while doc.status not in TERMINAL_STATUSES:
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} did not end within {timeout:g}s; it goes on", job_id)
            time.sleep(0.5)
            doc = self.get(job_id)
        return doc

    def events(self, job_id: str, *, reconnects: int = 5) -> Iterator[JobEvent]:
        """The job's events until `end`, resumed with `Last-Event-ID` after a dropped connection."""
        return self._events(job_id, reconnects=reconnects)

    def _events(self, job_id: str, *, reconnects: int = 5, deadline: float | None = None) -> Iterator[JobEvent]:
        stream = _base.EventStream(self.http.base_url, job_id, reconnects=reconnects, deadline=deadline)
        while not stream.ended:
            try:
                with connect_sse(
                    self.http, "GET", stream.path, headers=stream.headers(), timeout=stream.timeout()
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        _base.raise_for_status(source.response)
                    yield from stream.until_end(source.iter_sse())
            except httpx.TransportError as exc:
                time.sleep(stream.interrupted(exc))

    def image(self, job_id: str, round: int, candidate: int = 0) -> bytes:
        return self._request("GET", f"/jobs/{job_id}/images/{round}/{candidate}").content

    def best_image(self, job_id: str) -> bytes:
        doc = self.get(job_id)
        if doc.best is None:
            raise GcrError(f"job {job_id} has no image yet (status {doc.status})")
        return self.image(job_id, doc.best.round, doc.best.candidate)

    def download(self, url: str) -> bytes:
        return self._request("GET", url).content

    def critique(
        self, instruction: str, image: ImageInput, *, source_image: ImageInput | None = None, mode: str | None = None
    ) -> Critique:
        body = _base.critique_body(instruction, image, source_image, mode)
        return Critique.model_validate(self._request("POST", "/critique", json=body).json())

    def models(self) -> list[dict[str, Any]]:
        """The models live workers serve (GET /v1/models `data`), with gcr's details in `gcr`."""
        listed: list[dict[str, Any]] = self._request("GET", "/v1/models").json()["data"]
        return listed

    def ready(self) -> dict[str, Any]:
        with _base.connection_errors(self.http.base_url):
            response = self.http.get("/readyz")
        return _base.readiness(response, self.http.base_url)
