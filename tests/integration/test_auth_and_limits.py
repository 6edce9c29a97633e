"""API keys, tenant isolation, rate limit, queue cap and input limits, over real HTTP and Redis."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from collections.abc import AsyncIterator

import httpx
import psutil
import pytest
from PIL import Image

from service.gateway.auth import hash_key
from tests.stack import Stack

ALICE, BOB, ADMIN = "key-alice", "key-bob", "key-admin"
AUTH = {
    "auth_disabled": False,
    "api_keys": {hash_key(ALICE): "alice", hash_key(BOB): "bob"},
    "admin_keys": {hash_key(ADMIN): "ops"},
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def secured(redis_url: str, redis_prefix: str, standin_url: str):  # type: ignore[no-untyped-def]
    async with Stack(redis_url, redis_prefix, standin_url, **AUTH) as stack:
        yield stack


async def test_requests_need_a_known_key(secured: Stack) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        for headers in ({}, bearer("wrong"), {"Authorization": "Basic abc"}):
            response = await http.post("/generate", json={"prompt": "x"}, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert (await http.get("/healthz")).status_code == 200


async def test_readyz_tells_anyone_whether_and_only_an_admin_why(secured: Stack) -> None:
    await secured.start_worker()
    async with httpx.AsyncClient(base_url=secured.url) as http:
        for headers in ({}, bearer(ALICE), bearer("wrong")):
            public = await http.get("/readyz", headers=headers)
            assert public.status_code == 200 and public.json()["ready"] is True
            assert not {"workers", "models", "modes", "queued", "streams"} & set(public.json()), public.json()
            assert "w0" not in public.text and "torch" not in public.text
        admin = (await http.get("/readyz", headers=bearer(ADMIN))).json()
    assert [w["id"] for w in admin["workers"]] == ["w0"] and admin["queued"] == 0 and "models" in admin


async def test_another_tenants_job_answers_404_everywhere(secured: Stack) -> None:
    await secured.start_worker()
    async with httpx.AsyncClient(base_url=secured.url) as http:
        response = await http.post(
            "/generate", json={"prompt": "alice's cat", "loop": {"max_rounds": 1}}, headers=bearer(ALICE)
        )
        assert response.status_code == 202
        job_id = response.json()["id"]
        secured.client.http.headers.update(bearer(ALICE))
        await secured.wait(job_id)

        for method, path in (
            ("GET", f"/jobs/{job_id}"),
            ("GET", f"/jobs/{job_id}/events"),
            ("GET", f"/jobs/{job_id}/images/0/0"),
            ("DELETE", f"/jobs/{job_id}"),
        ):
            theirs = await http.request(method, path, headers=bearer(BOB))
            unknown = await http.request(method, path.replace(job_id, "x" * len(job_id)), headers=bearer(BOB))
            assert theirs.status_code == unknown.status_code == 404, path
            assert theirs.json()["error"]["code"] == "not_found"
            assert (await http.request(method, path, headers=bearer(ALICE))).status_code == 200, path

        # the admin key sees every tenant's jobs; a tenant key is known, but may not list (403)
        listing = await http.get("/admin/jobs", headers=bearer(ADMIN))
        assert listing.status_code == 200 and [j["id"] for j in listing.json()["jobs"]] == [job_id]
        for path in ("/admin/jobs", "/admin/queue"):
            refused = await http.get(path, headers=bearer(ALICE))
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden", path
        assert (await http.get("/admin/jobs", headers=bearer("gcr_not-a-key"))).status_code == 401
        stats = await http.get("/admin/queue", headers=bearer(ADMIN))
        assert stats.status_code == 200 and stats.json()["workers"]


async def test_job_ids_are_unguessable(secured: Stack) -> None:
    await secured.register_idle_worker()
    async with httpx.AsyncClient(base_url=secured.url, headers=bearer(ALICE)) as http:
        ids = [(await http.post("/generate", json={"prompt": f"p{i}"})).json()["id"] for i in range(5)]
    assert len(set(ids)) == 5
    assert all(len(i) >= 22 for i in ids)  # 128 random bits, url-safe base64


async def test_rate_limit_answers_429_with_retry_after(redis_url: str, redis_prefix: str, standin_url: str) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, **AUTH, rate_limit_per_s=1, rate_limit_burst=3) as stack:
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(ALICE)) as http:
            codes = [(await http.get("/jobs/none")).status_code for _ in range(5)]
            assert codes[:3] == [404, 404, 404]
            assert codes[3:] == [429, 429]
            limited = await http.get("/jobs/none")
            assert limited.json()["error"]["code"] == "rate_limited"
            assert int(limited.headers["Retry-After"]) >= 1
            # another key has its own bucket
            assert (await http.get("/jobs/none", headers=bearer(BOB))).status_code == 404


async def test_queue_cap_answers_429(redis_url: str, redis_prefix: str, standin_url: str) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, queue_max=2) as stack:
        await stack.register_idle_worker()
        async with httpx.AsyncClient(base_url=stack.url) as http:
            assert (await http.post("/generate", json={"prompt": "a"})).status_code == 202
            assert (await http.post("/generate", json={"prompt": "b"})).status_code == 202
            full = await http.post("/generate", json={"prompt": "c"})
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert full.headers["Retry-After"]
            # queued jobs show their position
            listing = [await stack.client.get((await http.get("/admin/jobs")).json()["jobs"][i]["id"]) for i in (0, 1)]
            assert sorted(d.queue_position for d in listing if d.queue_position is not None) == [0, 1]


async def test_idempotency_key_returns_the_same_job(stack: Stack) -> None:
    await stack.register_idle_worker()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        first = await http.post("/generate", json={"prompt": "once"}, headers={"Idempotency-Key": "k1"})
        again = await http.post("/generate", json={"prompt": "once"}, headers={"Idempotency-Key": "k1"})
        other = await http.post("/generate", json={"prompt": "different"}, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert other.status_code == 422 and other.json()["error"]["field"] == "Idempotency-Key"


def solid_png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="PNG")
    return out.getvalue()


async def test_an_idempotency_key_is_bound_to_the_uploaded_image_too(stack: Stack) -> None:
    await stack.start_worker()
    red, blue = solid_png("red"), solid_png("blue")
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:

        async def native(image: bytes) -> httpx.Response:
            request = {"request": '{"prompt": "make it green", "mode": "edit", "loop": {"max_rounds": 1}}'}
            files = {"source_image": ("src.png", image, "image/png")}
            return await http.post("/generate", data=request, files=files, headers={"Idempotency-Key": "img-1"})

        async def openai(image: bytes) -> httpx.Response:
            files = {"image": ("src.png", image, "image/png")}
            data = {"prompt": "make it green", "gcr": '{"loop": {"max_rounds": 1}}'}
            return await http.post("/v1/images/edits", data=data, files=files, headers={"Idempotency-Key": "img-2"})

        first, again, other = await native(red), await native(red), await native(blue)
        assert (first.status_code, again.status_code) == (202, 200) and first.json()["id"] == again.json()["id"]
        assert other.status_code == 422 and other.json()["error"]["field"] == "Idempotency-Key"

        first, again, other = await openai(red), await openai(red), await openai(blue)
        assert (first.status_code, again.status_code) == (200, 200), first.text
        assert first.headers["X-Gcr-Job-Id"] == again.headers["X-Gcr-Job-Id"]
        assert other.status_code == 400, other.text
        assert "Idempotency-Key" in other.json()["error"]["message"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size; decoding it would need width*height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"prompt": "x", "mode": "edit"}, "source_image", "invalid_input"),
        ({"prompt": "x", "source_image": "AAAA"}, "source_image", "invalid_input"),
        ({"prompt": "x", "mode": "edit", "source_image": "not base64!"}, "source_image", "invalid_input"),
        ({"prompt": "x", "mode": "edit", "source_image": b64(b"GIF89a not really")}, "source_image", "invalid_input"),
        (
            {"prompt": "x", "mode": "edit", "source_image": b64(png_header_only(40000, 40000))},
            "source_image",
            "invalid_input",
        ),
        ({"prompt": "x" * 5000}, "prompt", "invalid_input"),
        ({"prompt": "   "}, "prompt", "invalid_input"),
        ({"prompt": "x", "generation": {"width": 100}}, "generation.width", "invalid_input"),
        ({"prompt": "x", "generation": {"steps": 0}}, "generation.steps", "invalid_input"),
        ({"prompt": "x", "loop": {"candidates_per_round": 99}}, "loop.candidates_per_round", "invalid_input"),
        ({"prompt": "x", "loop": {"deadline_s": -1}}, "loop.deadline_s", "invalid_input"),
        ({"prompt": "x", "loop": {"min_scores": {"beauty": 3}}}, "loop.min_scores", "invalid_input"),
    ],
)
async def test_bad_input_is_a_clear_4xx(stack: Stack, body: dict[str, object], field: str, code: str) -> None:
    await stack.register_idle_worker()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post("/generate", json=body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["field"] == field, error
    assert error["message"]


async def test_oversized_upload_is_refused_before_decoding(redis_url: str, redis_prefix: str, standin_url: str) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, max_image_bytes=2048) as stack:
        async with httpx.AsyncClient(base_url=stack.url) as http:
            big = b64(b"\x89PNG" + b"\x00" * 4000)
            response = await http.post("/generate", json={"prompt": "x", "mode": "edit", "source_image": big})
            assert response.status_code == 422 and "2048 bytes" in response.json()["error"]["message"]
            files = {"source_image": ("big.png", b"\x00" * 5000, "image/png")}
            response = await http.post("/generate", data={"request": '{"prompt": "x", "mode": "edit"}'}, files=files)
            assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


async def test_multipart_edit_upload_is_accepted_and_linked(stack: Stack) -> None:
    await stack.register_idle_worker()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        files = {"source_image": ("src.png", small_png(), "image/png")}
        response = await http.post(
            "/generate", data={"request": '{"prompt": "make it blue", "mode": "edit"}'}, files=files
        )
        assert response.status_code == 202, response.text
        doc = (await http.get(f"/jobs/{response.json()['id']}")).json()
        source = await http.get(doc["links"]["source_image"])
    assert source.status_code == 200 and Image.open(io.BytesIO(source.content)).size == (32, 32)


async def test_unsupported_content_type(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post("/generate", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


async def test_idempotent_retry_after_a_failed_store_creates_the_job(stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The key is freed when the job could not be stored, so the client's retry works."""
    await stack.register_idle_worker()
    from service.errors import StoreUnavailable
    from service.jobs.lifecycle import JobLifecycle

    original = JobLifecycle.create
    calls = {"n": 0}

    async def flaky(self, doc, source_png=None, queue_max=0):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreUnavailable("Redis is unavailable: injected")
        return await original(self, doc, source_png, queue_max)

    monkeypatch.setattr(JobLifecycle, "create", flaky)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        first = await http.post("/generate", json={"prompt": "retry me"}, headers={"Idempotency-Key": "k2"})
        again = await http.post("/generate", json={"prompt": "retry me"}, headers={"Idempotency-Key": "k2"})
        replay = await http.post("/generate", json={"prompt": "retry me"}, headers={"Idempotency-Key": "k2"})
    assert first.status_code == 503 and first.headers["Retry-After"]
    assert again.status_code == 202
    assert replay.status_code == 200 and replay.json()["id"] == again.json()["id"]


