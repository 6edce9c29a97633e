"""Live previews while denoising: the current latents seen through a fixed linear map to RGB.

No extra weights and no VAE pass: each latent channel contributes a fixed amount of red,
green and blue. These per-family factors are the published ones ComfyUI's previewer
uses (comfy/latent_formats.py, commit 040a324: SD15, SDXL and Flux `latent_rgb_factors`
and `latent_rgb_factors_bias`), applied to the model-space latents as it does, then
mapped from [-1, 1] to [0, 255]. A 1024² FLUX image has a 128×128 latent grid, so a
preview is at most that size; it is shrunk to `max_edge` and sent as a small JPEG.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class LatentRGB:
    factors: tuple[tuple[float, float, float], ...]  # one (R, G, B) row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


SD15 = LatentRGB(
    factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    )
)
SDXL = LatentRGB(
    factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
)
FLUX = LatentRGB(
    factors=(
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    bias=(-0.0329, -0.0718, -0.0851),
)


def family(pipe: Any) -> LatentRGB | None:
    """The factors for a pipeline's latents, or None when no published map fits them."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        chosen = FLUX
    elif name.startswith("StableDiffusionXL"):
        chosen = SDXL
    elif name.startswith("StableDiffusion"):
        chosen = SD15
    else:
        return None
    channels = _latent_channels(pipe)
    return chosen if channels in (None, len(chosen.factors)) else None


def _latent_channels(pipe: Any) -> int | None:
    vae = getattr(pipe, "vae", None)
    config = getattr(vae, "config", None)
    value = getattr(config, "latent_channels", None)
    return int(value) if isinstance(value, int) else None


def to_rgb(latents: Any, rgb: LatentRGB) -> Image.Image:
    """One image's latents (channels × height × width, model space) as a PIL image."""
    import torch
    from PIL import Image

    weights = torch.tensor(rgb.factors, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(rgb.bias, dtype=torch.float32, device=latents.device)
    pixels = torch.nn.functional.linear(latents.float().movedim(0, -1), weights.T, bias)
    array = ((pixels + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def preview_data_uri(pipe: Any, latents: Any, index: int, width: int, height: int, max_edge: int = 128) -> str | None:
    """A JPEG data URI of request `index`'s current latents, or None for an unknown family."""
    rgb = family(pipe)
    if rgb is None:
        return None
    one = latents[index : index + 1]
    if type(pipe).__name__.startswith("Flux") and one.dim() == 3:  # packed (1, tokens, 64): unpack first
        one = pipe._unpack_latents(one, height, width, pipe.vae_scale_factor)
    image = to_rgb(one[0].detach(), rgb)
    image.thumbnail((max_edge, max_edge))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
