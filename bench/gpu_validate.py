"""GPU validation of the first deployment: FLUX.1-schnell at full size, through the worker's own code.

    python bench/gpu_validate.py --json OUT                     # on a CUDA machine (80 GB class)
    python bench/gpu_validate.py --batches 1,4 --calls 2 ...    # shorter: fewer batch sizes and calls
    python bench/gpu_validate.py --tiny --device cpu --json OUT  # the same steps on the tiny FLUX (CI)

Builds FLUX.1-schnell's full-size architecture from its configs
(`workers/generators/data/flux1-schnell`: 11.9 B transformer, T5-XXL, CLIP-L, the
16-channel VAE) with random weights, directly on the device in bf16: nothing is
downloaded (the tokenizers are the tiny test pipeline's). It goes through the worker's
own pieces: `prepare_pipeline` (placement), `DiffusersGenerator` (the per-model
defaults: 4 steps, guidance 0, 256 text tokens, 1024x1024) and `GenerationScheduler`
(one batched call per batch). It reports:

1. seconds per image and peak memory at each size (`--sizes`, default 1024² and 2048²,
   the largest the API accepts) and batch (`--batches`, default 1, 2 and 4), after one
   warm-up call each;
2. beside each peak, the memory check's estimate for that batch and size
   (`workers/generators/memory.py`); it must be at or above the peak the device saw
   (the allocator's peak plus what CUDA holds outside the allocator);
3. the OOM-split path at the first size: the allocator is capped between the batch-1
   and batch-4 peaks, so a batch of 4 really runs out of memory, and every image must
   still come back;
4. the latency of a mid-denoise cancel: from the flag being set to the call returning;
5. how much of the card is left for vLLM beside this worker at its largest peak;
6. which installed packages the run imported, with versions and folders (on the device,
   the carried wheels of bench/gpu_kit.py come from /tmp/site).

Random weights make the images noise and change no timing or memory. The JSON is
rewritten after each measured row and step (`complete` false until the end, `error`
if one stopped it), so a run cut short still leaves its numbers. The numbers belong
in bench/README.md with the card's name. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench import gpu_smoke  # noqa: E402
from bench.common import run_info, write_json  # noqa: E402
from bench.gpu_kit import canonical  # noqa: E402
from service.errors import (  # noqa: E402
    GenerationInterrupted,
)
from service.settings import Settings  # noqa: E402
from workers.generators.base import GenRequest, StepHooks  # noqa: E402
from workers.generators.diffusers_backend import DiffusersGenerator  # noqa: E402
from workers.generators.loading import prepare_pipeline  # noqa: E402
from workers.generators.memory import GIB, MemoryEstimate, build_module, count_parameters  # noqa: E402
from workers.generators.tiny import ensure_tiny_pipeline  # noqa: E402
from workers.scheduler import GenerationScheduler  # noqa: E402

FLUX_SCHNELL = ROOT / "workers" / "generators" / "data" / "flux1-schnell"
MODEL = "black-forest-labs/FLUX.1-schnell"
BATCHES = (1, 2, 4)
SIZES = (1024, 2048)
TINY_SIZES = (64, 128)


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
    max_batch = max(args.batches)
    settings = Settings(generator_device=args.device, generator_dtype=dtype, max_batch=max_batch, cache_dir=cache)
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


def outside_allocator_gib() -> float | None:
    """What the device holds beyond torch's allocator: the CUDA context, library handles
    (device-wide, so only right where this process is alone on the card)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / GIB


async def per_batch(
    gen: DiffusersGenerator, size: int, batches: list[int], calls: int, done: Callable[[dict[str, Any]], None]
) -> None:
    """Time each batch size at `size`; `done` gets each row as soon as it is measured."""
    for batch in batches:
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
            outside = outside_allocator_gib()
        finally:
            await scheduler.stop()
        peak = peak_gib()
        done(
            {
                "size": size,
                "batch": batch,
                "s_per_image": elapsed / (calls * batch),
                "peak_gib": peak,
                "outside_allocator_gib": outside,
                "device_peak_gib": None if peak is None or outside is None else peak + outside,
            }
        )


def with_estimates(rows: list[dict[str, Any]], params: dict[str, int], dtype_bytes: int) -> list[dict[str, Any]]:
    """Each row with the memory check's estimate for its batch and size, and whether it covers the peak."""
    out = []
    for row in rows:
        estimate = MemoryEstimate(params, dtype_bytes, row["batch"], row["size"] ** 2 / 1e6)
        peak = row["device_peak_gib"]
        out.append(
            {
                **row,
                "estimate_gib": estimate.total / GIB,
                "estimate_weights_gib": estimate.weights / GIB,
                "estimate_covers_peak": None if peak is None else estimate.total / GIB >= peak,
            }
        )
    return out


def oom_split(gen: DiffusersGenerator, size: int, steps: int | None) -> dict[str, Any]:
    """The OOM-split path at this pipeline's size: gpu_smoke's check (the allocator capped between
    the batch-1 and batch-4 peaks), run on the full-size model."""
    check = gpu_smoke.check_oom_split(gen, size, steps or 4)
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
        gen.generate(requests(1, size, steps), StepHooks(on_step, flag.is_set))
        return {"ok": False, "error": "the call was not interrupted"}
    except GenerationInterrupted as exc:
        return {"ok": True, "latency_s": time.perf_counter() - flagged_at[0], "message": exc.message}


