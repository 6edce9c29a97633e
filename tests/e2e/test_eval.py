"""`gcr eval` end to end: a real stack (gateway, Redis, worker, stand-in critic), interrupted and resumed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from gcr import AsyncClient, JobDocument
from service.evaluation.cli import eval_command, run_eval
from service.evaluation.dataset import load_prompts
from service.evaluation.policies import build_policies
from service.evaluation.records import read_jsonl
from tests.stack import Stack
from workers.critics.standin_config import Fault, StandinConfig, StandinRule

POLICY = {"max_rounds": 3, "threshold": 0.8, "patience": None}
# Scripted scores by tag: some items improve over rounds, some are accepted at once,
# some never get better. The tags make every prompt's critic calls countable.
SCHEDULE = StandinConfig(
    latency_s=0.03,
    rules=[
        StandinRule(instruction="[rises]", rounds=[0.4, 0.6, 0.85]),
        StandinRule(instruction="[at once]", rounds=[0.9]),
        StandinRule(instruction="[flat]", rounds=[0.5, 0.45, 0.5]),
    ],
)
TAGS = ["[rises]"] * 5 + ["[at once]"] * 3 + ["[flat]"] * 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_prompts(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    lines = [
        json.dumps({"id": f"item-{n:02d}", "prompt": f"test picture number {n} {tag}"}) for n, tag in enumerate(TAGS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class CountingClient(AsyncClient):
    """Remembers what it submitted: the prompt and the job id the gateway answered."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.submitted: dict[str, str] = {}

    async def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> JobDocument:
        job = await super().submit(body, idempotency_key=idempotency_key)
        self.submitted[body["prompt"]] = job.id
        return job


