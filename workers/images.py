"""PNG encoding with provenance, and decoding of client images."""

from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image, PngImagePlugin


def encode_png(image: Image.Image, text: Mapping[str, str] | None = None) -> bytes:
    """PNG bytes with `text` as iTXt chunks (the worker writes gcr:job, gcr:round,
    gcr:candidate, gcr:seed, gcr:prompt, gcr:model; the stand-in critic reads round and
    candidate to follow its score schedule)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")
