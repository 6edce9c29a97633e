"""Will the model fit? A memory estimate made from configs, before any weight is loaded.

Parameters come from each weighted component's `config.json` (the model is built
on torch's `meta` device, which allocates nothing, and its parameters counted), so
the estimate needs only the small config files: a local folder has them, and for a
hub id they are fetched alone (`huggingface_hub.snapshot_download` with
`allow_patterns`), ahead of the multi-GB weights.

    needed = parameters × dtype bytes                      (the weights)
           + CUDA_OVERHEAD                                 (context, cuBLAS workspace, allocator slack)
           + max_batch × megapixels × DENOISE_PER_MP       (denoiser activations)
           + megapixels × DECODE_PER_MP                    (VAE decode, one image at a time)

The activation constants are deliberately generous estimates for DiT and UNet
pipelines at bf16 with PyTorch's fused attention; `bench/gpu_validate.py` measures the
real peaks on a GPU so that they can be checked. With `GCR_CPU_OFFLOAD` only the
largest component is on the GPU at a time.

The check compares `needed` with the device's free memory (`torch.cuda.mem_get_info`,
device-wide: what vLLM or another worker holds is not free). The verdict's message is
one line that says what to change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import WorkerSettings

log = logging.getLogger(__name__)

GIB = 1024**3
CUDA_OVERHEAD = 1.0 * GIB
DENOISE_PER_MP = 1.5 * GIB
DECODE_PER_MP = 3.0 * GIB
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
WEIGHTED_LIBRARIES = ("diffusers", "transformers")

MemoryProbe = Callable[[str], tuple[int, int]]
"""(free, total) bytes of a device; `torch.cuda.mem_get_info` on a GPU."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What a pipeline needs on its device."""

    parameters: dict[str, int]
    dtype_bytes: int
    max_batch: int
    megapixels: float
    cpu_offload: bool = False
    weights: int = field(init=False)
    activations: int = field(init=False)

    def __post_init__(self) -> None:
        per_component = [count * self.dtype_bytes for count in self.parameters.values()]
        resident = max(per_component, default=0) if self.cpu_offload else sum(per_component)
        activations = CUDA_OVERHEAD + self.megapixels * (self.max_batch * DENOISE_PER_MP + DECODE_PER_MP)
        object.__setattr__(self, "weights", int(resident))
        object.__setattr__(self, "activations", int(activations))

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def describe(self) -> str:
        return (
            f"~{gib(self.total)} GiB (weights {gib(self.weights)}"
            f"{' for the largest component, offloaded' if self.cpu_offload else ''}"
            f" + activations {gib(self.activations)} at batch {self.max_batch}, {self.megapixels:.2f} MP)"
        )


@dataclass(frozen=True)
class Verdict:
    fits: bool
    message: str
    estimate: MemoryEstimate | None = None


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def count_parameters(folder: Path) -> dict[str, int]:
    """Parameters per weighted component of the pipeline folder, from configs alone."""
    import torch

    index = json.loads((folder / "model_index.json").read_text())
    counts: dict[str, int] = {}
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        library, class_name = spec
        config = folder / name / "config.json"
        if library not in WEIGHTED_LIBRARIES or class_name is None or not config.is_file():
            continue
        with torch.device("meta"):
            module = build_module(library, class_name, config)
        counts[name] = sum(p.numel() for p in module.parameters())
    return counts


def build_module(library: str, class_name: str, config: Path) -> Any:
    """A diffusers or transformers model from its `config.json`, on whatever device is current
    (`with torch.device("meta")`: no memory at all)."""
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        return cls.from_config(cls.load_config(config.parent))
    import transformers

    cls = getattr(transformers, class_name)
    return cls(cls.config_class.from_json_file(config))


def config_folder(model: str) -> Path:
    """A folder with the model's `model_index.json` and component configs: the model's own
    folder, or the configs alone fetched from the hub (no weights)."""
    path = Path(model)
    if (path / "model_index.json").is_file():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["model_index.json", "*/config.json"]))


def estimate(folder: Path, settings: WorkerSettings, dtype_bytes: int, megapixels: float) -> MemoryEstimate:
    return MemoryEstimate(
        parameters=count_parameters(folder),
        dtype_bytes=dtype_bytes,
        max_batch=settings.max_batch,
        megapixels=megapixels,
        cpu_offload=settings.cpu_offload,
    )


def judge(estimate: MemoryEstimate, device: str, free: int, total: int) -> Verdict:
    """Whether `estimate` fits in `free` bytes of `device`; the message says what to change if not."""
    if estimate.total <= free:
        return Verdict(True, f"needs {estimate.describe()}, {gib(free)} GiB free on {device}", estimate)
    others = total - free
    advice = [
        "lower VLLM_GPU_MEMORY_UTILIZATION (vLLM takes that share of the whole card)",
        "use a second GPU (see docs/gpu.md)",
    ]
    if estimate.max_batch > 1:
        advice.insert(1, f"lower GCR_MAX_BATCH (now {estimate.max_batch})")
    if not estimate.cpu_offload:
        advice.append("or set GCR_CPU_OFFLOAD=true (slower)")
    message = (
        f"needs {estimate.describe()}, {gib(free)} GiB free of {gib(total)} on {device} "
        f"(other processes hold {gib(others)} GiB): " + ", ".join(advice)
    )
    return Verdict(False, message, estimate)


def check(settings: WorkerSettings, model: str, device: str, megapixels: float, probe: MemoryProbe) -> Verdict:
    """Estimate `model` under `settings` and judge it against `device`'s free memory.

    An estimate that cannot be made (the hub unreachable, an unknown component class)
    does not stop the worker: the verdict fits, and says the check was skipped."""
    from workers.generators.loading import resolve_dtype

    dtype = str(resolve_dtype(settings.generator_dtype, device)).removeprefix("torch.")
    try:
        folder = config_folder(model)
        needs = estimate(folder, settings, DTYPE_BYTES.get(dtype, 2), megapixels)
    except Exception as exc:
        return Verdict(True, f"memory not checked before loading ({type(exc).__name__}: {exc})")
    free, total = probe(device)
    return judge(needs, device, free, total)


def cuda_probe(device: str) -> tuple[int, int]:
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(free), int(total)


def megapixels_for(model: str, settings: WorkerSettings, edit: bool) -> float:
    """The image size the estimate assumes: the edit bound, the worker's cap on output
    size (GCR_MAX_OUTPUT_PIXELS), or the model's default size."""
    from workers.generators.model_defaults import lookup

    known = lookup(model)
    if edit:
        return settings.edit_max_edge**2 / 1e6
    if settings.max_output_pixels:
        return settings.max_output_pixels / 1e6
    if known and known.width and known.height:
        return known.width * known.height / 1e6
    return 1024 * 1024 / 1e6


def is_edit_model(model: str) -> bool:
    from workers.generators.loading import EDIT_PIPELINES

    try:
        index = json.loads((config_folder(model) / "model_index.json").read_text())
    except Exception:
        return False
    return index.get("_class_name") in EDIT_PIPELINES
