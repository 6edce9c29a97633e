"""The official `openai` package against a test stack: its client, and what the tests of
/v1 set up and call alike."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.stack import Stack
from workers.critics.standin_config import StandinConfig, StandinRule


def openai_client(stack: Stack, **options: Any) -> openai.AsyncOpenAI:
    """A client of the stack's /v1 (auth is off: any key does); `options` are the package's own."""
    return openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused-auth-is-off", **options)


async def start_worker_scoring(stack: Stack, instruction: str, rounds: list[float]) -> None:
    """A worker whose critic scores the requests that contain `instruction` with `rounds`, round by round."""
    await stack.configure_critic(StandinConfig(rules=[StandinRule(instruction=instruction, rounds=rounds)]))
    await stack.start_worker()


@contextlib.asynccontextmanager
async def stack_slower_than_the_wait(
    redis_url: str, redis_prefix: str, standin_url: str, generator: str
) -> AsyncIterator[Stack]:
    """A stack whose /v1 waits 0.3 s for a job, and a worker slower than that (`generator`)."""
    async with Stack(redis_url, redis_prefix, standin_url, openai_wait_s=0.3) as stack:
        await stack.start_worker(generator=generator)
        yield stack


async def outlasted_wait(client: openai.AsyncOpenAI) -> openai.APIStatusError:
    """What `images.generate` raises when its job takes longer than the gateway waits."""
    with pytest.raises(openai.APIStatusError) as slow:
        await client.images.generate(prompt="a slow one", extra_body={"gcr": {"loop": {"max_rounds": 1}}})
    return slow.value
