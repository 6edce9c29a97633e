"""One shape for the API surface: waiting submits, absolute links everywhere, one event model."""

from __future__ import annotations

import base64
import io

import httpx
from PIL import Image

from gcr.types import JobDocument, JobEvent
from tests.stack import Stack


async def test_prefer_wait_answers_201_with_the_finished_job(stack: Stack) -> None:
    await stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        done = await http.post(
            "/generate", json={"prompt": "quick", "loop": {"max_rounds": 1}}, headers={"Prefer": "wait=20"}
        )
        assert done.status_code == 201 and done.headers["Preference-Applied"] == "wait=20"
        doc = JobDocument.model_validate(done.json())
        assert doc.status == "succeeded" and doc.best is not None
        await stack.stop_workers()
        await stack.register_idle_worker()
        queued = await http.post("/generate", json={"prompt": "slow"}, headers={"Prefer": "wait=0.3"})
        assert queued.status_code == 202 and queued.json()["status"] == "queued"


async def test_links_are_absolute_in_documents_events_and_webhooks(stack: Stack) -> None:
    await stack.start_worker()
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "green").save(buffer, format="PNG")
    source = base64.b64encode(buffer.getvalue()).decode()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        submitted = await http.post(
            "/generate", json={"prompt": "edit me", "mode": "edit", "source_image": source, "loop": {"max_rounds": 1}}
        )
        assert submitted.status_code == 202
        links = submitted.json()["links"]
        assert links["source_image"] == f"{stack.url}/jobs/{submitted.json()['id']}/source"
        assert (await http.get(links["source_image"])).status_code == 200
    job_id = submitted.json()["id"]
    events = [event async for event in stack.client.events(job_id)]
    assert all(isinstance(event, JobEvent) for event in events) and events[-1].type == "end"
    [round_event] = [e for e in events if e.type == "round"]
    [candidate] = round_event.data["round"]["candidates"]
    assert candidate["image_url"] == f"{stack.url}/jobs/{job_id}/images/0/0"
    doc = await stack.client.get(job_id)
    assert doc.best is not None and doc.best.image_url == f"{stack.url}/jobs/{job_id}/images/0/0"
    assert doc.rounds[0].candidates[0].image_url == doc.best.image_url
    # webhooks: tests/integration/test_webhooks.py checks their absolute links


async def test_a_stream_on_an_expired_job_ends_with_a_job_event(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        await stack.register_idle_worker()
        job_id = (await http.post("/generate", json={"prompt": "x"})).json()["id"]
    await stack.client.cancel(job_id)
    events = [event async for event in stack.client.events(job_id)]
    assert events[-1].type == "end" and events[-1].data["status"] == "cancelled"
