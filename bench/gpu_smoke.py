"""GPU smoke check of the diffusers backend, in one short command.

    python bench/gpu_smoke.py            # on a CUDA machine; about a minute
    python bench/gpu_smoke.py --quick    # fewer timed calls (what tests/gpu runs)

Builds a small random-weight Flux pipeline from configs (no download; `SMALL_FLUX`:
a 6-block 512-wide transformer, an 8x VAE), loads it by path through
`DiffusersGenerator` as the worker would, and measures:

1. throughput: images/s at batch 1 and batch 4 in bf16 (one pipeline call per batch);
2. bf16 correctness: the same request in bf16 and fp32 — finite, not constant, and
   close to fp32 within a loose bound (random weights amplify rounding, so the bound
   only catches broken kernels or dtype mix-ups, not ordinary bf16 drift);
3. the OOM-split path: the allocator is capped between the batch-1 and batch-4 peak
   memory, so a batch of 4 really runs out of CUDA memory; `generate_splitting_on_oom`
   must still return every image.

Prints a table and exits non-zero when a check fails. `--device cpu` runs the same
steps on CPU (slowly, OOM step skipped) to check the script itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from gcr.types import PromptFit  # noqa: E402
from service.errors import GeneratorError, GeneratorOutOfMemory  # noqa: E402
from service.settings import Settings  # noqa: E402
from workers.generators.base import GenRequest  # noqa: E402
from workers.generators.diffusers_backend import DiffusersGenerator  # noqa: E402
from workers.generators.oom import generate_splitting_on_oom  # noqa: E402
from workers.generators.tiny import SMALL_FLUX, build_tiny_pipeline  # noqa: E402

BF16_MEAN_ABS_BOUND = 0.08  # pixel units in [0, 1]


@dataclass
class Throughput:
    dtype: str
    batch: int
    images_per_s: float
    s_per_call: float
    peak_gib: float


@dataclass
class Bf16Check:
    finite: bool
    std: float
    mean_abs_diff: float

    @property
    def ok(self) -> bool:
        return self.finite and self.std > 0.01 and self.mean_abs_diff < BF16_MEAN_ABS_BOUND


@dataclass
class OomCheck:
    limit_gib: float
    calls: list[int]
    ooms: int
    images: int
    requested: int

    @property
    def ok(self) -> bool:
        return self.ooms >= 1 and self.images == self.requested


def build(folder: Path) -> Path:
    return build_tiny_pipeline("flux", folder, flux_dims=SMALL_FLUX)


def load(folder: Path, device: str, dtype: str) -> DiffusersGenerator:
    settings = Settings(generator=str(folder), generator_device=device, generator_dtype=dtype, max_batch=4)
    return DiffusersGenerator(settings, str(folder), name=f"small-flux-{dtype}")


def _requests(n: int, size: int, steps: int) -> list[GenRequest]:
    return [
        GenRequest(prompt=f"a small test scene {i}", seed=i, width=size, height=size, steps=steps) for i in range(n)
    ]


def measure_throughput(gen: DiffusersGenerator, batch: int, size: int, steps: int, calls: int) -> Throughput:
    import torch

    cuda = torch.cuda.is_available()
    requests = _requests(batch, size, steps)
    gen.generate(requests)  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(calls):
        gen.generate(requests)  # returns PIL images: already synchronised
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    dtype = str(gen.pipeline.transformer.dtype).removeprefix("torch.")
    return Throughput(dtype, batch, batch * calls / elapsed, elapsed / calls, peak)


def check_bf16(bf16: DiffusersGenerator, fp32: DiffusersGenerator, size: int, steps: int) -> Bf16Check:
    import numpy as np

    def pixels(gen: DiffusersGenerator) -> Any:
        # output_type="np" keeps NaN/inf visible (a PIL conversion would hide them).
        request = gen.resolve(_requests(1, size, steps)[0])
        import torch

        out = gen.pipeline(
            prompt=[request.prompt],
            generator=[torch.Generator("cpu").manual_seed(request.seed)],
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            output_type="np",
        )
        return np.asarray(out.images, dtype=np.float64)

    low, high = pixels(bf16), pixels(fp32)
    return Bf16Check(
        finite=bool(np.isfinite(low).all()),
        std=float(low.std()),
        mean_abs_diff=float(np.abs(low - high).mean()),
    )


def check_oom_split(gen: DiffusersGenerator, size: int, steps: int) -> OomCheck:
    import torch

    def peak(batch: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gen.generate(_requests(batch, size, steps))
        return torch.cuda.max_memory_allocated()

    one, four = peak(1), peak(4)
    total = torch.cuda.get_device_properties(0).total_memory
    limit = (one + four) // 2
    calls: list[int] = []
    ooms = 0

    class Recording:
        name, modes, max_batch, runtime = gen.name, gen.modes, gen.max_batch, gen.runtime

        def resolve(self, request: GenRequest) -> GenRequest:
            return gen.resolve(request)

        def fit_prompt(self, request: GenRequest) -> tuple[str, PromptFit] | None:
            return gen.fit_prompt(request)

        def generate(self, requests: Any, hooks: Any = None) -> Any:
            nonlocal ooms
            calls.append(len(requests))
            try:
                return gen.generate(requests, hooks)
            except GeneratorOutOfMemory:
                ooms += 1
                raise

    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit / total)
    try:
        results = generate_splitting_on_oom(Recording(), _requests(4, size, steps))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    images = sum(1 for r in results if not isinstance(r, GeneratorError))
    return OomCheck(limit / 2**30, calls, ooms, images, 4)


def run(device: str, quick: bool) -> bool:
    import torch

    cuda = device.startswith("cuda")
    size, steps = (512, 8) if cuda else (64, 2)
    calls = 3 if quick else 10
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = build(Path(tmp) / "small-flux")
        print(f"built small Flux from configs in {time.perf_counter() - t0:.1f}s")
        low = load(folder, device, "bfloat16")
        high = load(folder, device, "float32")
        print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}; {size}x{size}px, {steps} steps\n")

        rows = [measure_throughput(low, b, size, steps, calls) for b in (1, 4)]
        print("| dtype | batch | images/s | s/call | peak GiB |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r.dtype} | {r.batch} | {r.images_per_s:.2f} | {r.s_per_call:.3f} | {r.peak_gib:.2f} |")
        speedup = rows[1].images_per_s / rows[0].images_per_s
        print(f"\nbatch-4 / batch-1 throughput: {speedup:.2f}x")
        if cuda and speedup <= 1.0:
            ok = False

        bf16 = check_bf16(low, high, size, steps)
        print("\n| bf16 check | value | pass |")
        print("|---|---|---|")
        print(f"| finite | {bf16.finite} | {bf16.finite} |")
        print(f"| pixel std | {bf16.std:.4f} | {bf16.std > 0.01} |")
        print(f"| mean abs diff vs fp32 | {bf16.mean_abs_diff:.4f} | {bf16.mean_abs_diff < BF16_MEAN_ABS_BOUND} |")
        ok = ok and bf16.ok

        if cuda:
            del high
            torch.cuda.empty_cache()
            oom = check_oom_split(low, size * 2, steps)
            print("\n| OOM split | value |")
            print("|---|---|")
            print(f"| memory cap GiB | {oom.limit_gib:.2f} |")
            print(f"| calls (batch sizes) | {oom.calls} |")
            print(f"| CUDA OOMs seen | {oom.ooms} |")
            print(f"| images returned | {oom.images}/{oom.requested} |")
            ok = ok and oom.ok
    print(f"\nGPU smoke: {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu to check the script itself")
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --device cpu to check the script)", file=sys.stderr)
        return 2
    return 0 if run(args.device, args.quick) else 1


if __name__ == "__main__":
    sys.exit(main())
