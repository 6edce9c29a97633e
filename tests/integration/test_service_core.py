"""The service core end to end: gateway + Redis + worker + stand-in critic over real HTTP."""

from __future__ import annotations

import asyncio
import io

import httpx
from PIL import Image

from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule


def schedule(instruction: str, *rounds: float | list[float], refine: bool = True) -> StandinConfig:
    return StandinConfig(rules=[StandinRule(instruction=instruction, rounds=list(rounds), refine=refine)])


async def test_threshold_crossed_in_round_two(stack: Stack) -> None:
    await stack.configure_critic(schedule("red fox", 0.40, 0.80))
    await stack.start_worker()
    job_id = await stack.submit(
        "a red fox in snow", generation={"width": 96, "height": 64}, loop={"max_rounds": 4, "threshold": 0.75}
    )
    doc = await stack.wait(job_id)

    assert doc.status == "succeeded"
    assert doc.stop_reason == "accepted"
    assert len(doc.rounds) == 2
    assert doc.best is not None and doc.best.round == 1
    assert abs(doc.best.overall - 0.80) < 1e-3
    # round 2 used the critic's refined request of round 1
    assert doc.rounds[1].prompt == "a red fox in snow [refined r0 c0]"
    assert doc.critic_model == "gcr-standin-critic"
    png = await stack.client.download(doc.best.image_url or "")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (96, 64)


async def test_best_round_not_last_at_max_rounds(stack: Stack) -> None:
    await stack.configure_critic(schedule("lighthouse", 0.30, 0.60, 0.50))
    await stack.start_worker()
    job_id = await stack.submit("a lighthouse at dusk", loop={"max_rounds": 3, "threshold": 0.9, "patience": None})
    doc = await stack.wait(job_id)

    assert doc.status == "succeeded"
    assert doc.stop_reason == "max_rounds"
    assert [round(r.overall or 0, 3) for r in doc.rounds] == [0.3, 0.6, 0.5]
    assert doc.best is not None and doc.best.round == 1
    assert doc.summary is not None and doc.summary.rounds_used == 3
    assert doc.summary.gain is not None and abs(doc.summary.gain - 0.3) < 1e-3


async def test_every_candidate_is_judged_against_the_original_instruction(stack: Stack) -> None:
    await stack.configure_critic(schedule("teapot", 0.2, 0.3, 0.4))
    await stack.start_worker()
    doc = await stack.wait(await stack.submit("a teapot", loop={"max_rounds": 3, "threshold": 0.95, "patience": None}))

    assert len(doc.rounds) == 3
    assert doc.rounds[1].prompt != "a teapot"
    stats = await stack.critic_stats()
    assert stats["by_instruction"] == {"a teapot": 3}


async def test_cancel_while_queued_never_runs(stack: Stack) -> None:
    await stack.register_idle_worker()
    job_id = await stack.submit("a queued cat")
    doc = await stack.client.cancel(job_id)
    assert doc.status == "cancelled" and doc.stop_reason == "cancelled"

    await stack.start_worker()
    other = await stack.wait(await stack.submit("a later dog", loop={"max_rounds": 1}))
    assert other.status == "succeeded"
    doc = await stack.client.get(job_id)
    assert doc.status == "cancelled" and doc.rounds == [] and doc.attempts == 0


async def test_cancel_while_running_stops_at_a_stage_boundary(stack: Stack) -> None:
    await stack.configure_critic(StandinConfig(latency_s=0.3))
    await stack.start_worker(generator="sim:0.3")
    job_id = await stack.submit("a slow painting", loop={"max_rounds": 10, "threshold": 1.0, "patience": None})
    async with asyncio.timeout(10):
        while (await stack.client.get(job_id)).status != "running":
            await asyncio.sleep(0.02)
    await stack.client.cancel(job_id)
    doc = await stack.wait(job_id)

    assert doc.status == "cancelled" and doc.stop_reason == "cancelled"
    assert len(doc.rounds) < 10


async def test_two_workers_share_one_queue_without_running_a_job_twice(stack: Stack) -> None:
    await stack.configure_critic(StandinConfig(latency_s=0.05))
    await stack.start_worker(generator="sim:0.05", max_inflight_jobs=2)
    await stack.start_worker(generator="sim:0.05", max_inflight_jobs=2)
    ids = [await stack.submit(f"job number {i}", loop={"max_rounds": 2, "threshold": 1.0}) for i in range(10)]
    docs = [await stack.wait(job_id) for job_id in ids]

    assert all(d.status == "succeeded" and len(d.rounds) == 2 for d in docs)
    assert all(d.attempts == 1 for d in docs)
    assert {d.worker for d in docs} == {"w0", "w1"}
    stats = await stack.critic_stats()
    assert stats["requests"] == 20
    assert all(count == 2 for count in stats["by_instruction"].values())


async def test_sse_delivers_round_events_in_order_and_ends(stack: Stack) -> None:
    await stack.configure_critic(schedule("harbor", 0.2, 0.4, 0.9))
    await stack.start_worker()
    job_id = await stack.submit("a harbor at night", loop={"max_rounds": 3, "threshold": 0.8, "patience": None})
    types: list[str] = []
    rounds: list[int] = []
    async with asyncio.timeout(20):
        async for event in stack.client.events(job_id):
            types.append(event.type)
            if event.type == "round":
                rounds.append(event.data["round"]["index"])
    assert rounds == [0, 1, 2]
    assert types[-1] == "end"
    assert "stage" in types and "progress" in types
    doc = await stack.client.get(job_id)
    assert doc.status == "succeeded" and doc.stop_reason == "accepted"


async def test_unknown_ids_and_bad_bodies(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        for path in ("/jobs/nope", "/jobs/nope/events", "/jobs/nope/images/0/0"):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"
        assert (await http.delete("/jobs/nope")).status_code == 404

        response = await http.post("/generate", json={"prompt": "x", "loop": {"max_rounds": 0}})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "invalid_input" and error["field"] == "loop.max_rounds"

        response = await http.post("/generate", json={"prompt": "x", "colour": "red"})
        assert response.status_code == 422 and response.json()["error"]["field"] == "colour"

        response = await http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 422


async def test_readyz_needs_a_live_worker(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        assert (await http.get("/healthz")).status_code == 200
        response = await http.get("/readyz")
        assert response.status_code == 503 and response.json()["redis"] == "ok"
        await stack.start_worker()
        async with asyncio.timeout(5):
            while (response := await http.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)
        assert response.json()["workers"][0]["generator"] == "sim:0.0"


async def test_sse_outlives_a_long_queue_wait(stack: Stack) -> None:
    """A stream on a job that waits longer than redis-py's default socket timeout (5 s)
    keeps streaming; it used to end with a store_unavailable error event."""
    await stack.register_idle_worker()
    job_id = await stack.submit("a patient client", loop={"max_rounds": 1})
    types: list[str] = []

    async def follow() -> None:
        async for event in stack.client.events(job_id):
            types.append(event.type)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(6.0)
    assert not follower.done()
    await stack.start_worker()
    await asyncio.wait_for(follower, timeout=20)
    assert types[-1] == "end" and "round" in types