def vllm_room(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    free, total = torch.cuda.mem_get_info()
    largest = max(rows, key=lambda r: r["device_peak_gib"])
    worker = largest["device_peak_gib"] * GIB
    left = total - worker
    return {
        "total_gib": total / GIB,
        "worker_peak_gib": worker / GIB,
        "worker_peak_at": {"size": largest["size"], "batch": largest["batch"]},
        "left_for_vllm_gib": left / GIB,
        "max_vllm_gpu_memory_utilization": round(left / total, 2),
        "free_now_gib": free / GIB,
    }


def loaded_packages() -> dict[str, dict[str, str]]:
    """The installed distributions whose modules this process imported: version, and the
    folder they were imported from (this repository's own modules left out)."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, dict[str, str]] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." in name or name not in owners or file is None:
            continue
        path = Path(file).resolve()
        if (ROOT / name) in (path, *path.parents) or path == ROOT / f"{name}.py":
            continue  # gcr's own packages (installed editable, they map to the gcr distribution)
        folder = path.parent.parent if path.stem == "__init__" else path.parent
        for dist in owners[name]:
            found[canonical(dist)] = {"version": importlib.metadata.version(dist), "location": str(folder)}
    return dict(sorted(found.items()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny --device cpu to check the script itself")
    sizes = args.sizes or list(TINY_SIZES if args.tiny else SIZES)
    result: dict[str, Any] = {
        **run_info("gpu_validate"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": args.tiny,
        "sizes": sizes,
        "batch_sizes": args.batches,
        "calls": args.calls,
        "complete": False,
    }

    def save(stage: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {stage}", flush=True)
        write_json(args.json, result)

    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gen = load(args, Path(tmp))
            resolved = gen.resolve(requests(1, None)[0])
            result["model"] = gen.name
            result["build_s"] = time.perf_counter() - started
            result["defaults"] = {
                "width": resolved.width,
                "height": resolved.height,
                "steps": resolved.steps,
                "guidance_scale": resolved.guidance_scale,
                "max_sequence_length": resolved.extra.get("max_sequence_length"),
            }
            save("built")
            params = count_parameters(FLUX_SCHNELL if not args.tiny else ensure_tiny_pipeline("flux", Path(tmp)))
            result["parameters"] = params
            result["batches"] = []

            def measured(row: dict[str, Any]) -> None:
                result["batches"] += with_estimates([row], params, 2 if cuda else 4)
                peak = "n/a" if row["device_peak_gib"] is None else f"{row['device_peak_gib']:.1f} GiB"
                save(f"{row['size']}² batch {row['batch']}: {row['s_per_image']:.3f} s/image, peak {peak}")

            for size in sizes:
                asyncio.run(per_batch(gen, size, args.batches, args.calls, measured))
            result["cancel"] = cancel_latency(gen, sizes[0])
            save("cancel")
            if cuda:
                result["oom_split"] = oom_split(gen, sizes[0], resolved.steps)
                save("oom split")
                result["vllm"] = vllm_room(result["batches"])
                result["estimate_covers_peak"] = all(r["estimate_covers_peak"] for r in result["batches"])
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result["packages"] = loaded_packages()
        result["total_s"] = time.perf_counter() - started
        checks = [result.get("cancel", {}).get("ok", False)]
        if cuda:
            checks += [result.get("oom_split", {}).get("ok", False), result.get("estimate_covers_peak", False)]
        result["ok"] = "error" not in result and all(checks)
        result["complete"] = "error" not in result
        save("done")
    return result


def show(result: dict[str, Any]) -> None:
    print(f"{result['model']} on {result['device']} (torch {result['torch']}, CUDA {result['cuda']})")
    print(f"defaults: {result['defaults']}; built in {result['build_s']:.1f}s")
    print("| size | batch | s/image | peak GiB (device) | estimate GiB | estimate covers |\n|---|---|---|---|---|---|")
    for row in result["batches"]:
        peak = "n/a" if row["device_peak_gib"] is None else f"{row['device_peak_gib']:.1f}"
        covers = {None: "n/a", True: "yes", False: "NO"}[row["estimate_covers_peak"]]
        print(
            f"| {row['size']}² | {row['batch']} | {row['s_per_image']:.3f} | {peak} "
            f"| {row['estimate_gib']:.1f} | {covers} |"
        )
    print(f"cancel mid-denoise: {result['cancel']}")
    for key in ("oom_split", "vllm"):
        if key in result:
            print(f"{key}: {result[key]}")
    carried = {name: p["version"] for name, p in result["packages"].items()}
    print(f"packages imported: {carried}")
    print(f"GPU validation: {'PASS' if result['ok'] else 'FAIL'} in {result['total_s']:.0f}s")


def int_list(value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of integers") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected positive integers, e.g. 1,2,4")
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="the tiny FLUX pipeline instead of the full size")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--batches", type=int_list, default=list(BATCHES), help="batch sizes, e.g. 1,4 (default 1,2,4)")
    parser.add_argument(
        "--sizes", type=int_list, default=None, help="square image sides, e.g. 1024 (default 1024,2048; tiny 64,128)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here (after every step)")
    args = parser.parse_args(argv)
    result = run(args)
    show(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