async def test_crafted_ids_and_event_ids_are_refused_cleanly(stack: Stack) -> None:
    await stack.register_idle_worker()
    job_id = await stack.submit("a real job")
    async with httpx.AsyncClient(base_url=stack.url) as http:
        for path in (f"/jobs/{job_id}:events", f"/jobs/{job_id}:rounds", "/jobs/a*b"):
            assert (await http.get(path)).status_code == 404, path
            assert (await http.delete(path)).status_code == 404, path
        response = await http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "garbage"})
        assert response.status_code == 422 and response.json()["error"]["field"] == "Last-Event-ID"


async def test_oversized_bodies_are_refused_before_they_are_read(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, max_image_bytes=3000) as stack:
        limit = 2 * (3000 * 4 // 3) + 1024 * 1024
        async with httpx.AsyncClient(base_url=stack.url) as http:
            declared = await http.post(
                "/critique", content=b"x" * (limit + 1), headers={"content-type": "application/json"}
            )
            assert declared.status_code == 413 and declared.json()["error"]["code"] == "payload_too_large"

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(limit // 65536 + 2):
                    yield b"x" * 65536

            streamed = await http.post("/critique", content=chunks(), headers={"content-type": "application/json"})
            assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
            long_instruction = await http.post("/critique", json={"instruction": "x" * 5000, "image": "AAAA"})
            assert long_instruction.status_code == 422


async def test_a_burst_of_large_uploads_is_decoded_a_few_at_a_time(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    """Small files that declare many pixels each cost their full size decoded: twelve at once
    took a gateway from 514 MB to 1,032 MB. Decoded a few at a time, the gateway (this
    process) grows by what `DECODE_THREADS` images take, not by what twelve do."""
    from service.gateway import uploads

    out = io.BytesIO()
    Image.new("RGB", (4096, 4096)).save(out, format="PNG")
    small_but_large = out.getvalue()
    assert len(small_but_large) < 100_000  # 48 MB of pixels once decoded
    process = psutil.Process()
    async with Stack(redis_url, redis_prefix, standin_url, rate_limit_burst=100) as stack:
        await stack.register_idle_worker()
        before = peak = process.memory_info().rss

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, process.memory_info().rss)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            answers = await asyncio.gather(
                *(
                    http.post(
                        "/generate",
                        data={"request": f'{{"prompt": "edit {i}", "mode": "edit"}}'},
                        files={"source_image": ("big.png", small_but_large, "image/png")},
                    )
                    for i in range(12)
                )
            )
        watcher.cancel()
    assert [a.status_code for a in answers] == [202] * 12
    grown_mb = (peak - before) / 2**20
    # Each decode holds the pixels, their RGB copy and the PNG written again (~150 MB for
    # 4096x4096); all twelve at once grew this process by ~800 MB.
    assert grown_mb < 200 * uploads.DECODE_THREADS, f"the gateway grew by {grown_mb:.0f} MB"
