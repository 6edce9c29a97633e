"""Regression tests for what an attack on a running stack broke (hardening, round 2)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable

import httpx
import openai
import pytest
from PIL import Image
from pydantic import ValidationError

from service.gateway.auth import hash_key
from service.jobs.keys import Keys
from service.servers import free_port
from service.settings import Settings
from tests.stack import Stack

RestartableRedis = tuple[str, tuple[Callable[[], None], Callable[[], None]]]


async def test_300_concurrent_polls_queue_for_connections_instead_of_failing(stack: Stack) -> None:
    await stack.register_idle_worker()
    job_id = await stack.submit("polled hard", loop={"max_rounds": 1})
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=60) as http:
        answers = await asyncio.gather(*(http.get(f"/jobs/{job_id}") for _ in range(300)))
    assert sorted({a.status_code for a in answers}) == [200]


async def test_the_queue_cap_holds_under_200_concurrent_submits(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, queue_max=50) as stack:
        await stack.register_idle_worker()
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=60) as http:
            answers = await asyncio.gather(*(http.post("/generate", json={"prompt": f"job {i}"}) for i in range(200)))
            queued = (await http.get("/admin/queue")).json()["queued"]
        codes = [a.status_code for a in answers]
        assert codes.count(202) == 50 and codes.count(429) == 150
        assert all(a.json()["error"]["code"] == "queue_full" for a in answers if a.status_code == 429)
        assert queued == 50


def test_idempotency_keys_of_two_tenants_never_collide_and_tenant_names_are_checked() -> None:
    keys = Keys("gcr")
    assert keys.idempotency("acme", "eu:k1") != keys.idempotency("acme:eu", "k1")
    with pytest.raises(ValidationError, match="tenant 'acme:eu'"):
        Settings(api_keys={hash_key("k"): "acme:eu"})
    with pytest.raises(ValidationError, match="SHA-256"):
        Settings(api_keys={"not-a-digest": "acme"})


async def test_admin_listing_refuses_nan_and_infinite_timestamps(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        for value in ("nan", "inf", "-inf"):
            answer = await http.get("/admin/jobs", params={"before": value})
            assert answer.status_code == 422, value
            assert answer.json()["error"]["field"] == "query.before"


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_no_critic_credential_or_internal_address_reaches_a_client(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    dead_critic = f"http://gcr-user:s3cret-pass@127.0.0.1:{free_port()}/v1"
    overrides = {"critic_base_url": dead_critic, "critic_retries": 0, "critic_outage_s": 0}
    async with Stack(redis_url, redis_prefix, standin_url, **overrides) as stack:
        await stack.start_worker()
        async with httpx.AsyncClient(base_url=stack.url) as http:
            critique = await http.post("/critique", json={"instruction": "a blue square", "image": _png()})
            job = await stack.wait(await stack.submit("a blue square", loop={"max_rounds": 1}))
            bodies = [critique.text, (await http.get(f"/jobs/{job.id}")).text]
        assert critique.status_code == 503 and critique.json()["error"]["code"] == "critic_unavailable"
        assert job.status == "failed" and job.error is not None and job.error.code == "critic_unavailable"
        for body in bodies:
            assert "s3cret" not in body and "gcr-user" not in body and dead_critic.split("@")[1] not in body


async def test_a_store_outage_names_no_redis_address(standin_url: str) -> None:
    port = free_port()  # nothing listens here
    async with Stack(f"redis://127.0.0.1:{port}/0", "gcr-nowhere", standin_url) as stack:
        async with httpx.AsyncClient(base_url=stack.url) as http:
            answers = [await http.get("/jobs/AAAAAAAAAAAAAAAAAAAAAA"), await http.get("/readyz")]
    assert [a.status_code for a in answers] == [503, 503]
    assert answers[0].json()["error"]["code"] == "store_unavailable"
    for answer in answers:
        assert str(port) not in answer.text and "127.0.0.1" not in answer.text


async def test_after_a_redis_restart_the_first_requests_succeed_and_streams_ride_it_out(
    own_redis: RestartableRedis, standin_url: str
) -> None:
    url, (start, kill) = own_redis
    # The rate limiter on: each request also writes its token bucket.
    async with Stack(url, "gcr-restart", standin_url, rate_limit_per_s=1000, rate_limit_burst=1000) as stack:
        await stack.start_worker(generator="sim:0.2")
        job_id = await stack.submit("through a restart", loop={"max_rounds": 6, "threshold": 1.0, "patience": None})
        types: list[str] = []

        async def follow() -> None:
            async for event in stack.client.events(job_id):
                types.append(event.type)

        follower = asyncio.create_task(follow())
        async with httpx.AsyncClient(base_url=stack.url, limits=httpx.Limits(max_connections=40)) as http:
            # every pooled connection of the gateway is in use once before the restart
            await asyncio.gather(*(http.get(f"/jobs/{job_id}") for _ in range(40)))
            while "round" not in types:
                await asyncio.sleep(0.05)
            kill()
            start()
            answers = await asyncio.gather(*(http.get(f"/jobs/{job_id}") for _ in range(40)))
            assert [a.status_code for a in answers] == [200] * 40
            # Writes too.
            submits = await asyncio.gather(
                *(http.post("/generate", json={"prompt": f"after {i}", "loop": {"max_rounds": 1}}) for i in range(20))
            )
            assert [a.status_code for a in submits] == [202] * 20, [a.text for a in submits if a.status_code != 202]
        await asyncio.wait_for(follower, timeout=60)
        assert "error" not in types and types[-1] == "end"
        assert (await stack.client.get(job_id)).status == "succeeded"


async def test_each_route_has_its_own_body_limit(redis_url: str, redis_prefix: str, standin_url: str) -> None:
    from service.gateway.app import body_limits

    async with Stack(redis_url, redis_prefix, standin_url, max_image_bytes=3000) as stack:
        limits = body_limits(stack.settings)
        assert limits["/generate"] < limits["/critique"]
        async with httpx.AsyncClient(base_url=stack.url) as http:
            # over /generate's limit, under /critique's: refused by its own route's limit, unread
            body = b"x" * (limits["/generate"] + 1)
            generate = await http.post("/generate", content=body, headers={"content-type": "application/json"})
            assert generate.status_code == 413 and str(limits["/generate"]) in generate.json()["error"]["message"]

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(limits["/generate"] // 65536 + 2):
                    yield b"x" * 65536

            streamed = await http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
            assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
            # routes that take no body accept only a small one
            cancel = await http.request("DELETE", "/jobs/AAAAAAAAAAAAAAAAAAAAAA", content=b"x" * (2 * 1024 * 1024))
            assert cancel.status_code == 413


async def test_a_declared_body_that_never_arrives_is_answered_408(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    async with Stack(redis_url, redis_prefix, standin_url, request_body_timeout_s=0.5) as stack:
        host, port = stack.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /generate HTTP/1.1\r\nHost: gcr\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), timeout=10)
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in body


async def test_a_wait_cut_by_a_redis_outage_answers_the_job_not_a_retryable_503(
    own_redis: RestartableRedis, standin_url: str
) -> None:
    url, (start, kill) = own_redis
    async with Stack(url, "gcr-wait-blip", standin_url) as stack:
        await stack.register_idle_worker()  # the job stays queued: the wait runs to its end
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            answer = asyncio.create_task(
                http.post("/generate", json={"prompt": "waited on"}, headers={"Prefer": "wait=3"})
            )
            async with asyncio.timeout(10):
                while not (await http.get("/admin/jobs")).json()["jobs"]:  # until it is stored
                    await asyncio.sleep(0.05)
            kill()
            response = await answer
            start()
        # The job exists and runs on: its document, without Preference-Applied, and no invitation
        # to retry (which would make a second job).
        assert response.status_code == 202, response.text
        assert "Preference-Applied" not in response.headers and response.headers.get("x-should-retry") != "true"
        job_id = response.json()["id"]
        assert (await stack.client.get(job_id)).status == "queued"


async def test_v1_waits_and_streams_ride_out_a_redis_outage(own_redis: RestartableRedis, standin_url: str) -> None:
    url, (start, kill) = own_redis
    async with Stack(url, "gcr-v1-blip", standin_url) as stack:
        await stack.start_worker(generator="sim:0.3")
        loop = {"gcr": {"loop": {"max_rounds": 4, "threshold": 1.0, "patience": None}}}
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=120) as client:
            waited = asyncio.create_task(client.images.generate(prompt="waited through", extra_body=loop))
            streamed: list[str] = []

            async def stream() -> None:
                async for event in await client.images.generate(
                    prompt="streamed through", stream=True, partial_images=3, extra_body=loop
                ):
                    streamed.append(event.type)

            streaming = asyncio.create_task(stream())
            await asyncio.sleep(0.8)  # both jobs are running
            kill()
            await asyncio.sleep(8)  # longer than a wait used to last
            start()
            result = await asyncio.wait_for(waited, 60)
            await asyncio.wait_for(streaming, 60)
    assert result.data and result.data[0].b64_json
    assert streamed[-1] == "image_generation.completed", streamed
