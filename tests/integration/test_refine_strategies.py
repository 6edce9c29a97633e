"""Refine by editing, through the real path: a text-to-image worker on the tiny SD pipeline
and an edit worker on the tiny FLUX Kontext pipeline, one gateway, the stand-in critic over
HTTP. A job of strategy `edit` or `auto` hops between the two workers' streams."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from gcr.types import JobDocument
from service.settings import Settings
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule

pytest_plugins = ("tests.generator_fixtures",)

PAINTER, EDITOR = "tiny:sd", "tiny:kontext"
# Scripted overall scores by round: round 1 is far (0.40), round 2 close (0.62), round 3 worse.
SCHEDULE = [0.40, 0.62, 0.55]
NEVER_ACCEPT = {"max_rounds": 3, "threshold": 1.0, "patience": None}


@pytest.fixture
async def two_workers(stack: Stack, generator_settings: Callable[..., Settings]) -> Stack:
    await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction="bicycle", rounds=SCHEDULE)]))
    tiny = generator_settings()
    for generator in (PAINTER, EDITOR):
        await stack.start_worker(
            generator=generator, cache_dir=tiny.cache_dir, generator_device="cpu", generator_dtype="float32"
        )
    return stack


async def run(stack: Stack, prompt: str, candidates: int = 1, **loop: Any) -> tuple[JobDocument, list[dict[str, Any]]]:
    """Run a job to its end; return it and what the critic was asked for it."""
    job_id = await stack.submit(prompt, loop={**NEVER_ACCEPT, "candidates_per_round": candidates, **loop})
    doc = await stack.wait(job_id, timeout_s=180)
    assert doc.status == "succeeded", doc.error
    judged = [j for j in (await stack.critic_stats())["judged"] if j["instruction"] == prompt]
    return doc, judged


def hops_to(model: str) -> float:
    """`gcr_worker_hops_total{to_model}` of the workers in this process."""
    return REGISTRY.get_sample_value("gcr_worker_hops_total", {"to_model": model}) or 0.0


def assert_judged_as_text_to_image(doc: JobDocument, judged: list[dict[str, Any]]) -> None:
    """Every candidate, whatever made it, was judged alone (one image, t2i) against the
    ORIGINAL instruction; the PNG says which model made it."""
    made = [(r.index, c.index, r.model) for r in doc.rounds for c in r.candidates]
    asked = sorted((j["round"], j["candidate"], j["generator"]) for j in judged)
    assert asked == sorted(made)
    assert {j["mode"] for j in judged} == {"t2i"} and all(len(j["sizes"]) == 1 for j in judged)


async def test_rewrite_regenerates_from_the_refined_request_on_the_text_to_image_model(two_workers: Stack) -> None:
    doc, judged = await run(two_workers, "a bicycle, rewrite", strategy="rewrite")
    assert [(r.action, r.model, r.edited_from) for r in doc.rounds] == [("generate", PAINTER, None)] * 3
    assert [r.prompt for r in doc.rounds] == [
        "a bicycle, rewrite",
        "a bicycle, rewrite [refined r0 c0]",
        "a bicycle, rewrite [refined r1 c0]",
    ]
    assert doc.spec.loop.edit_model is None  # rewrite needs no edit model and names none
    assert_judged_as_text_to_image(doc, judged)


async def test_edit_edits_the_best_image_so_far_on_the_edit_model(two_workers: Stack) -> None:
    calls_before = {w.model: w.scheduler.calls for w, _, _ in two_workers.workers}
    hops_before = hops_to(EDITOR)
    doc, judged = await run(two_workers, "a bicycle, edit", candidates=2, strategy="edit")
    assert hops_to(EDITOR) - hops_before == 1  # one hop: the edit rounds stay on the edit model
    assert [(r.action, r.model) for r in doc.rounds] == [("generate", PAINTER), ("edit", EDITOR), ("edit", EDITOR)]
    # round 2 edits round 1's best; round 3 edits round 2's (0.62 beats 0.40)
    assert [r.edited_from and (r.edited_from.round, r.edited_from.candidate) for r in doc.rounds] == [
        None,
        (0, 0),
        (1, 0),
    ]
    # the instruction is the refinement comments of the image being edited
    assert doc.rounds[1].prompt == "Stand-in comment on round 1, candidate 1: no image was looked at."
    assert doc.rounds[2].prompt == "Stand-in comment on round 2, candidate 1: no image was looked at."
    assert doc.spec.loop.edit_model == EDITOR  # the fleet's default edit model, recorded
    assert doc.rounds[1].reason is not None and doc.rounds[1].reason.startswith("strategy edit")
    assert_judged_as_text_to_image(doc, judged)
    # both candidates of an edit round shared one Kontext call: batching holds on each model
    calls = {w.model: w.scheduler.calls - calls_before[w.model] for w, _, _ in two_workers.workers}
    assert calls == {PAINTER: 1, EDITOR: 2}
    # the best is round 2's edit, and its image is served
    assert doc.best is not None and (doc.best.round, doc.best.overall) == (1, 0.62)
    async with httpx.AsyncClient() as http:
        image = await http.get(doc.rounds[1].candidates[0].image_url or "")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


async def test_auto_rewrites_while_far_and_edits_once_close(two_workers: Stack) -> None:
    doc, judged = await run(two_workers, "a bicycle, auto", strategy="auto", edit_above=0.5)
    assert [(r.action, r.model) for r in doc.rounds] == [("generate", PAINTER), ("generate", PAINTER), ("edit", EDITOR)]
    assert doc.rounds[1].prompt == "a bicycle, auto [refined r0 c0]"
    assert doc.rounds[1].reason == "auto: the best so far scores 0.40 < 0.50: work from the refined request"
    assert doc.rounds[2].edited_from is not None and doc.rounds[2].edited_from.round == 1
    assert doc.rounds[2].reason == "auto: the best so far (round 2 candidate 1) scores 0.62 >= 0.50: edit it"
    assert_judged_as_text_to_image(doc, judged)


async def test_a_strategy_that_edits_needs_a_live_edit_worker(
    stack: Stack, generator_settings: Callable[..., Settings]
) -> None:
    tiny = generator_settings()
    await stack.start_worker(generator=PAINTER, cache_dir=tiny.cache_dir, generator_device="cpu")
    async with httpx.AsyncClient(base_url=stack.url) as http:
        body = {"prompt": "a bicycle", "loop": {"strategy": "edit"}}
        refused = await http.post("/generate", json=body)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "no_worker" and error["field"] == "loop.edit_model" and error["retryable"]
        assert "loop.strategy 'edit'" in error["message"]
        unknown = await http.post("/generate", json={**body, "loop": {"strategy": "auto", "edit_model": "nope"}})
        assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "loop.edit_model"
        assert (await http.post("/generate", json={**body, "loop": {"strategy": "rewrite"}})).status_code == 202


async def test_a_hop_nobody_claims_ends_with_the_best_image_so_far(
    redis_url: str, redis_prefix: str, standin_url: str
) -> None:
    """The edit model's worker vanished after submit: the queue timeout ends the job as
    succeeded with round 1's image, saying why it stopped."""
    async with Stack(redis_url, redis_prefix, standin_url, queue_timeout_s=1.0) as stack:
        await stack.start_worker(model_name="painter")
        await stack.register_idle_worker(modes=("edit",), model="editor", worker_id="editor-that-never-claims")
        job_id = await stack.submit("a bicycle", loop={**NEVER_ACCEPT, "strategy": "edit"})
        doc = await stack.wait(job_id, timeout_s=30)
    assert (doc.status, doc.stop_reason) == ("succeeded", "unclaimed")
    assert len(doc.rounds) == 1 and doc.best is not None and doc.best.round == 0
    assert doc.spec.loop.edit_model == "editor" and doc.error is not None and doc.error.code == "unclaimed"


