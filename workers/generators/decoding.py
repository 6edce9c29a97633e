"""The VAE decode: image by image, tiled for large images, and a second chance after an OOM.

The denoising loop is the expensive part of a call; decoding its latents is short but
can peak higher than it for a batch or a large image. So:

- every pipeline's VAE decodes a batch one image at a time (`enable_slicing`: the peak
  is one image's, and an image equals the same seed decoded alone);
- above `TILE_ABOVE_MEGAPIXELS` it decodes in overlapping tiles (`enable_tiling`);
- if the decode still runs out of memory, the denoised latents (kept from the last
  step's callback) are decoded again here, one image at a time and tiled, instead of
  throwing the denoising away. This needs the family's latent layout: FLUX's packed
  latents (`_unpack_latents`, scaling and shift factors) and Stable Diffusion's plain
  ones (scaling factor; only without a safety checker, which this path would skip).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

TILE_ABOVE_MEGAPIXELS = 1.5


def prepare_vae(pipe: Any, width: int, height: int) -> None:
    """Slicing always; tiling only for images above `TILE_ABOVE_MEGAPIXELS` (tiles blend seams)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if hasattr(vae, "enable_tiling") and hasattr(vae, "disable_tiling"):
        if width * height > TILE_ABOVE_MEGAPIXELS * 1e6:
            vae.enable_tiling()
        else:
            vae.disable_tiling()


def can_decode(pipe: Any) -> bool:
    """Whether `decode_one_by_one` knows this pipeline's latent layout."""
    name = type(pipe).__name__
    if getattr(pipe, "vae", None) is None or getattr(pipe, "image_processor", None) is None:
        return False
    if name.startswith("Flux"):
        return hasattr(pipe, "_unpack_latents")
    return name == "StableDiffusionPipeline" and getattr(pipe, "safety_checker", None) is None


def decode_one_by_one(pipe: Any, latents: Any, width: int, height: int) -> list[Image.Image]:
    """Decode the final latents of a call image by image, tiled; the same pixels the pipeline
    would have made (up to tile blending for images larger than one tile)."""
    import torch

    vae = pipe.vae
    device = getattr(pipe, "_execution_device", None) or vae.device
    flux = type(pipe).__name__.startswith("Flux")
    tiled = getattr(vae, "use_tiling", False)
    if hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    images: list[Image.Image] = []
    try:
        for one in latents.split(1):
            if flux:
                z = pipe._unpack_latents(one, height, width, pipe.vae_scale_factor)
                z = z / vae.config.scaling_factor + vae.config.shift_factor
            else:
                z = one / vae.config.scaling_factor
            with torch.no_grad():
                pixels = vae.decode(z.to(device=device, dtype=vae.dtype), return_dict=False)[0]
            images += pipe.image_processor.postprocess(pixels, output_type="pil")
            del pixels
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        if not tiled and hasattr(vae, "disable_tiling"):
            vae.disable_tiling()
    return images
