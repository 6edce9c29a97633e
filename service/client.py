"""A small async client of the gateway, used by `gcr generate`, `gcr eval` and benchmarks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from service.protocol import JobDocument, JobEvent


class GatewayError(Exception):
    """The gateway answered with an error body (or not at all)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        raise GatewayError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        raise GatewayError(response.status_code, "http_error", response.text[:300]) from None


class GcrClient:
    """Talks to one gateway over HTTP."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> GcrClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> str:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        try:
            response = await self.http.post("/generate", json=body, headers=headers)
        except httpx.TransportError as exc:
            raise GatewayError(0, "unreachable", f"cannot reach the gateway at {self.http.base_url}: {exc}") from exc
        _raise_for_error(response)
        return str(response.json()["id"])

    async def job(self, job_id: str) -> JobDocument:
        response = await self.http.get(f"/jobs/{job_id}")
        _raise_for_error(response)
        return JobDocument.model_validate(response.json())

    async def cancel(self, job_id: str) -> JobDocument:
        response = await self.http.delete(f"/jobs/{job_id}")
        _raise_for_error(response)
        return JobDocument.model_validate(response.json())

    async def image(self, url: str) -> bytes:
        response = await self.http.get(url)
        _raise_for_error(response)
        return response.content

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Follow the job's SSE stream until its `end` event."""
        async with self.http.stream("GET", f"/jobs/{job_id}/events", timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for_error(response)
            event_type, data = "", ""
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event_type = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "" and data:
                    if event_type == "error":
                        payload = json.loads(data)
                        raise GatewayError(0, payload.get("code", "stream_error"), payload.get("message", ""))
                    event = JobEvent.model_validate_json(data) if event_type != "end" or '"type"' in data else None
                    if event is not None:
                        yield event
                    if event_type == "end":
                        return
                    event_type, data = "", ""

    async def wait(self, job_id: str) -> JobDocument:
        """Follow events to the end, then return the final document."""
        async for _event in self.events(job_id):
            pass
        return await self.job(job_id)
