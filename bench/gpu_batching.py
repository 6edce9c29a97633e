"""GPU benchmark: what micro-batching buys on a real diffusers pipeline.

    python bench/gpu_batching.py --json out.json              # CUDA machine, about a minute
    python bench/gpu_batching.py --device cpu --tiny          # smoke check of the script itself

The pipeline is built from configs with random weights (no download) and loaded by
path through `DiffusersGenerator`, as the worker loads any model: by default the
`SMALL_FLUX` Flux pipeline of `workers.generators.tiny` (a 6-block, 512-wide
transformer and an 8x VAE) at 512 px and 8 steps in bfloat16; with `--tiny`, the
`tiny:sd` test pipeline (32 px, 4 steps) that CPU tests use.

For each batch size b in 1, 2, 4, 8 it measures images/s three ways, each over the
same number of requests (`--requests`), after a warm-up call at that size:
- direct: `generate()` called with b requests at a time (the pipeline's own batching);
- batcher on: b concurrent "jobs", each asking the worker's `GenerationScheduler`
  (max_batch 8, the worker's default batch window) for one image at a time, as jobs
  of a worker do; the scheduler coalesces what is waiting into one call;
- batcher off: the same b jobs through a scheduler with max_batch 1 (one call per image).
"batcher on / off" is what the micro-batcher buys with b jobs in flight; "on / direct"
shows how close it gets to calling the pipeline with full batches by hand.

Without CUDA (and without `--device cpu`) it prints why and exits 0, measuring nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.common import Column, argument_parser, finish, print_table, run_info, write_json  # noqa: E402
from gcr.types import PromptFit  # noqa: E402
from service.settings import Settings  # noqa: E402
from workers.generators.base import NO_HOOKS, Generator, GenRequest, StepHooks  # noqa: E402
from workers.scheduler import GenerationScheduler  # noqa: E402

BATCHES = (1, 2, 4, 8)
MAX_BATCH = 8


@dataclass
class Row:
    """One batch size: images/s of each way of running the same requests."""

    batch: int
    direct_images_per_s: float
    on_images_per_s: float
    on_mean_batch: float
    off_images_per_s: float

    @property
    def on_vs_off(self) -> float:
        return self.on_images_per_s / self.off_images_per_s

    @property
    def on_vs_direct(self) -> float:
        return self.on_images_per_s / self.direct_images_per_s


def requests_for(count: int, start: int = 0) -> list[GenRequest]:
    """Distinct prompts and seeds, one size and step count: every request is batch-compatible."""
    return [GenRequest(prompt=f"a small test scene number {i}", seed=i) for i in range(start, start + count)]


def measure_direct(gen: Generator, batch: int, total: int) -> float:
    """Images/s calling the pipeline with `batch` requests per call."""
    gen.generate(requests_for(batch))  # warm-up: kernels and allocator for this shape
    calls = max(1, total // batch)
    started = time.perf_counter()
    for call in range(calls):
        gen.generate(requests_for(batch, start=call * batch))  # PIL images out: the device is synchronised
    return batch * calls / (time.perf_counter() - started)


async def measure_scheduler(
    gen: Generator, max_batch: int, jobs: int, total: int, window_s: float
) -> tuple[float, float]:
    """Images/s (and mean batch) of `jobs` concurrent jobs asking a scheduler for one image each at a time."""
    scheduler = GenerationScheduler(gen, max_batch, window_s)
    await scheduler.start()
    try:
        await asyncio.gather(*(scheduler.generate([r]) for r in requests_for(jobs)))  # warm-up at this size
        calls_before = scheduler.calls
        numbers = iter(range(total))

        async def job() -> None:
            for number in numbers:
                [result] = await scheduler.generate(requests_for(1, start=number))
                if result.error is not None:
                    raise result.error

        started = time.perf_counter()
        await asyncio.gather(*(job() for _ in range(jobs)))
        elapsed = time.perf_counter() - started
        return total / elapsed, total / max(1, scheduler.calls - calls_before)
    finally:
        await scheduler.stop()


def load(args: argparse.Namespace, folder: Path) -> tuple[Generator, str]:
    """The generator under test, loaded the way the worker loads it."""
    if args.tiny:
        from workers.generators import load_generator

        settings = Settings(
            generator="tiny:sd",
            cache_dir=folder,
            generator_device=args.device,
            generator_dtype=args.dtype,
            max_batch=MAX_BATCH,
        )
        return load_generator(settings), "tiny:sd (random weights, from configs)"
    from workers.generators.diffusers_backend import DiffusersGenerator
    from workers.generators.tiny import SMALL_FLUX, build_tiny_pipeline

    path = build_tiny_pipeline("flux", folder / "small-flux", flux_dims=SMALL_FLUX)
    settings = Settings(
        generator=str(path), generator_device=args.device, generator_dtype=args.dtype, max_batch=MAX_BATCH
    )
    return DiffusersGenerator(settings, str(path), name="small-flux"), "SMALL_FLUX (random weights, from configs)"


class Sized:
    """A generator whose requests default to this benchmark's size and steps."""

    def __init__(self, inner: Generator, size: int | None, steps: int | None) -> None:
        self.inner, self.size, self.steps = inner, size, steps
        self.name, self.modes, self.max_batch = inner.name, inner.modes, inner.max_batch
        self.runtime = inner.runtime

    def resolve(self, request: GenRequest) -> GenRequest:
        import dataclasses

        sized = dataclasses.replace(
            request,
            width=request.width or self.size,
            height=request.height or self.size,
            steps=request.steps or self.steps,
        )
        return self.inner.resolve(sized)

    def fit_prompt(self, request: GenRequest) -> tuple[str, PromptFit] | None:
        return self.inner.fit_prompt(request)

    def generate(self, requests: Sequence[GenRequest], hooks: StepHooks = NO_HOOKS) -> Any:
        return self.inner.generate([self.resolve(r) for r in requests], hooks)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    with tempfile.TemporaryDirectory(prefix="gcr-gpu-bench-") as tmp:
        started = time.perf_counter()
        inner, pipeline = load(args, Path(tmp))
        print(f"built and loaded {pipeline} in {time.perf_counter() - started:.1f}s")
        gen = Sized(inner, args.size, args.steps)
        probe = gen.resolve(GenRequest(prompt="probe", seed=0))
        window_s = Settings().batch_window_ms / 1000
        rows = []
        for batch in BATCHES:
            direct = measure_direct(gen, batch, args.requests)
            on, mean_batch = asyncio.run(measure_scheduler(gen, MAX_BATCH, batch, args.requests, window_s))
            off, _ = asyncio.run(measure_scheduler(gen, 1, batch, args.requests, window_s))
            rows.append(Row(batch, direct, on, mean_batch, off))
            print(
                f"batch {batch}: direct {direct:.2f}, batcher on {on:.2f} (mean batch {mean_batch:.2f}), off {off:.2f}"
            )
    cuda = args.device.startswith("cuda")
    return {
        **run_info("gpu_batching", args.redis_url),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "pipeline": pipeline,
        "dtype": args.dtype,
        "size": f"{probe.width}x{probe.height}",
        "steps": probe.steps,
        "requests": args.requests,
        "batch_window_ms": 1000 * window_s,
        "rows": [{**asdict(r), "on_vs_off": r.on_vs_off, "on_vs_direct": r.on_vs_direct} for r in rows],
    }


