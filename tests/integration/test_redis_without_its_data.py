"""Redis comes back without its data (`shutdown nosave`, a new Redis): workers make their
consumer groups again and go on claiming, and `/readyz` is not ready while no one can."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import redis as redis_sync

from tests.stack import Stack

RestartableRedis = tuple[str, tuple[Callable[[], None], Callable[[], None]]]
ONE_ROUND = {"max_rounds": 1}


def restart_empty(url: str, start: Callable[[], None], kill: Callable[[], None]) -> None:
    """Kill Redis, drop its append-only files, start it again: every key and group is gone."""
    folder = Path(redis_sync.Redis.from_url(url).config_get("dir")["dir"])
    kill()
    shutil.rmtree(folder / "appendonlydir", ignore_errors=True)
    start()
    assert redis_sync.Redis.from_url(url).dbsize() == 0


async def readyz(stack: Stack) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        return await http.get("/readyz")


async def until_ready(stack: Stack, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while (await readyz(stack)).status_code != 200:
            await asyncio.sleep(0.1)


async def test_workers_go_on_claiming_after_redis_restarts_empty(own_redis: RestartableRedis, standin_url: str) -> None:
    url, (start, kill) = own_redis
    async with Stack(url, "gcr-empty", standin_url) as stack:
        await stack.start_worker(generator="sim:0.1")
        assert (await stack.wait(await stack.submit("before", loop=ONE_ROUND))).status == "succeeded"

        restart_empty(url, start, kill)
        await until_ready(stack)  # the worker's next heartbeat, with its groups made again
        after = [await stack.submit(f"after {i}", loop=ONE_ROUND) for i in range(3)]
        docs = [await stack.wait(job_id, timeout_s=30) for job_id in after]
        assert [d.status for d in docs] == ["succeeded"] * 3


async def test_readyz_is_not_ready_while_no_worker_can_claim(own_redis: RestartableRedis, standin_url: str) -> None:
    url, (start, kill) = own_redis
    async with Stack(url, "gcr-empty", standin_url) as stack:
        # A worker that heartbeats but never claims: after the wipe nothing makes its groups again.
        await stack.register_idle_worker()
        assert (await readyz(stack)).status_code == 200

        restart_empty(url, start, kill)
        async with asyncio.timeout(10):
            while not (answer := await readyz(stack)).json()["workers"]:
                await asyncio.sleep(0.1)  # until its heartbeat is back
        assert answer.status_code == 503
        assert "consumer group" in answer.json()["reason"]

        await stack.start_worker(generator="sim:0.1")  # a claiming worker makes them again
        await until_ready(stack)
