"""A tiny random-weight Qwen3-VL, built from a config, for the real `vllm serve` in tests.

RationalRewards-8B is a Qwen3-VL-8B-Instruct fine-tune. This builds the same
architecture (`Qwen3VLForConditionalGeneration`: a vision tower with deepstack
features, a Qwen3 text model with interleaved M-RoPE) at a few MB, so that vLLM's
CPU build serves it exactly as it would serve the real judge: the chat template, the
image processor, one or two images a prompt, the context and image limits,
structured outputs. Its weights are random, so its answers are noise: it proves the
protocol and the server, never a judgment.

Nothing is downloaded:
- the tokenizer is a byte-level BPE trained here, with Qwen2's pre-tokenizer split
  and NFC, on the RationalRewards prompts and answer format (so the critic's own
  words are few tokens each), then Qwen's special tokens appended in Qwen's order;
- the chat template is ChatML, rendering each image part as
  `<|vision_start|><|image_pad|><|vision_end|>`, as Qwen3-VL's does;
- the image processor has Qwen3-VL's values (patch 16, merge 2, mean and std 0.5).

Seeds and the corpus are fixed, so every build writes the same bytes (tested).
What mattered for vLLM to load it: `rope_parameters` whose `mrope_section` sums to half
the head size, with `mrope_interleaved`; a vision `out_hidden_size` equal to the text
hidden size and `deepstack_visual_indexes` within the vision depth; the config's image,
video and vision start/end ids taken from the tokenizer; `tokenizer_class` Qwen2Tokenizer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SERVED_NAME = "gcr-tiny-critic"
"""The name the tests and `gcr up --dev --critic vllm` serve it under."""

VOCAB_SIZE = 2048
"""Tokens learned by the BPE, before the special ones."""

_SEED = 0

# Qwen2/Qwen3's pre-tokenizer split (the `pretokenizers.Split` regex of their tokenizer.json).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen's special tokens, in Qwen's order (their ids follow the learned vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_TEXT_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")

# ChatML as Qwen3-VL renders it: string contents as they are; list contents part by part,
# each image as the vision-start, image-pad, vision-end triple that vLLM expands.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3-VL's sampling defaults are replaced by the critic's (upstream: temperature 0.1).
_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.1, "top_p": 1.0, "top_k": 0}


# Qwen3-VL's image and video processors, as data: their classes need torchvision to be
# built in Python, and the project's environment has none (vLLM's loads them from these).
_VISION = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
}
_PROCESSORS = {
    "preprocessor_config.json": {
        **_VISION,
        "image_processor_type": "Qwen2VLImageProcessor",
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    },
    "video_preprocessor_config.json": {
        **_VISION,
        "video_processor_type": "Qwen3VLVideoProcessor",
        "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    },
}


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _corpus() -> list[str]:
    """What the BPE learns from: the packaged RationalRewards prompts and an answer skeleton."""
    from service.critic.templates import packaged_templates_dir

    folder = packaged_templates_dir()
    texts = [path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))]
    answer = (
        "# User Request Analysis\nThe request asks for a red bicycle against a blue wall.\n"
        "# Detailed Judgement\n1. Text Faithfulness:\n## Justification: The bicycle is red.\n## Score: 3.5\n"
        "2. Image Faithfulness:\n## Justification: The wall is kept.\n## Score: 4\n"
        "3. Physical and Visual Quality:\n## Justification: Sharp, plausible light.\n## Score: 3\n"
        "4. Text Rendering:\n## Justification: No text is asked for.\n## Score: N/A\n"
        "# Summary: A faithful image.\n# User Request Refinement:\n"
        "## Refinement Comments: Name the light.\n## Refined Request: a red bicycle, morning light\n"
    )
    return [*texts, answer]


def _tokenizer_object() -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens(list(_TEXT_TOKENS))
    return tokenizer


def build_tiny_critic(out_dir: Path) -> Path:
    """Build the tiny Qwen3-VL critic and save it into `out_dir` (replaced); returns `out_dir`."""
    import torch
    from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = Qwen2Tokenizer(
        tokenizer_object=_tokenizer_object(),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=262144,
        chat_template=CHAT_TEMPLATE,
    )
    ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in SPECIAL_TOKENS}  # type: ignore[arg-type]
    vocab = len(tokenizer)
    padded_vocab = -(-vocab // 64) * 64
    head_dim = 64
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": padded_vocab,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            # Long enough for docker-compose.yml's --max-model-len (40960), as the real model is.
            "max_position_embeddings": 65536,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                # Sums to head_dim / 2 (temporal, height, width), interleaved as Qwen3-VL's.
                "mrope_section": [12, 10, 10],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": False,
            "eos_token_id": ids["<|im_end|>"],
            "bos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 128,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    # The global seed is restored afterwards, as tiny generators do: a build inside a test
    # must not change the random stream of whatever runs next.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model: Any = Qwen3VLForConditionalGeneration(config)  # transformers' stubs type `.to` oddly
    model = model.to(torch.bfloat16).eval()
    # Written beside, then moved in: an interrupted build never leaves a half folder behind.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-critic-", dir=out_dir.parent) as scratch:
        folder = Path(scratch) / "model"
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        for name, processor in _PROCESSORS.items():
            _write_json(folder / name, processor)
        generation = {**_GENERATION_CONFIG, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
        _write_json(folder / "generation_config.json", generation)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        folder.rename(out_dir)
    return out_dir
