"""`gcr.Client`: the blocking client of a gcr gateway, method for method `gcr.AsyncClient`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Unpack

import httpx
from httpx_sse import connect_sse

from gcr import _base
from gcr._base import ImageInput, JobOptions
from gcr.errors import APIConnectionError, GcrError, WaitTimeout
from gcr.types import TERMINAL_STATUSES, Critique, JobDocument, JobEvent

EventCallback = Callable[[JobEvent], Any]


class Client:
    """Submit jobs, follow them and fetch their images (see `gcr.AsyncClient`)."""

    def __init__(
        self,
        base_url: str = _base.DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.max_retries = max_retries
        self.http = http_client or httpx.Client(
            base_url=base_url.rstrip("/"), headers=_base.headers(api_key), timeout=timeout_s
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                try:
                    response = self.http.request(method, path, **kwargs)
                except httpx.TransportError as exc:
                    raise _base.unreachable(self.http.base_url, exc) from exc
                _base.raise_for_status(response)
                return response
            except GcrError as error:
                delay = _base.retry_delay(error, attempt, self.max_retries)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> JobDocument:
        key = idempotency_key or _base.new_idempotency_key()
        response = self._request("POST", "/generate", json=dict(body), headers={"Idempotency-Key": key})
        return JobDocument.model_validate(response.json())

    def generate(
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
        job = self.submit(body, idempotency_key=idempotency_key)
        if wait is False:
            return job
        return self.wait(job.id, timeout=None if wait is True else float(wait), on_event=on_event)

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
        while True:
            try:
                with connect_sse(
                    self.http, "GET", stream.path, headers=stream.headers(), timeout=stream.timeout()
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        _base.raise_for_status(source.response)
                    for sse in source.iter_sse():
                        if (event := stream.accept(sse)) is not None:
                            yield event
                            if event.type == "end":
                                return
            except httpx.ReadTimeout as exc:
                stream.read_timed_out(exc)
            except httpx.TransportError as exc:
                time.sleep(stream.dropped(exc))

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
        body: dict[str, Any] = {"instruction": instruction, "image": _base.encode_image(image)}
        if source_image is not None:
            body["source_image"] = _base.encode_image(source_image)
        if mode is not None:
            body["mode"] = mode
        return Critique.model_validate(self._request("POST", "/critique", json=body).json())

    def models(self) -> list[dict[str, Any]]:
        """The models live workers serve (GET /v1/models `data`), with gcr's details in `gcr`."""
        listed: list[dict[str, Any]] = self._request("GET", "/v1/models").json()["data"]
        return listed

    def ready(self) -> dict[str, Any]:
        try:
            response = self.http.get("/readyz")
        except httpx.TransportError as exc:
            raise _base.unreachable(self.http.base_url, exc) from exc
        with contextlib.suppress(ValueError):
            report: dict[str, Any] = response.json()
            return report
        raise APIConnectionError(f"{self.http.base_url}/readyz did not answer JSON")