def show(result: dict[str, Any]) -> None:
    if result["gpu"] is None:
        print("CPU run: a check that the script works; its numbers say nothing about a GPU.")
    print_table(
        f"images/s, {result['pipeline']}, {result['size']} px, {result['steps']} steps, {result['dtype']}, "
        f"{result['gpu'] or result['device']}, {result['requests']} requests per cell",
        [
            Column("batch", "batch / jobs", "{:d}"),
            Column("direct_images_per_s", "direct", "{:.2f}"),
            Column("on_images_per_s", "batcher on", "{:.2f}"),
            Column("on_mean_batch", "mean batch (on)", "{:.2f}"),
            Column("off_images_per_s", "batcher off", "{:.2f}"),
            Column("on_vs_off", "on / off", "{:.2f}"),
            Column("on_vs_direct", "on / direct", "{:.2f}"),
        ],
        result["rows"],
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__, redis_url=False)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny: a smoke check)")
    parser.add_argument("--tiny", action="store_true", help="the tiny:sd test pipeline instead of SMALL_FLUX")
    parser.add_argument("--requests", type=int, default=None, help="requests per cell (default 64; 16 with --tiny)")
    parser.add_argument(
        "--size", type=int, default=None, help="image side in px (default 512; the folder's with --tiny)"
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 8; the folder's with --tiny)")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="only to report its version")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.requests = args.requests or (16 if args.tiny else 64)
    args.size = args.size or (None if args.tiny else 512)
    args.steps = args.steps or (None if args.tiny else 8)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.requests < max(BATCHES):
        parser.error(f"--requests must be >= {max(BATCHES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        # NOTE: the direct calls run on this thread, each scheduler's on its own executor
        # thread; with OpenMP's default spin-waiting, the idle thread teams then fight for
        # the cores and every CPU call gets ~2.5x slower. Must be set before torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        print("torch is not installed (pip install 'gcr-service[worker]'): nothing to measure", file=sys.stderr)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        message = "no CUDA device: skipping the GPU batching benchmark (--device cpu --tiny checks the script)"
        print(message)
        write_json(args.json, {"benchmark": "gpu_batching", "skipped": True, "reason": message})
        return 0
    return finish(run(args), args.json, show)


if __name__ == "__main__":
    sys.exit(main())
