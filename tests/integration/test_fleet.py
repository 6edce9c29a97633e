"""A fleet of two models behind one gateway: routing, refusal, the model list, per-model
readiness and queue depth (real Redis, HTTP and workers; simulated generators)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gcr.errors import NoWorkerError, UnknownModelError
from tests.stack import Stack

ONE_ROUND = {"max_rounds": 1}


async def test_jobs_reach_only_workers_of_their_model(stack: Stack) -> None:
    await stack.start_worker(model_name="flux-sim")  # w0 runs flux-sim jobs
    await stack.register_idle_worker(("t2i",), model="sdxl-sim", worker_id="sdxl-idle")  # admits, claims nothing

    flux = await stack.wait(await stack.submit("a fox", model="flux-sim", loop=ONE_ROUND))
    assert flux.status == "succeeded" and flux.worker == "w0" and flux.spec.model == "flux-sim"
    sdxl = await stack.submit("a heron", model="sdxl-sim", loop=ONE_ROUND)
    await stack.wait(await stack.submit("a lynx", model="flux-sim", loop=ONE_ROUND))  # w0 kept claiming
    assert (await stack.client.get(sdxl)).status == "queued", "w0 never claims another model's job"

    async with httpx.AsyncClient(base_url=stack.url) as http:
        queue = (await http.get("/admin/queue")).json()
        assert queue["models"]["sdxl-sim"] == {"waiting": 1, "claimed": 0, "workers": 1}
        assert queue["models"]["flux-sim"] == {"waiting": 0, "claimed": 0, "workers": 1}
        assert queue["streams"]["sdxl-sim"]["t2i:normal"] == {"entries": 1, "pending": 0}
        metrics = (await http.get("/metrics")).text
        assert 'gcr_queue_waiting{mode="t2i",model="sdxl-sim",priority="normal"} 1.0' in metrics
        assert 'gcr_model_workers{model="flux-sim"} 1.0' in metrics

    await stack.start_worker(model_name="sdxl-sim")  # w1: now the queued job runs, on it
    done = await stack.wait(sdxl)
    assert done.status == "succeeded" and done.worker == "w1"


async def test_unknown_models_are_refused_with_the_served_ones(stack: Stack) -> None:
    await stack.start_worker(model_name="flux-sim")
    await stack.register_idle_worker(("edit",), model="kontext-sim", worker_id="kontext-idle")
    with pytest.raises(UnknownModelError) as refused:
        await stack.client.generate("a fox", model="no-such-model")
    assert refused.value.status == 422 and refused.value.field == "model"
    assert refused.value.choices == ["flux-sim"] and "flux-sim" in refused.value.message
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post("/generate", json={"prompt": "x", "model": "two words"})
        assert response.status_code == 422 and response.json()["error"]["field"] == "model"
        assert (await http.get("/jobs")).json()["jobs"] == [], "nothing refused was stored"


async def test_the_model_list_and_readiness_show_each_model(stack: Stack) -> None:
    await stack.start_worker(model_name="flux-sim")
    await stack.start_worker(model_name="flux-sim")
    await stack.register_idle_worker(("edit",), model="kontext-sim", worker_id="kontext-idle")
    models = {m["id"]: m for m in await stack.client.models()}
    assert set(models) == {"flux-sim", "kontext-sim"}
    assert models["flux-sim"]["gcr"]["workers"] == 2 and models["flux-sim"]["gcr"]["modes"] == ["edit", "t2i"]
    assert models["flux-sim"]["gcr"]["default_for"] == ["t2i", "edit"]
    assert models["flux-sim"]["gcr"]["defaults"]["width"] == 64  # what a bare request gets
    assert models["kontext-sim"]["gcr"]["default_for"] == [], "two flux-sim workers outnumber it for edits"

    report = await stack.client.ready()
    assert report["models"]["flux-sim"]["ready"] and len(report["models"]["flux-sim"]["workers"]) == 2
    assert report["models"]["kontext-sim"] == {"ready": True, "modes": ["edit"], "workers": ["kontext-idle"]}

    # A request that names no model goes to the fleet's default for its mode.
    doc = await stack.wait(await stack.submit("a fox", loop=ONE_ROUND))
    assert doc.spec.model == "flux-sim" and doc.status == "succeeded"


async def test_a_configured_default_model_routes_requests_that_name_none(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, default_models={"t2i": "sdxl-sim"}) as stack:
        await stack.start_worker(model_name="flux-sim")
        await stack.start_worker(model_name="flux-sim")
        await stack.start_worker(model_name="sdxl-sim")
        ids = [await stack.submit(f"job {i}", loop=ONE_ROUND) for i in range(3)]
        docs = await asyncio.gather(*(stack.wait(job_id) for job_id in ids))
        assert {d.spec.model for d in docs} == {"sdxl-sim"} and {d.worker for d in docs} == {"w2"}


async def test_a_model_served_before_is_a_retryable_503_while_none_of_its_workers_runs(stack: Stack) -> None:
    await stack.start_worker(model_name="flux-sim")
    await stack.stop_workers()  # e.g. a rollout replacing its only worker
    await stack.register_idle_worker(("t2i",), model="sdxl-sim", worker_id="sdxl-idle")
    with pytest.raises(NoWorkerError) as refused:
        await stack.client.generate("a fox", model="flux-sim")
    assert refused.value.status == 503 and refused.value.retryable and "flux-sim" in refused.value.message
    assert "sdxl-sim" in refused.value.message, "it says which models are served"
    with pytest.raises(UnknownModelError):
        await stack.client.generate("a fox", model="never-served")
