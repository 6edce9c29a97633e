"""Redis full (maxmemory with noeviction): it refuses writes and still answers reads. Reads
must keep working, writes must say why they fail, and `/readyz` must not say ready."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import redis as redis_sync

from tests.stack import Stack

RestartableRedis = tuple[str, tuple[Callable[[], None], Callable[[], None]]]


async def test_a_full_redis_still_answers_reads_and_says_why_writes_fail(
    own_redis: RestartableRedis, standin_url: str
) -> None:
    url, _ = own_redis
    admin = redis_sync.Redis.from_url(url)
    # The rate limiter on: a full Redis refuses its bucket's write, which must not fail reads.
    async with Stack(url, "gcr-full", standin_url, rate_limit_per_s=1000, rate_limit_burst=1000) as stack:
        await stack.start_worker()
        job = await stack.wait(await stack.submit("stored before it filled up", loop={"max_rounds": 1}))
        async with httpx.AsyncClient(base_url=stack.url) as http:
            assert (await http.get("/readyz")).status_code == 200
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)  # below what it holds: every write is refused
            try:
                read = await http.get(f"/jobs/{job.id}")
                write = await http.post("/generate", json={"prompt": "one more"})
                ready = await http.get("/readyz")
            finally:
                admin.config_set("maxmemory", 0)
            assert read.status_code == 200 and read.json()["status"] == "succeeded", read.text
            assert write.status_code == 503 and "full" in write.json()["error"]["message"], write.text
            assert ready.status_code == 503 and ready.json()["redis"] == "full"
            assert "maxmemory" in ready.json()["reason"]
            # Memory freed: it takes writes again.
            assert (
                await http.post("/generate", json={"prompt": "after", "loop": {"max_rounds": 1}})
            ).status_code == 202
            assert (await http.get("/readyz")).status_code == 200
