"""Critic faults seen through the loop: bounded retries, then a failed round with a clear
error; the job never hangs, and the breaker keeps a dead critic from burning every job."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client import REGISTRY

from service.servers import free_port
from tests.stack import Stack
from workers.critics.standin import running_standin
from workers.critics.standin_config import Fault, StandinConfig, StandinRule


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault(kind="status", status=500, times=100), "critic_unavailable"),
        (Fault(kind="timeout", timeout_s=5, times=100), "critic_timeout"),
        (Fault(kind="garbage", times=100), "critique_unparseable"),
    ],
)
async def test_fault_fails_the_job_with_a_clear_error(stack: Stack, fault: Fault, code: str) -> None:
    await stack.configure_critic(StandinConfig(faults=[fault]))
    await stack.start_worker(critic_timeout_s=0.5, critic_retries=1, critic_outage_s=1.0)
    doc = await stack.wait(await stack.submit("a broken judge", loop={"max_rounds": 3}), timeout_s=30)
    assert doc.status == "failed" and doc.stop_reason == "failed"
    assert doc.error is not None and doc.error.code == code and "could not be judged" in doc.error.message
    # An unusable critique never becomes a score, and never costs the image it was to judge:
    # the round is stored unjudged, its image downloadable.
    [round_] = doc.rounds
    assert round_.chosen is None and round_.overall is None and doc.best is None
    [candidate] = round_.candidates
    assert candidate.image_url is not None and candidate.critique is None
    assert candidate.error is not None and candidate.error.code == code
    assert (await stack.client.image(doc.id, 0, 0)).startswith(b"\x89PNG")


async def test_a_critique_waits_out_a_critic_outage(stack: Stack) -> None:
    """The critic is away for longer than the client's retries, shorter than
    GCR_CRITIC_OUTAGE_S: the round waits for it, and the job finishes with every round once."""
    config = StandinConfig(
        rules=[StandinRule(instruction="patient", rounds=[0.5, 0.9])],
        faults=[Fault(kind="status", status=503, times=6)],
    )
    await stack.configure_critic(config)
    await stack.start_worker(critic_retries=1, critic_outage_s=30, critic_breaker_failures=100)
    doc = await stack.wait(await stack.submit("patient", loop={"max_rounds": 3}), timeout_s=30)
    assert doc.status == "succeeded" and doc.stop_reason == "accepted"
    assert [r.index for r in doc.rounds] == [0, 1]
    assert all(r.chosen is not None for r in doc.rounds)


async def test_connection_refused_fails_fast_and_opens_the_breaker(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    await stack.start_worker(
        critic_base_url=dead,
        critic_retries=1,
        critic_breaker_failures=2,
        critic_breaker_cooldown_s=60,
        critic_outage_s=0,
    )
    first = await stack.wait(await stack.submit("job one"), timeout_s=20)
    assert first.status == "failed" and first.error is not None and first.error.code == "critic_unavailable"
    second = await stack.wait(await stack.submit("job two"), timeout_s=20)
    assert second.status == "failed"
    # The breaker is open now: the worker stops claiming, and /readyz says why.
    third = await stack.submit("job three")
    async with httpx.AsyncClient(base_url=stack.url) as http:
        async with asyncio.timeout(5):
            while (ready := await http.get("/readyz")).json().get("critic") != "down":
                await asyncio.sleep(0.1)
    assert ready.status_code == 503
    # The breaker opened with job two's failure, before job three was submitted: an open
    # breaker claims nothing, so no wait can make this pass by luck.
    assert (await stack.client.get(third)).status == "queued"


async def test_a_transient_500_is_retried_and_the_job_succeeds(stack: Stack) -> None:
    config = StandinConfig(
        rules=[StandinRule(instruction="flaky", rounds=[0.9])], faults=[Fault(kind="status", status=503, times=1)]
    )
    await stack.configure_critic(config)
    await stack.start_worker(critic_retries=2)
    retries_before = REGISTRY.get_sample_value("gcr_critic_retries_total", {"reason": "503"}) or 0.0
    doc = await stack.wait(await stack.submit("a flaky judge"))
    assert doc.status == "succeeded" and doc.stop_reason == "accepted"
    assert (await stack.critic_stats())["requests"] == 2
    assert REGISTRY.get_sample_value("gcr_critic_retries_total", {"reason": "503"}) == retries_before + 1


async def test_missing_refined_request_stops_with_no_refinement(stack: Stack) -> None:
    await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction="mute", rounds=[0.3], refine=False)]))
    await stack.start_worker()
    doc = await stack.wait(await stack.submit("a mute critic", loop={"max_rounds": 3}))
    assert doc.status == "succeeded" and doc.stop_reason == "no_refinement"
    assert len(doc.rounds) == 1 and doc.best is not None


async def test_readyz_recovers_when_the_critic_comes_back_without_any_job(stack: Stack) -> None:
    port = free_port()
    await stack.start_worker(
        critic_base_url=f"http://127.0.0.1:{port}/v1",
        critic_retries=0,
        critic_breaker_failures=1,
        critic_breaker_cooldown_s=3600,  # no trial job would come for an hour
    )
    waiting = await stack.submit("while the critic is down", loop={"max_rounds": 1})
    async with httpx.AsyncClient(base_url=stack.url) as http:
        async with asyncio.timeout(5):
            while (await http.get("/readyz")).json().get("critic") != "down":
                await asyncio.sleep(0.1)
        with running_standin(port=port):  # the reward model server is back; nobody submits anything
            async with asyncio.timeout(15):
                while (ready := await http.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.1)
            assert ready.json()["critic"] == "ok"
            # The job that was waiting for its critique (GCR_CRITIC_OUTAGE_S) is judged now.
            done = await stack.wait(waiting, timeout_s=20)
    assert done.status == "succeeded" and len(done.rounds) == 1 and done.rounds[0].chosen == 0
