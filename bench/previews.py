"""What live previews cost per denoising step, measured beside the same calls without them.

    python bench/previews.py --json OUT            # tiny FLUX on this machine's device
    python bench/previews.py --device cuda --json OUT

Two measurements, in one run:
1. calls of the tiny random-weight FLUX pipeline through `DiffusersGenerator`, alternating
   with and without a preview at every step (the worst case; jobs get one every
   GCR_PREVIEW_EVERY_STEPS), reported as seconds per step and their ratio;
2. one preview of a full-size FLUX.1 latent (1024x1024: 4096 packed tokens x 64), i.e.
   unpacking, the 16->3 linear map, the copy to the host and the JPEG, in milliseconds.
On a GPU a FLUX.1 step at 1024² takes on the order of 100 ms, so (2) is what to set
against it; on this CPU the tiny pipeline's steps are themselves tiny.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.common import argument_parser, finish, run_info  # noqa: E402
from service.settings import Settings  # noqa: E402
from workers.generators.base import GenRequest  # noqa: E402
from workers.generators.diffusers_backend import DiffusersGenerator  # noqa: E402
from workers.generators.previews import preview_data_uri  # noqa: E402
from workers.generators.tiny import ensure_tiny_pipeline  # noqa: E402


def per_step(gen: DiffusersGenerator, steps: int, size: int, previews: bool, sink: list[str]) -> float:
    preview = (lambda _s, _t, uri: sink.append(uri)) if previews else None
    request = GenRequest(prompt="a fox", seed=1, width=size, height=size, steps=steps, preview=preview)
    started = time.perf_counter()
    gen.generate([request])
    return (time.perf_counter() - started) / steps


def full_size_preview_ms(gen: DiffusersGenerator, device: str, repeats: int) -> float:
    import torch

    latents = torch.randn(1, 4096, 64, device=device)  # FLUX.1 at 1024²: 64x64 tokens of 2x2x16
    # The tiny pipeline's VAE scales by 2, FLUX.1's by 8: at 256 px here, the latent grid is
    # FLUX.1's at 1024 px (128x128x16), the same tensor to unpack, map, copy and encode.
    size = 1024 * gen.pipeline.vae_scale_factor // 8
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert preview_data_uri(gen.pipeline, latents, 0, size, size) is not None
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = ensure_tiny_pipeline("flux", Path(tmp))
        settings = Settings(generator=str(folder), generator_device=args.device, preview_every_steps=1)
        gen = DiffusersGenerator(settings, str(folder))
        sink: list[str] = []
        per_step(gen, args.steps, args.size, False, sink)  # warm-up
        off, on = [], []
        for _ in range(args.repeats):  # alternate, so drift in the machine's load hits both alike
            off.append(per_step(gen, args.steps, args.size, False, sink))
            on.append(per_step(gen, args.steps, args.size, True, sink))
        result = {
            **run_info("previews"),
            "device": args.device,
            "tiny_flux": {
                "size": args.size,
                "steps": args.steps,
                "s_per_step_without": statistics.median(off),
                "s_per_step_with_preview_every_step": statistics.median(on),
                "ratio": statistics.median(on) / statistics.median(off),
                "previews_made": len(sink),
            },
            "full_size_flux_preview_ms": full_size_preview_ms(gen, args.device, args.repeats),
        }
    return result


def show(result: dict[str, Any]) -> None:
    tiny = result["tiny_flux"]
    print(
        f"tiny FLUX {tiny['size']}px on {result['device']}: {tiny['s_per_step_without'] * 1000:.1f} ms/step without, "
        f"{tiny['s_per_step_with_preview_every_step'] * 1000:.1f} ms/step with a preview every step "
        f"(x{tiny['ratio']:.3f}); one full-size FLUX.1 preview: {result['full_size_flux_preview_ms']:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__, redis_url=False)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128, help="tiny FLUX image size (px)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    return finish(run(args), args.json, show)


if __name__ == "__main__":
    sys.exit(main())
