"""Live previews: latents through a fixed linear map to RGB, sent while denoising."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import pytest
import torch
from PIL import Image

from service.settings import Settings
from tests.stack import Stack
from workers.generators.base import GenRequest
from workers.generators.diffusers_backend import DiffusersGenerator
from workers.generators.previews import FLUX, SD15, to_rgb

pytest_plugins = ("tests.generator_fixtures",)


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_the_map_is_the_published_linear_one() -> None:
    assert len(SD15.factors) == 4 and len(FLUX.factors) == 16
    zero = to_rgb(torch.zeros(4, 2, 3), SD15)  # no bias for SD 1.x: mid grey
    assert zero.size == (3, 2) and zero.getpixel((0, 0)) == (127, 127, 127)
    one_channel = torch.zeros(16, 1, 1)
    one_channel[0] = 1.0
    expected = tuple(int((f + b + 1) / 2 * 255) for f, b in zip(FLUX.factors[0], FLUX.bias, strict=True))
    assert to_rgb(one_channel, FLUX).getpixel((0, 0)) == expected


@pytest.mark.parametrize("kind", ["flux", "sd"])
def test_a_request_that_asks_gets_previews_every_few_steps(
    kind: str, generator_settings: Callable[..., Settings]
) -> None:
    from workers.generators import load_generator

    generator = load_generator(generator_settings(generator=f"tiny:{kind}", preview_every_steps=2))
    assert isinstance(generator, DiffusersGenerator)
    seen: list[tuple[int, int, str]] = []
    asks = GenRequest(prompt="a fox", seed=1, width=64, height=64, steps=6, preview=lambda *a: seen.append(a))
    quiet = GenRequest(prompt="a hare", seed=2, width=64, height=64, steps=6)
    images = generator.generate([asks, quiet])
    assert len(images) == 2
    assert [(step, total) for step, total, _ in seen] == [(2, 6), (4, 6)]  # never the last step: the image comes
    preview = _decode(seen[0][2])
    grid = 64 // generator.pipeline.vae_scale_factor  # one preview pixel per latent cell
    assert preview.size == (grid, grid) and preview.mode == "RGB"


async def test_a_job_with_previews_sends_preview_events(stack: Stack, tiny_cache_dir: object) -> None:
    await stack.start_worker(
        generator="tiny:sd", cache_dir=tiny_cache_dir, generator_device="cpu", preview_every_steps=1
    )
    job_id = await stack.submit("a fox", previews=True, generation={"steps": 3}, loop={"max_rounds": 1})
    previews = [e for e in [e async for e in stack.client.events(job_id)] if e.type == "preview"]
    assert [(p.data["round"], p.data["candidate"], p.data["step"]) for p in previews] == [(0, 0, 1), (0, 0, 2)]
    assert _decode(previews[0].data["image"]).mode == "RGB"
    quiet = await stack.submit("a hare", generation={"steps": 3}, loop={"max_rounds": 1})
    assert not [e async for e in stack.client.events(quiet) if e.type == "preview"]
