"""Checking client images before anything decodes them.

Pillow reads only the header on `Image.open`, so format and pixel count are
checked before any pixel is decoded: a decompression bomb is refused without
allocating its pixels. Accepted images are normalised to RGB PNG.

Decoding is what costs: a 49 KB PNG may declare 4096x4096, 48 MB of pixels and a second
of CPU to decode and encode again. So images are decoded on `DECODE_THREADS` threads of
their own per gateway process, one image each at a time: a burst of uploads waits for
them (its memory and CPU bounded) instead of decoding all at once on the default
executor's threads, each of which also kept its own malloc arena grown afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from service.errors import InvalidInput
from service.settings import GatewaySettings

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
_DATA_URI = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
DECODE_THREADS = 2
_decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="gcr-image-decode")


def check_text(text: str, *, field: str, limit: int) -> None:
    """A prompt or an instruction no longer than the gateway takes (GCR_MAX_PROMPT_CHARS)."""
    if len(text) > limit:
        raise InvalidInput(f"{field} has {len(text)} characters; the limit is {limit}", field=field)


async def checked_png(data: bytes, *, field: str, settings: GatewaySettings) -> bytes:
    """A client's image checked (format, size, pixels) and normalised to RGB PNG, off the event
    loop, on the decode threads (at most `DECODE_THREADS` images at once)."""
    check = functools.partial(
        check_image, data, field=field, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
    )
    return await asyncio.get_running_loop().run_in_executor(_decoder, check)


def decode_base64_image(value: str, *, field: str, max_bytes: int) -> bytes:
    """Bytes of a base64 string or a `data:image/...;base64,` URI."""
    payload = _DATA_URI.sub("", value.strip(), count=1)
    # base64 is 4/3 of the bytes: refuse an oversized body before decoding it.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InvalidInput(f"image is larger than {max_bytes} bytes", field=field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"image is not valid base64: {exc}", field=field) from exc


def check_image(data: bytes, *, field: str, max_bytes: int, max_pixels: int) -> bytes:
    """Validate an encoded image and return it as RGB PNG bytes."""
    if len(data) > max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes; the limit is {max_bytes}", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"image has too many pixels: {exc}", field=field) from exc
    except Exception as exc:
        raise InvalidInput("not a readable image (PNG, JPEG or WebP expected)", field=field) from exc
    if fmt not in ALLOWED_FORMATS:
        raise InvalidInput(f"image format {fmt} is not accepted; use PNG, JPEG or WebP", field=field)
    if width * height > max_pixels:
        raise InvalidInput(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", field=field
        )
    if width < 16 or height < 16:
        raise InvalidInput(f"image is {width}x{height}; at least 16x16 is needed", field=field)
    try:
        rgb = image.convert("RGB")
    except Exception as exc:
        raise InvalidInput(f"image data is corrupt: {exc}", field=field) from exc
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()
