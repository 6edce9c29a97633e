"""Tiny random-weight diffusers pipelines, built from configs, for offline tests and CI.

A tiny pipeline is a real diffusers folder (`model_index.json`, one sub-folder per
component, safetensors weights) written with `save_pretrained`, so the worker loads
it through exactly the code path a real model id takes (`DiffusersGenerator`);
only the weights are random and every module is a few thousand parameters wide.

Kinds:
- `sd`: `StableDiffusionPipeline` (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
  DDIMScheduler, no safety checker) — t2i.
- `flux`: `FluxPipeline` (1 double + 1 single block FluxTransformer2DModel, CLIP + 2-layer
  T5 text encoders, FlowMatchEulerDiscreteScheduler) — t2i.
- `kontext`: the same components saved as `FluxKontextPipeline` — edit.

Nothing is downloaded: the tokenizers are built from vocabularies written here (a
byte-level CLIP BPE with no merges, a character-level T5 unigram). Every seed is
fixed, so two builds give the same weights.

Each folder also holds `gcr_defaults.json` (see `workers.generators.loading`) so a
call defaults to a 32 px image and 4 steps: random weights make bigger images no
more meaningful, only slower.
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, T5Tokenizer

KINDS: tuple[str, ...] = ("sd", "flux", "kontext")

# Written into each tiny folder and read back by the backend (loading.DEFAULTS_FILE).
_TINY_DEFAULTS: dict[str, Any] = {"width": 32, "height": 32, "steps": 4, "max_edge": 64}
# Kontext would otherwise resize a source image to one of its ~1 megapixel preferred
# resolutions before encoding it, which at random weights only costs time.
_KONTEXT_DEFAULTS: dict[str, Any] = {**_TINY_DEFAULTS, "pipeline_kwargs": {"_auto_resize": False}}

_SEED = 0
_HIDDEN = 32  # CLIP hidden size = T5 d_model (SD's cross-attention width)


@dataclass(frozen=True)
class FluxDims:
    """Widths of a generated Flux pipeline. The defaults make the tiny test pipeline;
    `SMALL_FLUX` is wide enough for the GPU benchmark to measure real batching and bf16."""

    text_dim: int = _HIDDEN  # CLIP hidden = T5 d_model = the transformer's joint/pooled dims
    heads: int = 2
    head_dim: int = 16
    rope_axes: tuple[int, int, int] = (4, 4, 8)  # sums to head_dim
    layers: int = 1
    single_layers: int = 1
    vae_channels: tuple[int, ...] = (8, 16)  # VAE scale = 2 ** (len - 1)


SMALL_FLUX = FluxDims(
    text_dim=256,
    heads=8,
    head_dim=64,
    rope_axes=(8, 28, 28),
    layers=2,
    single_layers=4,
    vae_channels=(32, 64, 128, 128),  # an 8x VAE, as FLUX.1's
)


def build_tiny_pipeline(kind: str, out_dir: Path, *, flux_dims: FluxDims | None = None) -> Path:
    """Build the tiny pipeline `kind` and save it into `out_dir` (created); returns `out_dir`.

    `flux_dims` widens the `flux`/`kontext` kinds (the GPU benchmark uses `SMALL_FLUX`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; expected one of {', '.join(KINDS)}")
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # NOTE: the global seed is restored afterwards so building inside a test does not
    # change the random stream of whatever runs next in the process.
    with torch.random.fork_rng(devices=[]):
        if kind == "sd":
            pipe = _build_sd()
        else:
            pipe = _build_flux(flux_dims or FluxDims(), kontext=kind == "kontext")
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    defaults = _KONTEXT_DEFAULTS if kind == "kontext" else _TINY_DEFAULTS
    (out_dir / "gcr_defaults.json").write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")
    return out_dir


def ensure_tiny_pipeline(kind: str, cache_dir: Path) -> Path:
    """Return `cache_dir/tiny-{kind}`, building it first if it is not there yet.

    The folder is built in a temporary sibling and renamed into place, so a build
    that dies half-way never leaves a folder that looks complete; when two
    processes race, the first rename wins and the loser's copy is thrown away.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; expected one of {', '.join(KINDS)}")
    cache_dir = Path(cache_dir)
    target = cache_dir / f"tiny-{kind}"
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-{kind}-", dir=cache_dir))
    try:
        build_tiny_pipeline(kind, staging)
        if target.exists() and not (target / "model_index.json").is_file():
            # Not one of ours (ours appear whole): a copy interrupted by hand, say.
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first (target exists and is not empty).
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_sd() -> Any:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        sample_size=16,  # x vae scale 2 = 32 px default
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(_SEED + 2)
    text_encoder = CLIPTextModel(_clip_config(_HIDDEN))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_flux(dims: FluxDims, *, kontext: bool) -> Any:
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(_SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels (as FLUX.1's VAE) packed 2x2
        num_layers=dims.layers,
        num_single_layers=dims.single_layers,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=dims.text_dim,
        pooled_projection_dim=dims.text_dim,
        guidance_embeds=True,  # as FLUX.1-dev/Kontext, so guidance_scale is exercised
        axes_dims_rope=dims.rope_axes,
    )
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=dims.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(dims.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(dims.vae_channels),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    torch.manual_seed(_SEED + 2)
    text_encoder = CLIPTextModel(_clip_config(dims.text_dim))
    torch.manual_seed(_SEED + 3)
    tokenizer_2 = _t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=dims.text_dim,
            d_kv=dims.text_dim // 4,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
    )
    # The scheduler settings of FLUX.1 (dynamic shifting), so `mu` is exercised.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    cls = FluxKontextPipeline if kontext else FluxPipeline
    return cls(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


# --- text side ------------------------------------------------------------------------

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _clip_vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    return vocab


def _clip_config(hidden: int) -> Any:
    from transformers import CLIPTextConfig

    vocab = _clip_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,  # the tokenizer pads to 77, as every CLIP-L pipeline does
        projection_dim=hidden,
        bos_token_id=vocab[_CLIP_BOS],
        eos_token_id=vocab[_CLIP_EOS],
        pad_token_id=vocab[_CLIP_EOS],
        hidden_act="gelu",
    )


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE with no merges: every word becomes its bytes (last one with `</w>`)."""
    from transformers import CLIPTokenizer

    # NOTE: written to files and loaded with from_pretrained, the way a real CLIP
    # tokenizer is read, rather than constructed from in-memory dicts.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(_clip_vocab(), ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    return tokenizer


def _t5_tokenizer() -> T5Tokenizer:
    """A character-level unigram T5 tokenizer: pad, eos, unk, the word marker, printable ASCII."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
