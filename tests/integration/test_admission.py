"""No job waits for a worker that does not exist: refused at submit, expired when nobody claims it,
and readiness per mode. Also: the stored spec shows every value the generator used."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
from PIL import Image

from tests.stack import Stack
from workers.worker import CPU_MAX_PIXELS

pytest_plugins = ("tests.generator_fixtures",)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_a_job_nobody_serves_is_refused_at_submit_with_the_reason(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        none = await http.post("/generate", json={"prompt": "a fox"})
        assert none.status_code == 503 and none.headers["Retry-After"]
        error = none.json()["error"]
        assert (
            error["code"] == "no_worker" and error["retryable"] and "no worker has sent a heartbeat" in error["message"]
        )

        await stack.start_worker(generator="tiny:sd", generator_device="cpu")
        edit = await http.post("/generate", json={"prompt": "add a hat", "mode": "edit", "source_image": _png()})
        assert edit.status_code == 503
        message = edit.json()["error"]["message"]
        assert "mode 'edit'" in message and "live workers serve t2i" in message and "Qwen-Image-Edit" in message
        assert (await http.post("/generate", json={"prompt": "a hat", "loop": {"max_rounds": 1}})).status_code == 202

        ready = (await http.get("/readyz")).json()
        assert ready["modes"]["t2i"] == {"ready": True, "workers": ["w0"]}
        assert ready["modes"]["edit"]["ready"] is False and "mode 'edit'" in ready["modes"]["edit"]["reason"]
        worker = ready["workers"][0]
        runtime = worker["runtime"]
        assert worker["state"] == "ready" and runtime["device"] == "cpu" and runtime["dtype"] == "float32"
        assert runtime["torch"] and "cuda" in runtime


async def test_a_queued_job_no_worker_claims_expires_with_that_reason(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, queue_timeout_s=0.5) as stack:
        await stack.register_idle_worker()  # admits the job, then never claims it
        job_id = await stack.submit("nobody comes", loop={"max_rounds": 1})
        doc = await stack.wait(job_id, timeout_s=10)
        assert doc.status == "expired" and doc.stop_reason == "unclaimed"
        assert doc.error is not None and doc.error.code == "unclaimed" and "GCR_QUEUE_TIMEOUT_S" in doc.error.message
        assert doc.queue_position is None
        # a worker that arrives later acknowledges the stale entry and leaves the job as it is
        await stack.start_worker()
        fresh = await stack.wait(await stack.submit("somebody came", loop={"max_rounds": 1}))
        assert fresh.status == "succeeded"
        assert (await stack.client.get(job_id)).status == "expired"


async def test_a_finished_jobs_spec_shows_every_effective_value(stack: Stack) -> None:
    await stack.start_worker()
    doc = await stack.wait(await stack.submit("spec echo", loop={"max_rounds": 1}))
    generation = doc.spec.generation
    assert (generation.width, generation.height, generation.steps) == (64, 64, 4)  # the simulator's defaults
    assert generation.seed is not None


async def test_a_job_larger_than_its_workers_were_sized_for_is_refused_at_submit(stack: Stack) -> None:
    """GCR_MAX_OUTPUT_PIXELS: the one-GPU split was checked for 1024x1024; a 2048x2048 job
    would have run into an out-of-memory error on the shared card."""
    await stack.start_worker(generator="sim:0", max_output_pixels=256 * 256)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        big = await http.post("/generate", json={"prompt": "a fox", "generation": {"width": 512, "height": 512}})
        assert big.status_code == 422, big.text
        error = big.json()["error"]
        assert error["code"] == "invalid_input" and error["field"] == "width"
        assert "at most 65536 pixels (e.g. 256x256)" in error["message"]
        fits = {"prompt": "a fox", "generation": {"width": 256, "height": 256}, "loop": {"max_rounds": 1}}
        assert (await http.post("/generate", json=fits)).status_code == 202
        # One side given: the other is the worker's default (64 for the simulator).
        wide = {"prompt": "a fox", "generation": {"width": 1024}, "loop": {"max_rounds": 1}}
        assert (await http.post("/generate", json=wide)).status_code == 202


async def test_a_cpu_worker_is_capped_at_512x512_unless_told(
    redis_url: str, redis_prefix: str, standin_url: str, tiny_cache_dir: Path
) -> None:
    """A 2048x2048 job on a CPU dev worker ran for 17 minutes, past any cancel."""
    tiny = {"generator": "tiny:sd", "cache_dir": tiny_cache_dir, "generator_device": "cpu"}
    async with Stack(redis_url, redis_prefix, standin_url, **tiny) as stack:
        worker = await stack.start_worker()
        assert worker.max_pixels == CPU_MAX_PIXELS
        async with httpx.AsyncClient(base_url=stack.url) as http:
            big = await http.post("/generate", json={"prompt": "a fox", "generation": {"width": 2048, "height": 2048}})
            assert big.status_code == 422 and "at most 262144 pixels (e.g. 512x512)" in big.json()["error"]["message"]
            fits = {"prompt": "a fox", "generation": {"width": 512, "height": 512}, "loop": {"max_rounds": 1}}
            assert (await http.post("/generate", json=fits)).status_code == 202
    async with Stack(redis_url, redis_prefix, standin_url, **tiny, max_output_pixels=1024 * 1024) as stack:
        assert (await stack.start_worker()).max_pixels == 1024 * 1024