async def test_an_edit_job_chains_edits_or_re_edits_its_source_and_is_judged_against_the_source(
    two_workers: Stack,
) -> None:
    """An edit job stays on its edit model: `edit` edits the best output so far, `rewrite`
    re-edits the original source with the refined request. Every candidate is judged as an
    edit of the ORIGINAL source (two images: that source, then the candidate)."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), "navy").save(buffer, format="PNG")
    source = base64.b64encode(buffer.getvalue()).decode()
    for strategy, expected_from in (("edit", [None, (0, 0), (1, 0)]), ("rewrite", [None, None, None])):
        prompt = f"give the bicycle a bell ({strategy})"
        job_id = await two_workers.submit(
            prompt, mode="edit", source_image=source, loop={**NEVER_ACCEPT, "strategy": strategy}
        )
        doc = await two_workers.wait(job_id, timeout_s=180)
        assert doc.status == "succeeded", doc.error
        assert [(r.action, r.model) for r in doc.rounds] == [("edit", EDITOR)] * 3
        assert [r.edited_from and (r.edited_from.round, r.edited_from.candidate) for r in doc.rounds] == expected_from
        judged = [j for j in (await two_workers.critic_stats())["judged"] if j["instruction"] == prompt]
        assert len(judged) == 3 and {j["mode"] for j in judged} == {"edit"}
        assert all(j["sizes"][0] == [96, 64] for j in judged)  # the original source, every round
