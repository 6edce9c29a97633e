"""The tiny Qwen3-VL critic the project builds for `vllm serve`: RationalRewards' architecture,
Qwen's special tokens and chat template, a few MB, the same bytes on every build."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from workers.critics.tiny_model import SPECIAL_TOKENS, build_tiny_critic

pytestmark = pytest.mark.timeout(120)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_two_builds_write_the_same_bytes(tmp_path: Path) -> None:
    first, second = build_tiny_critic(tmp_path / "a"), build_tiny_critic(tmp_path / "b")
    assert _digests(first) == _digests(second)
    assert sum(p.stat().st_size for p in first.iterdir()) < 5_000_000


def test_it_is_a_qwen3_vl_with_qwens_tokens_and_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = build_tiny_critic(tmp_path / "critic")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"] and config["model_type"] == "qwen3_vl"
    rope = config["text_config"]["rope_parameters"]
    assert sum(rope["mrope_section"]) == config["text_config"]["head_dim"] // 2 and rope["mrope_interleaved"]
    assert config["vision_config"]["out_hidden_size"] == config["text_config"]["hidden_size"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [int(tokenizer.convert_tokens_to_ids(token)) for token in SPECIAL_TOKENS]  # type: ignore[arg-type]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))  # appended in Qwen's order
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    messages: list[Any] = [
        {"role": "system", "content": "judge"},
        {"role": "user", "content": [{"type": "text", "text": "a cat"}, {"type": "image_url", "image_url": {}}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\njudge<|im_end|>\n"
        "<|im_start|>user\na cat<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
