"""Redis bytes per finished job: what one job leaves in Redis memory (`MEMORY USAGE` of
every key under a fresh prefix), with its images where the code under test puts them.

    python bench/redis_bytes.py --json OUT
    PYTHONPATH=<a checkout of another commit> python bench/redis_bytes.py   # the same run on that code

Runs the real gateway and a real worker in this process (the simulated generator, which
draws the prompt on a colour at the requested size, and the stand-in critic), submits
`--jobs` jobs of 2 rounds x 2 candidates at `--size`, waits for them, then measures.
The simulated images compress far better than photographs (a 1024² FLUX image is about
1.5 MB as PNG), so the image share of "before" is a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import redis as redis_sync  # noqa: E402

from bench.common import argument_parser, finish, run_info  # noqa: E402
from gcr import AsyncClient  # noqa: E402
from service.critic.client import OpenAICritic  # noqa: E402
from service.gateway.app import create_app  # noqa: E402
from service.jobs.connection import delete_prefix  # noqa: E402
from service.servers import serving  # noqa: E402
from service.settings import Settings  # noqa: E402
from workers.critics.standin import running_standin  # noqa: E402
from workers.generators import load_generator  # noqa: E402
from workers.worker import Worker, connect_worker  # noqa: E402

LOOP = {"max_rounds": 2, "candidates_per_round": 2, "threshold": 1.0, "patience": None}


def memory(redis_url: str, prefix: str) -> tuple[int, int]:
    client = redis_sync.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    used = sum(int(client.memory_usage(key) or 0) for key in keys)
    client.close()
    return used, delete_prefix(redis_url, prefix)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"gcr-bench-bytes-{uuid.uuid4().hex[:8]}"
    with running_standin() as critic_url, tempfile.TemporaryDirectory() as artifacts:
        values: dict[str, Any] = {
            "redis_url": args.redis_url,
            "redis_prefix": prefix,
            "critic_base_url": critic_url,
            "critic_model": "gcr-standin-critic",
            "generator": "sim:0",
            "auth_disabled": True,
            "rate_limit_per_s": 0,
            "heartbeat_s": 0.2,
        }
        if "artifact_url" in Settings.model_fields:  # absent from code that kept images in Redis
            values["artifact_url"] = f"file://{artifacts}"
        settings = Settings(**values)
        generator = load_generator(settings)
        worker = Worker(settings, generator, OpenAICritic(settings), connect_worker(settings, generator))
        task = asyncio.create_task(worker.run(drain_grace_s=1))
        async with serving(create_app(settings)) as url, AsyncClient(url) as client:
            for _ in range(200):
                if (await client.ready()).get("ready"):
                    break
                await asyncio.sleep(0.05)
            generation = {"width": args.size, "height": args.size}
            jobs = [
                await client.submit({"prompt": f"job {i}", "generation": generation, "loop": LOOP})
                for i in range(args.jobs)
            ]
            docs = [await client.wait(job.id) for job in jobs]
            images = [await client.image(d.id, r.index, c.index) for d in docs for r in d.rounds for c in r.candidates]
        worker.stop()
        await asyncio.wait({task}, timeout=10)
    used, keys = memory(args.redis_url, prefix)
    return {
        **run_info("redis_bytes"),
        "images_in_artifact_store": "artifact_url" in Settings.model_fields,
        "jobs": args.jobs,
        "size": args.size,
        "redis_bytes_per_job": used / args.jobs,
        "redis_keys_per_job": keys / args.jobs,
        "png_bytes_per_job": sum(len(i) for i in images) / args.jobs,
    }


def show(result: dict[str, Any]) -> None:
    print(
        f"{result['redis_bytes_per_job'] / 1024:.1f} KiB of Redis per finished job "
        f"({result['redis_keys_per_job']:.0f} keys); "
        f"its PNGs: {result['png_bytes_per_job'] / 1024:.1f} KiB; images in the artifact store: "
        f"{result['images_in_artifact_store']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    return finish(asyncio.run(run(args)), args.json, show)


if __name__ == "__main__":
    sys.exit(main())
