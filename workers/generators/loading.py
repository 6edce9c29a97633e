"""Loading a diffusers pipeline by model id or local folder, configured from `WorkerSettings`.

One code path for every model: real ones by hub id, tiny test ones by local path.
The pipeline class comes from the folder's `model_index.json`:

- `QwenImageEditPlusPipeline`, `QwenImageEditPipeline`, `FluxKontextPipeline`
  (first-class edit models) are loaded with their own class;
- another class whose `__call__` takes an `image` goes through
  `AutoPipelineForImage2Image` (img2img as a generic edit);
- anything else through `AutoPipelineForText2Image`.

Every failure here becomes a `GeneratorError` with a one-line reason, raised at
construction so that a worker with an unusable model fails start-up saying why.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import DeviceUnavailable, GeneratorError

if TYPE_CHECKING:
    import torch

    from service.settings import WorkerSettings

log = logging.getLogger(__name__)

EDIT_PIPELINES: frozenset[str] = frozenset(
    {"QwenImageEditPlusPipeline", "QwenImageEditPipeline", "FluxKontextPipeline"}
)

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")

DEFAULTS_FILE = "gcr_defaults.json"
"""Optional file in a local pipeline folder overriding the backend's defaults (the tiny
test pipelines ship one so that a call makes a 32 px image in 4 steps)."""


@dataclass(frozen=True)
class FolderDefaults:
    """What a folder's `gcr_defaults.json` may set; every field is optional.

    `pipeline_kwargs` are passed to every pipeline call as they are: they come from
    the operator's model folder, never from a client (clients' extras are limited to
    `ALLOWED_EXTRA_KWARGS`).
    """

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    max_edge: int | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    defaults_of: str | None = None
    """A hub id whose table defaults this folder takes (`model_defaults`)."""

    @classmethod
    def read(cls, model: str) -> FolderDefaults:
        path = Path(model) / DEFAULTS_FILE
        if not path.is_file():
            return cls()
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise GeneratorError(f"{path} is not a valid defaults file: {one_line(exc)}") from exc


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, short enough for a log line or a job error."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return message if len(message) <= limit else message[: limit - 1] + "…"


def resolve_device(setting: str) -> str:
    """`auto` → `cuda` when torch sees a GPU, else `cpu` (logged loudly); `cuda`/`cuda:N` must be usable.

    A worker told to use a GPU never falls back to the CPU in silence: it raises
    `DeviceUnavailable` saying why (torch build, CUDA version, driver), and the
    worker exits with that line."""
    import torch

    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        log.warning("GCR_GENERATOR_DEVICE=auto found no usable GPU (%s): generating on the CPU", cuda_diagnosis())
        return "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"GCR_GENERATOR_DEVICE={setting} but no GPU is usable: {cuda_diagnosis()}")
        index = int(setting.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"GCR_GENERATOR_DEVICE={setting} but this container sees {torch.cuda.device_count()} GPU(s) "
                "(check the GPU reservation: compose device_ids, or the k8s nvidia.com/gpu limit)"
            )
    return setting


def cuda_diagnosis() -> str:
    """One line on why CUDA is not usable: torch's build, its CUDA version, the driver, CUDA's own error."""
    import torch

    parts = [f"torch {torch.__version__}"]
    if torch.version.cuda is None:
        parts.append("a CPU-only build (install a CUDA build of torch: see TORCH_INDEX_URL in the Dockerfile)")
    else:
        parts.append(f"built for CUDA {torch.version.cuda}")
    driver = driver_version()
    parts.append(f"NVIDIA driver {driver}" if driver else "no NVIDIA driver visible (/proc/driver/nvidia/version)")
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
        except Exception as exc:  # torch's own words: "The NVIDIA driver on your system is too old", ...
            parts.append(one_line(exc, limit=200))
    return "; ".join(parts)


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version, if any (the container toolkit mounts this file)."""
    try:
        text = DRIVER_VERSION_FILE.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else text.strip().splitlines()[0][:80]