def expected_summary(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary recomputed from the lines with nothing but the job documents."""
    overalls = [[r["overall"] for r in line["job"]["rounds"]] for line in lines]
    bests = [max(o) for o in overalls]
    gains = [max(o) - o[0] for o in overalls]
    extra = [len(o) - 1 for o in overalls]
    n = len(lines)
    length = max(len(o) for o in overalls)
    return {
        "items": n,
        "succeeded": sum(line["status"] == "succeeded" for line in lines),
        "acceptance_rate": sum(line["stop_reason"] == "accepted" for line in lines) / n,
        "mean_first_overall": sum(o[0] for o in overalls) / n,
        "mean_best_overall": sum(bests) / n,
        "mean_last_overall": sum(o[-1] for o in overalls) / n,
        "mean_gain": sum(gains) / n,
        "mean_rounds_used": sum(len(o) for o in overalls) / n,
        "gain_per_extra_round": (sum(gains) / n) / (sum(extra) / n),
        "generator_calls": sum(line["job"]["summary"]["generator_calls"] for line in lines),
        "critic_calls": sum(line["job"]["summary"]["critic_calls"] for line in lines),
        "generation_s": sum(r["timings"]["generate_ms"] for line in lines for r in line["job"]["rounds"]) / 1000,
        "mean_generator_calls": sum(line["job"]["summary"]["generator_calls"] for line in lines) / n,
        "best_so_far_by_round": [sum(max(o[: r + 1]) for o in overalls) / n for r in range(length)],
    }


async def test_interrupted_eval_resumes_to_exactly_one_result_per_item(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await stack.configure_critic(SCHEDULE)
    await stack.start_worker()
    prompts, out = write_prompts(tmp_path), tmp_path / "out"
    items = load_prompts(prompts)
    policies = build_policies([f"refine={json.dumps(POLICY)}"])
    results = out / "refine" / "results.jsonl"

    # Run 1, interrupted as soon as 5 items are recorded (as Ctrl-C would).
    first_client = CountingClient(stack.url)
    task = asyncio.create_task(run_eval(first_client, items, policies, out, concurrency=2, plot=False))
    async with asyncio.timeout(15):
        while len(read_jsonl(results)) < 5:
            assert not task.done(), "the run finished before it could be interrupted"
            await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await first_client.aclose()
    first = read_jsonl(results)
    assert 5 <= len(first) < 10
    finished_first = {line["prompt"] for line in first}
    in_flight = {p: j for p, j in first_client.submitted.items() if p not in finished_first}

    # Run 2: the command itself, in its own thread and event loop, against the same stack.
    resubmitted: list[str] = []
    original_submit = AsyncClient.submit

    async def counting_submit(
        self: AsyncClient, body: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> JobDocument:
        resubmitted.append(body["prompt"])
        return await original_submit(self, body, idempotency_key=idempotency_key)

    monkeypatch.setattr(AsyncClient, "submit", counting_submit)
    args = [str(prompts), "--out", str(out), "--url", stack.url, "--policy", f"refine={json.dumps(POLICY)}"]
    outcome = await asyncio.to_thread(CliRunner().invoke, eval_command, [*args, "--concurrency", "3"])
    assert outcome.exit_code == 0, outcome.output
    assert "refine" in outcome.stdout and "scripted" in outcome.stdout

    lines = read_jsonl(results)
    ids = [line["id"] for line in lines]
    assert len(lines) == 10 and sorted(ids) == [item.id for item in items]
    assert lines[: len(first)] == first  # run 2 only appended
    # No finished item was sent again; each unfinished one exactly once, and the jobs
    # still running from run 1 were re-attached (same job id), not started anew.
    assert not finished_first & set(resubmitted)
    assert sorted(resubmitted) == sorted({line["prompt"] for line in lines} - finished_first)
    by_prompt = {line["prompt"]: line for line in lines}
    for prompt, job_id in in_flight.items():
        assert by_prompt[prompt]["job_id"] == job_id
    assert len({line["job_id"] for line in lines}) == 10
    # ... so the critic judged every image exactly once over both runs.
    stats = await stack.critic_stats()
    assert stats["by_instruction"] == {line["prompt"]: line["job"]["summary"]["critic_calls"] for line in lines}
    assert all(line["status"] == "succeeded" for line in lines)
    assert {line["run"] for line in lines} == {1, 2}

    summary = json.loads((out / "summary.json").read_text())["refine"]
    for key, value in expected_summary(lines).items():
        assert summary[key] == pytest.approx(value), key
    assert summary["failed"] == 0
    assert summary["stop_reasons"] == {"accepted": 8, "max_rounds": 2}
    runs = read_jsonl(out / "runs.jsonl")
    assert [(r["event"], r["run"]) for r in runs] == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert runs[1]["interrupted"] and not runs[3]["interrupted"]
    assert summary["wall_clock_s"] == pytest.approx(runs[1]["at"] - runs[0]["at"] + runs[3]["at"] - runs[2]["at"])

    assert (out / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (out / "score_vs_compute.png").read_bytes().startswith(PNG_SIGNATURE)
    assert summary["generation_s"] > 0  # the worker timed its generations
    # one image a round here: after k images, the best of the first k rounds
    by_calls = [p["mean_best_overall"] for p in summary["best_by_generator_calls"]]
    assert by_calls == pytest.approx(summary["best_so_far_by_round"])
    for line in lines:
        assert (out / "refine" / line["image"]).read_bytes().startswith(PNG_SIGNATURE)
        assert line["image"] == f"images/{line['id']}.png"


async def test_in_process_stack(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path)

    outcome = await asyncio.to_thread(
        CliRunner().invoke,
        eval_command,
        [str(prompts), "--out", str(tmp_path / "out"), "--in-process", "--generator", "sim:0.01", "--limit", "2"],
    )

    assert outcome.exit_code == 0, outcome.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["default"]["items"] == 2 and summary["default"]["critic_models"] == ["gcr-standin-critic"]


async def test_failed_and_rejected_items_are_recorded_once(stack: Stack, tmp_path: Path) -> None:
    await stack.configure_critic(
        StandinConfig(faults=[Fault(kind="status", status=400, times=1, instruction="[broken]")])
    )
    await stack.start_worker()
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "ok", "prompt": "a fine picture"},
        {"id": "critic-fails", "prompt": "a picture the critic refuses [broken]"},
        {"id": "too-long", "prompt": "x" * (stack.settings.max_prompt_chars + 1)},
    ]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    items, policies, out = load_prompts(prompts), build_policies(['one={"max_rounds": 1}']), tmp_path / "out"

    async with CountingClient(stack.url) as client:
        outcome, summary = await run_eval(client, items, policies, out, plot=False)
    assert outcome.recorded == 3 and outcome.unfinished == 0
    lines = {line["id"]: line for line in read_jsonl(out / "one" / "results.jsonl")}
    assert lines["ok"]["status"] == "succeeded"
    assert lines["critic-fails"]["status"] == "failed" and lines["critic-fails"]["error"]["code"]
    assert lines["too-long"]["status"] == "rejected" and lines["too-long"]["job"] is None
    assert lines["too-long"]["error"]["status"] in (400, 422)
    assert summary["one"]["failed"] == 2 and summary["one"]["scored_items"] == 1

    # A re-run finds everything finished: nothing is submitted again.
    client = CountingClient(stack.url)
    async with client:
        again, _ = await run_eval(client, items, policies, out, plot=False)
    assert client.submitted == {}
    assert again.skipped == 3 and again.recorded == 0


async def test_unreachable_gateway_records_nothing(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path)
    args = [str(prompts), "--out", str(tmp_path / "out"), "--url", "http://127.0.0.1:9", "--limit", "2"]

    outcome = await asyncio.to_thread(CliRunner().invoke, eval_command, args)

    assert outcome.exit_code == 1, outcome.output
    assert read_jsonl(tmp_path / "out" / "default" / "results.jsonl") == []
    assert "2 item(s) not finished" in outcome.output


async def test_items_of_a_mode_no_worker_serves_abort_with_the_reason(stack: Stack, tmp_path: Path) -> None:
    await stack.start_worker(generator="tiny:sd", generator_device="cpu")  # text-to-image only
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"id": "e1", "prompt": "make it blue", "source_image": "red.png"}) + "\n")
    args = [str(edits), "--out", str(tmp_path / "out"), "--url", stack.url]

    outcome = await asyncio.wait_for(asyncio.to_thread(CliRunner().invoke, eval_command, args), timeout=60)

    assert outcome.exit_code == 1
    assert "cannot evaluate edit items" in outcome.output and "no live worker serves mode 'edit'" in outcome.output
