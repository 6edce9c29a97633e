"""GPU validation of the first deployment: FLUX.1-schnell at full size, through the worker's own code.

    python bench/gpu_validate.py --json OUT                     # on a CUDA machine (80 GB class)
    python bench/gpu_validate.py --tiny --device cpu --json OUT  # the same steps on the tiny FLUX (CI)

Builds FLUX.1-schnell's full-size architecture from its configs
(`workers/generators/data/flux1-schnell`: 11.9 B transformer, T5-XXL, CLIP-L, the
16-channel VAE) with random weights, directly on the device in bf16: nothing is
downloaded (the tokenizers are the tiny test pipeline's). It goes through the worker's
own pieces: `prepare_pipeline` (placement), `DiffusersGenerator` (the per-model
defaults: 4 steps, guidance 0, 256 text tokens, 1024x1024) and `GenerationScheduler`
(one batched call per batch). It reports:

1. seconds per image and peak memory at batch 1, 2 and 4 (one warm-up call first);
2. the memory check's estimate beside the measured peak (it should be above);
3. the OOM-split path: the allocator is capped between the batch-1 and batch-4 peaks,
   so a batch of 4 really runs out of memory, and every image must still come back;
4. the latency of a mid-denoise cancel: from the flag being set to the call returning;
5. how much of the card is left for vLLM beside this worker at batch 4.

Random weights make the images noise and change no timing or memory. The numbers
belong in bench/README.md with the card's name. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench import gpu_smoke  # noqa: E402
from bench.common import write_json  # noqa: E402
from service.errors import (  # noqa: E402
    GenerationInterrupted,
)
from service.settings import Settings  # noqa: E402
from workers.generators.base import GenRequest  # noqa: E402
from workers.generators.diffusers_backend import DiffusersGenerator  # noqa: E402
from workers.generators.loading import prepare_pipeline  # noqa: E402
from workers.generators.memory import GIB, MemoryEstimate, build_module, count_parameters  # noqa: E402
from workers.generators.tiny import ensure_tiny_pipeline  # noqa: E402
from workers.scheduler import GenerationScheduler  # noqa: E402

FLUX_SCHNELL = ROOT / "workers" / "generators" / "data" / "flux1-schnell"
MODEL = "black-forest-labs/FLUX.1-schnell"
BATCHES = (1, 2, 4)


def build_full_flux(device: str, cache: Path) -> Any:
    """FLUX.1-schnell's architecture with random bf16 weights, made on `device` (no download)."""
    import diffusers
    import torch

    tiny = diffusers.FluxPipeline.from_pretrained(ensure_tiny_pipeline("flux", cache))
    parts: dict[str, Any] = {}
    for name, (library, class_name) in (
        ("transformer", ("diffusers", "FluxTransformer2DModel")),
        ("vae", ("diffusers", "AutoencoderKL")),
        ("text_encoder", ("transformers", "CLIPTextModel")),
        ("text_encoder_2", ("transformers", "T5EncoderModel")),
    ):
        with torch.device("meta"):
            module = build_module(library, class_name, FLUX_SCHNELL / name / "config.json")
        module = module.to_empty(device=device).to(torch.bfloat16)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.normal_(0.0, 0.02)
        parts[name] = module.eval()
    return diffusers.FluxPipeline(
        scheduler=tiny.scheduler, tokenizer=tiny.tokenizer, tokenizer_2=tiny.tokenizer_2, **parts
    )


def load(args: argparse.Namespace, cache: Path) -> DiffusersGenerator:
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    settings = Settings(generator_device=args.device, generator_dtype=dtype, max_batch=max(BATCHES), cache_dir=cache)
    if args.tiny:
        folder = ensure_tiny_pipeline("flux", cache)
        return DiffusersGenerator(settings.model_copy(update={"generator": str(folder)}), str(folder))
    pipe = build_full_flux(args.device, cache)
    prepare_pipeline(pipe, settings, args.device)
    name = "FLUX.1-schnell architecture, random weights"
    return DiffusersGenerator(settings, MODEL, name=name, pipeline=pipe)


def requests(n: int, size: int | None, steps: int | None = None) -> list[GenRequest]:
    return [
        GenRequest(prompt=f"a lighthouse at dusk, view {i}", seed=i, width=size, height=size, steps=steps)
        for i in range(n)
    ]


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else None