def runtime_info(pipe: Any) -> dict[str, Any]:
    """What a worker reports in its heartbeat: device, dtype, torch and CUDA versions, the GPU."""
    import torch

    device = str(getattr(pipe, "device", "?"))
    info: dict[str, Any] = {
        "device": device,
        "dtype": str(getattr(pipe, "dtype", "?")).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """`auto` → bfloat16 on CUDA (what the edit models are released and tested in), float32 elsewhere."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype: torch.dtype = getattr(torch, setting)
    return dtype


def takes_image(pipeline_cls: type) -> bool:
    """Whether a pipeline class edits: its `__call__` takes an `image` input."""
    try:
        params = inspect.signature(pipeline_cls.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "image" in params


def _import_diffusers() -> Any:
    # NOTE: the first use of diffusers' auto pipelines imports every pipeline module,
    # and Kolors' text encoder runs `@torch.jit.script`, deprecated since torch 2.10.
    # Nothing we can act on; kept from turning into an error where warnings are errors.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        import transformers

        # Loading bars and "needs torchvision, falling back to PIL" notes are noise in a
        # server's log; real problems still surface as exceptions.
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        import diffusers
        from diffusers import AutoPipelineForText2Image  # noqa: F401 - triggers the imports now
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()

    return diffusers


def load_pipeline(settings: WorkerSettings, model: str) -> Any:
    """Load, place and configure the pipeline for `model` (hub id or local folder)."""
    try:
        diffusers = _import_diffusers()
    except ImportError as exc:
        raise GeneratorError(f"the diffusers backend needs gcr-service[worker] installed: {one_line(exc)}") from exc
    device = resolve_device(settings.generator_device)
    dtype = resolve_dtype(settings.generator_dtype, device)
    if settings.cpu_offload and not device.startswith("cuda"):
        raise GeneratorError(f"GCR_CPU_OFFLOAD needs a CUDA device, but the generator device is {device}")

    try:
        class_name = diffusers.DiffusionPipeline.load_config(model)["_class_name"]
    except Exception as exc:
        raise GeneratorError(f"cannot read the model index of {model}: {one_line(exc)}") from exc
    concrete = getattr(diffusers, class_name, None)
    loader: Any
    if class_name in EDIT_PIPELINES and concrete is not None:
        loader = concrete
    elif concrete is not None and takes_image(concrete):
        loader = diffusers.AutoPipelineForImage2Image
    else:
        loader = diffusers.AutoPipelineForText2Image

    try:
        pipe = loader.from_pretrained(model, **{_dtype_kwarg(): dtype})
    except Exception as exc:
        raise GeneratorError(f"cannot load {model} ({class_name}): {one_line(exc)}") from exc
    log.info("loaded %s as %s (%s, %s)", model, type(pipe).__name__, device, dtype)

    try:
        prepare_pipeline(pipe, settings, device)
    except GeneratorError:
        raise
    except Exception as exc:
        raise GeneratorError(f"cannot prepare {model} on {device}: {one_line(exc)}") from exc
    return pipe


def denoiser(pipe: Any) -> Any:
    """The module that runs once per step: `transformer` (DiT pipelines) or `unet`."""
    return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)


def prepare_pipeline(pipe: Any, settings: WorkerSettings, device: str) -> None:
    """Place and configure a built pipeline as the worker runs it: LoRA, attention backend,
    device or CPU offload, compilation."""
    # Order matters: LoRA layers must exist before compiling, and compile last so it
    # traces the modules as they will run (placed, with the chosen attention backend).
    if settings.lora_path:
        if not hasattr(pipe, "load_lora_weights"):
            raise GeneratorError(f"{type(pipe).__name__} cannot load LoRA weights")
        pipe.load_lora_weights(settings.lora_path)
    net = denoiser(pipe)
    if settings.attention_backend:
        if net is not None and hasattr(net, "set_attention_backend"):
            net.set_attention_backend(settings.attention_backend)
        else:
            log.warning(
                "attention backend %r ignored: this diffusers has no set_attention_backend",
                settings.attention_backend,
            )
    if settings.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if settings.compile and net is not None:
        # Regional compilation of the repeated blocks compiles in seconds rather than
        # minutes and recompiles less when the batch size or image size changes.
        if getattr(net, "_repeated_blocks", None) and hasattr(net, "compile_repeated_blocks"):
            net.compile_repeated_blocks(fullgraph=True)
        else:
            net.compile()
    pipe.set_progress_bar_config(disable=True)


def _dtype_kwarg() -> str:
    # NOTE: diffusers renamed `torch_dtype` to `dtype` (the old name warns); older
    # releases we support (>=0.35) only know `torch_dtype`.
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
