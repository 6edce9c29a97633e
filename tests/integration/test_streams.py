"""Open streams and waits: they hold no pooled Redis connection, they are limited per key
and in all (429 before the stream starts), `Last-Event-ID` is bounded, and the sync
SDK's wait deadline holds. Real gateway on loopback, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

import gcr
from gcr import errors
from service.gateway.auth import hash_key
from tests.stack import Stack

ALICE, BOB, ADMIN = "key-alice", "key-bob", "key-admin"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def open_stream(http: httpx.AsyncClient, job_id: str, **headers: str) -> AsyncIterator[httpx.Response]:
    """A stream whose status line has arrived; it stays open until the block exits."""
    async with http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as response:
        yield response


async def test_open_streams_and_waits_do_not_starve_ordinary_requests(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    # A pool of 8 connections and 40 streams plus 10 `Prefer: wait` requests on it: each used
    # to hold a connection in a blocking XREAD, so polls waited 2 s for one and answered 503.
    overrides = {"redis_max_connections": 8, "redis_pool_timeout_s": 2.0}
    async with Stack(redis_url, redis_prefix, standin_url, **overrides) as stack:
        await stack.register_idle_worker()  # jobs are accepted and stay queued: their streams are quiet
        jobs = [await stack.submit(f"quiet job {n}", loop={"max_rounds": 1}) for n in range(5)]
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30, limits=limits) as http:
            async with contextlib.AsyncExitStack() as streams:
                opened = [await streams.enter_async_context(open_stream(http, jobs[n % len(jobs)])) for n in range(40)]
                assert all(r.status_code == 200 for r in opened)
                waits = [
                    asyncio.create_task(
                        http.post("/generate", json={"prompt": f"wait {n}"}, headers={"Prefer": "wait=6"})
                    )
                    for n in range(10)
                ]
                await asyncio.sleep(1.0)  # every stream and wait is now blocked on its job's events
                started = time.monotonic()
                answers = await asyncio.gather(
                    *(http.get(f"/jobs/{jobs[n % len(jobs)]}") for n in range(20)),
                    *(http.post("/generate", json={"prompt": f"more {n}"}) for n in range(5)),
                )
                took = time.monotonic() - started
                assert [a.status_code for a in answers] == [200] * 20 + [202] * 5
                assert took < 1.5, f"ordinary requests took {took:.2f}s behind open streams"
                ready = (await http.get("/readyz")).json()
                assert ready["streams"]["open"] >= 40 and ready["listener"] == "ok"

                # The listener still delivers: a cancelled job's stream gets its end.
                await http.delete(f"/jobs/{jobs[0]}")
                lines: list[str] = []
                async with asyncio.timeout(5):
                    async for line in opened[0].aiter_lines():
                        lines.append(line)
                        if line == "event: end":
                            break
                assert "event: status" in lines
                done = await asyncio.gather(*waits)
                assert {a.status_code for a in done} == {202}  # nobody runs them: the wait ran out


async def test_stream_limits_answer_429_before_the_stream_starts(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    overrides = {
        "auth_disabled": False,
        "api_keys": {hash_key(ALICE): "alice", hash_key(BOB): "bob"},
        "admin_keys": {hash_key(ADMIN): "ops"},  # /readyz's stream counts are for admins
        "max_open_streams_per_key": 2,
        "max_open_streams": 3,
    }
    async with Stack(redis_url, redis_prefix, standin_url, **overrides) as stack:
        await stack.register_idle_worker()
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            posted = [await http.post("/generate", json={"prompt": "x"}, headers=bearer(key)) for key in (ALICE, BOB)]
            alice_job, bob_job = (p.json()["id"] for p in posted)
            async with contextlib.AsyncExitStack() as streams:
                for _ in range(2):
                    ok = await streams.enter_async_context(open_stream(http, alice_job, **bearer(ALICE)))
                    assert ok.status_code == 200
                third = await http.get(f"/jobs/{alice_job}/events", headers=bearer(ALICE))
                assert third.status_code == 429 and third.headers["Retry-After"].isdigit()
                body = third.json()["error"]
                assert body["code"] == "too_many_streams" and body["retryable"] and "PER_KEY" in body["message"]
                async with gcr.AsyncClient(stack.url, api_key=ALICE, max_retries=0) as client:
                    with pytest.raises(errors.TooManyStreamsError) as refused:
                        async for _ in client.events(alice_job):
                            pass
                    assert refused.value.status == 429 and refused.value.retry_after_s is not None
                # A `Prefer: wait` past the limit is not applied: 202 at once, the job exists.
                started = time.monotonic()
                waited = await http.post(
                    "/generate", json={"prompt": "y"}, headers={**bearer(ALICE), "Prefer": "wait=10"}
                )
                assert waited.status_code == 202 and "Preference-Applied" not in waited.headers
                assert time.monotonic() - started < 3

                bob_stream = await streams.enter_async_context(open_stream(http, bob_job, **bearer(BOB)))
                assert bob_stream.status_code == 200
                overall = await http.get(f"/jobs/{bob_job}/events", headers=bearer(BOB))
                assert overall.status_code == 429 and "GCR_MAX_OPEN_STREAMS)" in overall.json()["error"]["message"]
            # Closed streams give their slots back.
            async with asyncio.timeout(5):
                while (await http.get("/readyz", headers=bearer(ADMIN))).json()["streams"]["open"]:
                    await asyncio.sleep(0.05)
            async with open_stream(http, alice_job, **bearer(ALICE)) as again:
                assert again.status_code == 200


async def test_last_event_id_is_bounded_and_a_finished_stream_ends(stack: Stack) -> None:
    await stack.start_worker()
    job_id = await stack.submit("a short job", loop={"max_rounds": 1})
    await stack.wait(job_id)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        # Larger than Redis's 64-bit stream ids: Redis refused the read and the client got a 503.
        huge = await http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "99999999999999999999-0"})
        assert huge.status_code == 422 and huge.json()["error"]["field"] == "Last-Event-ID"
        # An id from the future on a finished job: the stream waited forever for it.
        future = await http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "9999999999999-0"})
        assert future.status_code == 422 and "ahead" in future.json()["error"]["message"]
        # The end's own id (a client that reconnects after the end): the end again, at once.
        lines: list[str] = []
        async with http.stream("GET", f"/jobs/{job_id}/events") as response:
            async for line in response.aiter_lines():
                lines.append(line)
        ids = [line.removeprefix("id: ") for line in lines if line.startswith("id: ")]
        end_id = ids[-1]
        # An id between two it sent, that it never sent: a 422 as the docs say, not a replay.
        ms, seq = ids[0].split("-")
        never = f"{ms}-{int(seq) + 1000}" if f"{ms}-{int(seq) + 1000}" not in ids else f"{int(ms) + 1}-999"
        invented = await http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": never})
        assert invented.status_code == 422 and "was not sent" in invented.json()["error"]["message"]
        # An id it sent: the events after it.
        resumed = await http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": ids[0]})
        assert resumed.status_code == 200 and f"id: {ids[0]}" not in resumed.text and "event: end" in resumed.text
        started = time.monotonic()
        again = await http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": end_id})
        assert again.status_code == 200 and "event: end" in again.text
        assert time.monotonic() - started < 3


async def test_sync_wait_honours_its_deadline_while_events_flow(stack: Stack) -> None:
    # A job that sends progress events all the time: no read ever timed out, so the deadline
    # was never looked at and `wait(timeout=1)` returned when the job ended.
    await stack.start_worker(generator="sim:8")
    job_id = await stack.submit("a slow steady job", loop={"max_rounds": 1}, generation={"steps": 40})

    def wait() -> float:
        with gcr.Client(stack.url) as client:
            started = time.monotonic()
            with pytest.raises(errors.WaitTimeout, match="within 1s"):
                client.wait(job_id, timeout=1)
            return time.monotonic() - started

    took = await asyncio.to_thread(wait)
    assert took < 2.5, f"wait(timeout=1) returned after {took:.1f}s"
