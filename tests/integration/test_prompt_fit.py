"""What a generator reads of a prompt, measured with its pipeline's own tokenizers, and what
the loop does with a refinement longer than that: it generates from the words the encoder
reads, and the round records the cut (never a silent truncation inside the pipeline)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import openai

from service.settings import Settings
from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule
from workers.generators.base import GenRequest

if TYPE_CHECKING:
    from workers.generators.diffusers_backend import DiffusersGenerator

pytest_plugins = ("tests.generator_fixtures",)

LONG = " ".join(f"detail{n}" for n in range(40))  # ~320 characters: the tiny CLIP reads a character a token


def test_sd_reads_77_clip_tokens_and_the_fit_keeps_whole_words(tiny_sd: DiffusersGenerator) -> None:
    short = tiny_sd.fit_prompt(GenRequest(prompt="a red apple", seed=0))
    assert short is not None and short[0] == "a red apple"
    assert (short[1].encoder, short[1].limit, short[1].cut) == ("CLIPTokenizer", 77, False)
    text, fit = tiny_sd.fit_prompt(GenRequest(prompt=LONG, seed=0)) or ("", None)
    assert fit is not None and fit.cut and fit.tokens > 77
    assert LONG.startswith(text) and LONG[len(text) :].strip() == fit.dropped
    tokenizer = tiny_sd.pipeline.tokenizer
    assert len(tokenizer(text)["input_ids"]) <= 77 < len(tokenizer(f"{text} {fit.dropped.split()[0]}")["input_ids"])


def test_flux_is_read_by_t5_at_its_max_sequence_length(tiny_flux: DiffusersGenerator) -> None:
    default = tiny_flux.fit_prompt(GenRequest(prompt=LONG, seed=0))
    assert default is not None and default[1].encoder.startswith("T5") and default[1].limit == 512
    assert not default[1].cut  # CLIP reads only 77, but FLUX takes only a pooled summary from it
    narrow = tiny_flux.fit_prompt(GenRequest(prompt=LONG, seed=0, extra={"max_sequence_length": 32}))
    assert narrow is not None and narrow[1].limit == 32 and narrow[1].cut


async def test_a_round_generates_from_what_the_encoder_reads_and_records_the_cut(
    redis_url: str,
    redis_prefix: str,
    standin_url: str,
    tiny_cache_dir: Path,
    generator_settings: Callable[..., Settings],
) -> None:
    async with Stack(
        redis_url, redis_prefix, standin_url, generator="tiny:sd", cache_dir=tiny_cache_dir, generator_device="cpu"
    ) as stack:
        await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction="detail0", rounds=[0.3, 0.9])]))
        await stack.start_worker()
        job = await stack.client.submit({"prompt": "a short one", "loop": {"max_rounds": 1}})
        short = await stack.wait(job.id, timeout_s=60)
        assert short.rounds[0].prompt_fit is not None and not short.rounds[0].prompt_fit.cut

        job = await stack.client.submit({"prompt": LONG, "loop": {"max_rounds": 2}})
        doc = await stack.wait(job.id, timeout_s=60)
        assert doc.status == "succeeded", doc.error
        first, second = doc.rounds
        for round_ in doc.rounds:
            fit = round_.prompt_fit
            assert fit is not None and fit.cut and fit.limit == 77 and fit.dropped
            assert len(round_.prompt) < 200
        # Round 1 generated from the instruction as CLIP reads it; the critic judged against the whole.
        assert LONG.startswith(first.prompt) and first.prompt_fit.dropped == LONG[len(first.prompt) :].strip()  # type: ignore[union-attr]
        judged = (await stack.critic_stats())["by_instruction"]
        assert judged[LONG] == 2
        # Round 2 from the refined request, the same way; the critique keeps the whole refinement.
        refined = first.candidates[0].critique.refined_request  # type: ignore[union-attr]
        assert refined is not None and refined.startswith(second.prompt) and len(refined) > len(second.prompt)
        assert doc.best is not None and doc.best.prompt == second.prompt


async def test_the_v1_answer_says_the_clients_prompt_was_cut(
    redis_url: str, redis_prefix: str, standin_url: str, tiny_cache_dir: Path
) -> None:
    async with Stack(
        redis_url, redis_prefix, standin_url, generator="tiny:sd", cache_dir=tiny_cache_dir, generator_device="cpu"
    ) as stack:
        await stack.start_worker()
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused") as client:
            short = await client.images.generate(prompt="a red apple", extra_body={"gcr": {"loop": {"max_rounds": 1}}})
            long = await client.images.generate(prompt=LONG, extra_body={"gcr": {"loop": {"max_rounds": 1}}})
    assert (short.model_extra or {})["gcr"]["prompt_cut"] is None
    cut = (long.model_extra or {})["gcr"]["prompt_cut"]
    assert cut["encoder"] == "CLIPTokenizer" and cut["limit"] == 77 and cut["tokens"] > 77
    assert long.data is not None and LONG == f"{long.data[0].revised_prompt} {cut['dropped']}"


def test_fitting_a_prompt_leaves_the_pipelines_tokenizer_alone(tiny_sd: DiffusersGenerator) -> None:
    """The loop fits prompts on the event loop while the pipeline tokenizes on the generator's
    thread. With one shared (Rust-backed) tokenizer, a fit's call without truncation reset the
    pipeline's settings mid-call: about 1 in 80 pipeline encodings came back unpadded and uncut."""
    pipe_tokenizer = tiny_sd._pipe.tokenizer
    long = " ".join(["a red bicycle against a blue wall in the morning light"] * 60)
    lengths: set[int] = set()
    done = threading.Event()

    def pipeline_calls() -> None:
        while not done.is_set():
            ids = pipe_tokenizer([long], padding="max_length", max_length=77, truncation=True).input_ids
            lengths.add(len(ids[0]))

    thread = threading.Thread(target=pipeline_calls)
    thread.start()
    try:
        for _ in range(600):
            tiny_sd.fit_prompt(GenRequest(prompt=long, seed=0))
    finally:
        done.set()
        thread.join()
    assert lengths == {77}
