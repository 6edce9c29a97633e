"""Image bytes live in the artifact store (files or S3), Redis keeps only references."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis as redis_sync
from PIL import Image

from service.jobs.artifacts import ArtifactStore
from service.jobs.keys import Keys
from tests.stack import Stack

PNG_MAGIC = b"\x89PNG"
LOOP = {"max_rounds": 2, "candidates_per_round": 2, "threshold": 1.0, "patience": None}


def _png_values(redis_url: str, prefix: str) -> list[str]:
    """Every Redis key under `prefix` whose value (or any field or item of it) is PNG bytes."""
    client = redis_sync.Redis.from_url(redis_url)
    found = []
    for key in client.scan_iter(match=Keys(prefix).pattern()):
        kind = client.type(key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            values = list(client.hgetall(key).values())
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        if any(PNG_MAGIC in v for v in values):
            found.append(key.decode())
    client.close()
    return found


async def test_no_png_in_redis_and_every_image_link_still_answers(stack: Stack, redis_url: str) -> None:
    await stack.start_worker()
    doc = await stack.wait(await stack.submit("two rounds of two", loop=LOOP))
    assert doc.status == "succeeded" and len(doc.rounds) == 2
    assert _png_values(redis_url, stack.settings.redis_prefix) == []
    links = [c.image_url for r in doc.rounds for c in r.candidates]
    assert len(links) == 4
    async with httpx.AsyncClient() as http:
        for link in links:
            answer = await http.get(link or "")
            assert answer.status_code == 200 and answer.content.startswith(PNG_MAGIC)
    folder = Path(urlsplit(stack.settings.artifact_url).path)
    assert len(list(folder.rglob("*.png"))) == 4


async def test_a_missing_image_is_410_and_an_unknown_one_404(stack: Stack) -> None:
    await stack.start_worker()
    doc = await stack.wait(await stack.submit("one image", loop={"max_rounds": 1}))
    folder = Path(urlsplit(stack.settings.artifact_url).path)
    for path in folder.rglob("*.png"):
        path.unlink()  # as the sweeper would, after the TTL
    async with httpx.AsyncClient(base_url=stack.url) as http:
        gone = await http.get(f"/jobs/{doc.id}/images/0/0")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "artifact_gone"
        unknown = await http.get(f"/jobs/{doc.id}/images/0/5")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


async def test_the_file_sweeper_removes_what_outlived_the_ttl(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
    await store.put("gcr/jobs/old/0-0.png", b"old")
    await store.put("gcr/jobs/new/0-0.png", b"new")
    old = tmp_path / "gcr" / "jobs" / "old" / "0-0.png"
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert await store.sweep(3600) == 1
    assert not old.exists() and (tmp_path / "gcr" / "jobs" / "new" / "0-0.png").exists()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 EMULATOR on loopback (not AWS), with a bucket; yields its endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="gcr-images")
    yield endpoint
    server.stop()


async def test_s3_store_with_presigned_redirects(s3: str, redis_url: str, redis_prefix: str, standin_url: str) -> None:
    settings = {"artifact_url": "s3://gcr-images/test", "artifact_redirect": True}
    async with Stack(redis_url, redis_prefix, standin_url, **settings) as stack:
        await stack.start_worker()
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), "green").save(buffer, format="PNG")
        source = base64.b64encode(buffer.getvalue()).decode()
        edit = await stack.wait(await stack.submit("make it blue", mode="edit", source_image=source, loop=LOOP))
        assert edit.status == "succeeded"
        assert _png_values(redis_url, redis_prefix) == []
        async with httpx.AsyncClient() as http:
            link = edit.rounds[1].candidates[1].image_url or ""
            redirect = await http.get(link)
            assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3)
            fetched = await http.get(redirect.headers["location"])  # the bucket answers, not the gateway
            assert fetched.status_code == 200 and fetched.content.startswith(PNG_MAGIC)
            source_answer = await http.get(edit.links["source_image"])
            assert source_answer.status_code == 200 and source_answer.content.startswith(PNG_MAGIC)