async def per_batch(gen: DiffusersGenerator, size: int | None, calls: int) -> list[dict[str, Any]]:
    rows = []
    for batch in BATCHES:
        scheduler = GenerationScheduler(gen, batch, batch_window_s=0.05)
        await scheduler.start()
        try:
            await scheduler.generate(requests(batch, size))  # warm-up: kernels, allocator
            reset_peak()
            started = time.perf_counter()
            for _ in range(calls):
                results = await scheduler.generate(requests(batch, size))
                assert all(r.image is not None for r in results), [r.error for r in results]
            elapsed = time.perf_counter() - started
        finally:
            await scheduler.stop()
        rows.append({"batch": batch, "s_per_image": elapsed / (calls * batch), "peak_gib": peak_gib()})
    return rows


def oom_split(gen: DiffusersGenerator, size: int | None, steps: int | None) -> dict[str, Any]:
    """The OOM-split path at this pipeline's size: gpu_smoke's check (the allocator capped between
    the batch-1 and batch-4 peaks), run on the full-size model."""
    check = gpu_smoke.check_oom_split(gen, size or 1024, steps or 4)
    return {**dataclasses.asdict(check), "ok": check.ok}


def cancel_latency(gen: DiffusersGenerator, size: int | None, after_step: int = 2, steps: int = 8) -> dict[str, Any]:
    """Set the interrupt flag from another thread once `after_step` steps are done; time until the call ends."""
    flag = threading.Event()
    flagged_at: list[float] = []

    def on_step(step: int, _total: int) -> None:
        if step == after_step and not flag.is_set():
            flagged_at.append(time.perf_counter())
            flag.set()

    try:
        gen.generate(requests(1, size, steps), on_step=on_step, interrupt=flag.is_set)
        return {"ok": False, "error": "the call was not interrupted"}
    except GenerationInterrupted as exc:
        return {"ok": True, "latency_s": time.perf_counter() - flagged_at[0], "message": exc.message}


def vllm_room(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    free, total = torch.cuda.mem_get_info()
    worker = max(r["peak_gib"] for r in rows) * GIB
    left = total - worker
    return {
        "total_gib": total / GIB,
        "worker_peak_gib": worker / GIB,
        "left_for_vllm_gib": left / GIB,
        "max_vllm_gpu_memory_utilization": round(left / total, 2),
        "free_now_gib": free / GIB,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny --device cpu to check the script itself")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        gen = load(args, Path(tmp))
        built_s = time.perf_counter() - started
        resolved = gen.resolve(requests(1, None)[0])
        size = None if not args.tiny else 64
        result: dict[str, Any] = {
            "benchmark": "gpu_validate",
            "command": " ".join(["python", "bench/gpu_validate.py", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "model": gen.name,
            "tiny": args.tiny,
            "build_s": built_s,
            "defaults": {
                "width": size or resolved.width,
                "height": size or resolved.height,
                "steps": resolved.steps,
                "guidance_scale": resolved.guidance_scale,
                "max_sequence_length": resolved.extra.get("max_sequence_length"),
            },
        }
        result["batches"] = asyncio.run(per_batch(gen, size, args.calls))
        params = count_parameters(FLUX_SCHNELL if not args.tiny else ensure_tiny_pipeline("flux", Path(tmp)))
        megapixels = result["defaults"]["width"] * result["defaults"]["height"] / 1e6
        estimate = MemoryEstimate(params, 2 if cuda else 4, max(BATCHES), megapixels)
        result["estimate_gib"] = estimate.total / GIB
        result["cancel"] = cancel_latency(gen, size)
        if cuda:
            result["oom_split"] = oom_split(gen, size or resolved.width, resolved.steps)
            result["vllm"] = vllm_room(result["batches"])
            result["estimate_covers_peak"] = result["estimate_gib"] >= max(r["peak_gib"] for r in result["batches"])
    checks = [result["cancel"]["ok"], *([result["oom_split"]["ok"]] if cuda else [])]
    result["ok"] = all(checks)
    return result


def show(result: dict[str, Any]) -> None:
    print(f"{result['model']} on {result['device']} (torch {result['torch']}, CUDA {result['cuda']})")
    print(f"defaults: {result['defaults']}; built in {result['build_s']:.1f}s")
    print("| batch | s/image | peak GiB |\n|---|---|---|")
    for row in result["batches"]:
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        print(f"| {row['batch']} | {row['s_per_image']:.3f} | {peak} |")
    print(f"memory check's estimate at batch {max(BATCHES)}: {result['estimate_gib']:.1f} GiB")
    print(f"cancel mid-denoise: {result['cancel']}")
    for key in ("oom_split", "vllm"):
        if key in result:
            print(f"{key}: {result[key]}")
    print(f"GPU validation: {'PASS' if result['ok'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX pipeline instead of the full size")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    result = run(args)
    show(result)
    write_json(args.json, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
