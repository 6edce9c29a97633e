"""What a worker needs of a critic: judge an image, say whether it answers, and how loaded it is.

Whoever makes a critic closes it (the CLI, the tests): the worker only uses it.

`service.critic.client.OpenAICritic` (RationalRewards over vLLM, or any OpenAI-compatible
vision endpoint) is the real one; `workers.critics.breaker.GuardedCritic` wraps one in a
circuit breaker. Tests pass their own.
"""

from __future__ import annotations

from typing import Any, Protocol

from gcr.types import Critique, Mode
from service.critic.client import CriticLoad


class Critic(Protocol):
    async def critique(
        self, instruction: str, image: bytes, source_image: bytes | None = None, mode: Mode | None = None
    ) -> Critique:
        """Judge `image` against `instruction` (and `source_image` for an edit); raises `CriticError`."""
        ...

    async def probe(self) -> dict[str, Any] | bool:
        """Whether the critic answers now (its model list, or True); False when it does not. Never raises."""
        ...

    async def load(self) -> CriticLoad | None:
        """What the critic's engine runs and keeps waiting (vLLM's gauges); None where the server
        publishes no such numbers. Never raises."""
        ...
