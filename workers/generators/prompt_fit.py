"""How much of a prompt a pipeline's text encoders read, measured with its own tokenizers.

A diffusers pipeline cuts a prompt at its text encoder's length without a word: CLIP
reads 77 tokens (special tokens included), T5 in FLUX.1 `max_sequence_length` (512,
FLUX.1-schnell 256: `model_defaults`). A refined request from the critic is often
longer, and then the image follows a prompt that nobody sees.

The rule (docs/loop.md, "What the generator reads"): the pipeline's main text encoder
decides: T5 (or Qwen2.5-VL) where the pipeline has one beside CLIP, since FLUX and SD3
take only a pooled summary from CLIP; CLIP in SD and SDXL. A text longer than it reads
is shortened to the whole words it reads, before the pipeline sees it, and the round
records the cut (`PromptFit`): the round's prompt is then exactly what the generator
read, and the dropped words are kept beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gcr.types import PromptFit

_TOKENIZER_ATTRIBUTES = ("tokenizer", "tokenizer_2", "tokenizer_3")
# Pipelines accept at most this many tokens from a tokenizer whose `model_max_length` is
# a placeholder (transformers' VERY_LARGE_INTEGER for folders that set none).
_UNBOUNDED = 1_000_000


@dataclass(frozen=True)
class ReadingEncoder:
    tokenizer: Any
    limit: int

    @property
    def name(self) -> str:
        return type(self.tokenizer).__name__

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])


def reading_encoder(pipe: Any, call_params: Any, max_sequence_length: int | None) -> ReadingEncoder | None:
    """The pipeline's main text encoder's tokenizer, with its limit; None without one.

    A tokenizer that is not CLIP's (T5 in FLUX and SD3, Qwen2.5-VL's in Qwen-Image) is the
    main one, read up to `max_sequence_length` (the request's, else the pipeline's signature
    default); without one, CLIP's, up to its `model_max_length`."""
    sequence_default = call_params.get("max_sequence_length")
    sequence_length = max_sequence_length
    if sequence_length is None and sequence_default is not None and isinstance(sequence_default.default, int):
        sequence_length = sequence_default.default
    clip: list[ReadingEncoder] = []
    main: list[ReadingEncoder] = []
    for attribute in _TOKENIZER_ATTRIBUTES:
        tokenizer = getattr(pipe, attribute, None)
        if tokenizer is None or not callable(tokenizer):
            continue
        limit = int(getattr(tokenizer, "model_max_length", _UNBOUNDED) or _UNBOUNDED)
        is_clip = type(tokenizer).__name__.startswith("CLIP")
        if sequence_length is not None and not is_clip:
            limit = sequence_length
        if limit < _UNBOUNDED:
            (clip if is_clip else main).append(ReadingEncoder(tokenizer, limit))
    return max(main or clip, key=lambda e: e.limit, default=None)


def fit_prompt(encoder: ReadingEncoder, prompt: str) -> tuple[str, PromptFit]:
    """`prompt` as the encoder reads it: whole if it fits, else its longest run of whole
    words that does (found by bisection over word boundaries), and the record of it."""
    tokens = encoder.count(prompt)
    if tokens <= encoder.limit:
        return prompt, PromptFit(encoder=encoder.name, limit=encoder.limit, tokens=tokens)
    # Cut points: the end of each word; the text kept is prompt[:end].
    ends = [match.end() for match in re.finditer(r"\S+", prompt)]
    low, high = 0, len(ends)  # ends[:low] fit; ends[high:] do not
    while low < high:
        middle = (low + high + 1) // 2
        if encoder.count(prompt[: ends[middle - 1]]) <= encoder.limit:
            low = middle
        else:
            high = middle - 1
    if low == 0:  # not even the first word fits: the encoder cuts inside it, as it would anyway
        return prompt, PromptFit(encoder=encoder.name, limit=encoder.limit, tokens=tokens, cut=True)
    kept = prompt[: ends[low - 1]]
    dropped = prompt[len(kept) :].strip()
    return kept, PromptFit(encoder=encoder.name, limit=encoder.limit, tokens=tokens, cut=True, dropped=dropped)
