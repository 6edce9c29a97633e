"""Running a batch so that running out of GPU memory costs as little as possible.

A batch that does not fit is split in halves and each half retried, down to single
requests; a request that fails even alone gets the error as its result, so one job
fails with a clear message while the other jobs of the batch, and the worker, go on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from service.errors import GeneratorError, GeneratorOutOfMemory
from workers.generators.base import NO_HOOKS, Generator, GenRequest, StepHooks

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


def generate_splitting_on_oom(
    generator: Generator,
    requests: Sequence[GenRequest],
    hooks: StepHooks = NO_HOOKS,
) -> list[Image.Image | GeneratorError]:
    """One result per request, in order: its image, or the error that stopped it.

    `GeneratorOutOfMemory` splits the batch; any other `GeneratorError` (including an
    interrupt) is the result of every request of the call that raised it. Progress
    restarts at step 1 for each retried part.
    """
    if not requests:
        return []
    try:
        return list(generator.generate(requests, hooks))
    except GeneratorOutOfMemory as exc:
        free_cuda_cache()
        if len(requests) == 1:
            return [exc]
        half = (len(requests) + 1) // 2
        log.warning("out of GPU memory at batch %d; retrying as %d + %d", len(requests), half, len(requests) - half)
        return generate_splitting_on_oom(generator, requests[:half], hooks) + (
            generate_splitting_on_oom(generator, requests[half:], hooks)
        )
    except GeneratorError as exc:
        return [exc] * len(requests)


def free_cuda_cache() -> None:
    # Only if torch is already loaded: the simulated generator runs without it.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
