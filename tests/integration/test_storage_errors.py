"""A full artifact disk, for real: a small tmpfs filled up while a job runs.

The worker ends the job with a clear, retryable `artifact_store_error` and keeps the rounds
it finished; the gateway answers a retryable 503 in its error shape, and stores nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
from PIL import Image

from service.jobs.keys import Keys
from tests.stack import Stack


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 2 MiB tmpfs (root can mount one here and in CI; elsewhere the test says why it cannot run)."""
    folder = Path(tempfile.mkdtemp(prefix="gcr-small-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
        folder.rmdir()


def _fill(folder: Path) -> None:
    """Write until the disk is full."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as out:
        while True:
            out.write(b"\0" * 65536)
            out.flush()


async def test_a_disk_that_fills_up_ends_the_job_with_a_clear_error_and_keeps_its_rounds(
    redis_url: str, redis_prefix: str, standin_url: str, small_disk: Path
) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, artifact_url=f"file://{small_disk}") as stack:
        await stack.start_worker(generator="sim:1.0")
        job_id = await stack.submit(
            "a lighthouse", generation={"width": 64, "height": 64}, loop={"max_rounds": 3, "threshold": 1.0}
        )
        async with asyncio.timeout(15):
            while not (await stack.client.get(job_id)).rounds:
                await asyncio.sleep(0.05)
        _fill(small_disk)  # round 0 is stored; round 1's image will not fit
        doc = await stack.wait(job_id)
        assert doc.status == "failed" and doc.stop_reason == "failed"
        assert doc.error is not None and doc.error.code == "artifact_store_error" and doc.error.retryable
        assert "No space left on device" in doc.error.message
        assert len(doc.rounds) == 1 and doc.best is not None and doc.best.round == 0
        async with httpx.AsyncClient(base_url=stack.url) as http:
            kept = await http.get(f"/jobs/{job_id}/images/0/{doc.best.candidate}")
        assert kept.status_code == 200 and Image.open(io.BytesIO(kept.content)).size == (64, 64)


async def test_an_edit_submitted_to_a_full_disk_is_a_retryable_503_and_stores_no_job(
    redis_url: str, redis_prefix: str, standin_url: str, small_disk: Path
) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, artifact_url=f"file://{small_disk}") as stack:
        await stack.start_worker()
        _fill(small_disk)
        source = io.BytesIO()
        Image.effect_noise((256, 256), 64).convert("RGB").save(source, format="PNG")
        body = {"prompt": "make it blue", "mode": "edit", "source_image": base64.b64encode(source.getvalue()).decode()}
        async with httpx.AsyncClient(base_url=stack.url) as http:
            response = await http.post("/generate", json=body)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] and response.headers["x-should-retry"] == "true"
        error = response.json()["error"]
        assert error["code"] == "artifact_store_error" and error["retryable"]
        assert "No space left on device" in error["message"]
        client = redis.Redis.from_url(redis_url)
        try:
            assert await client.zcard(Keys(redis_prefix).all_jobs()) == 0
        finally:
            await client.aclose()


async def test_a_job_redis_refuses_for_good_is_dead_lettered_not_retried_forever(stack: Stack) -> None:
    """WRONGTYPE is not Redis being away: the worker tries a few times, then dead-letters the job
    with a clear error (it used to resume it without end, as if Redis were down)."""
    await stack.register_idle_worker()
    job_id = await stack.submit("a poisoned job", loop={"max_rounds": 1})
    keys = Keys(stack.settings.redis_prefix)
    client = redis.Redis.from_url(stack.settings.redis_url)
    try:
        # The job's rounds key holds a string: every command that reads the rounds is refused.
        await client.set(keys.rounds(job_id), "not a list")
        await stack.start_worker(max_attempts=2)
        async with asyncio.timeout(20):
            while await client.hget(keys.job(job_id), "status") != b'"failed"':
                await asyncio.sleep(0.1)
        error = json.loads(await client.hget(keys.job(job_id), "error"))
        assert error["code"] == "dead_letter"
        assert "refuses this job's commands" in error["message"] and "WRONGTYPE" in error["message"]
        # The gateway cannot read it either, and says so: a 500, never a 503 to retry forever.
        async with httpx.AsyncClient(base_url=stack.url) as http:
            answer = await http.get(f"/jobs/{job_id}")
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "store_error"
        assert "WRONGTYPE" in answer.json()["error"]["message"]
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("reply", "code", "message"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", "store_unavailable", "full"),
        ("READONLY You can't write against a read only replica.", "store_unavailable", "read-only"),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", "store_error", "WRONGTYPE"),
        ("ERR Error running script (call to f_1): @user_script:1: oops", "store_error", "ERR"),
    ],
)
def test_redis_error_replies_are_told_apart(reply: str, code: str, message: str) -> None:
    from redis.exceptions import ResponseError

    from service.jobs.connection import unavailable

    error = unavailable(ResponseError(reply))
    assert error.code == code and message in error.message
    assert error.retryable == (code == "store_unavailable")
