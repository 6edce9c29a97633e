"""schemathesis against the served OpenAPI schema: no 5xx, no answer outside the schema.

Bounded: a fixed number of examples per operation, derandomized, so CI time is stable.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, positive_data_acceptance

from service.gateway.app import create_app
from service.jobs.connection import connect, delete_prefix
from service.jobs.keys import Keys
from service.jobs.registry import WorkerHeartbeat, WorkerRegistry
from service.servers import config, free_port, serving_in_thread
from service.settings import Settings
from workers.critics.standin import running_standin


@pytest.fixture(scope="module")
def gateway_url(redis_url: str) -> Iterator[str]:
    prefix = f"gcr-fuzz-{uuid.uuid4().hex[:8]}"
    port = free_port()
    critic = running_standin()
    critic_url = critic.__enter__()
    app = create_app(
        Settings(
            redis_url=redis_url,
            redis_prefix=prefix,
            auth_disabled=True,
            rate_limit_per_s=0,
            critic_base_url=critic_url,
            critic_model="gcr-standin-critic",
            critic_retries=0,
            worker_stale_s=3600,
            openai_wait_s=0.5,  # nothing runs the fuzzed jobs: answer 504 job_still_running at once
        )
    )
    # A worker that serves every mode and claims nothing: without one, every submit is a 503.
    asyncio.run(_idle_worker_heartbeat(redis_url, prefix))
    with serving_in_thread(uvicorn.Server(config(app, port, log_level="error"))):
        yield f"http://127.0.0.1:{port}"
    critic.__exit__(None, None, None)
    delete_prefix(redis_url, prefix)


async def _idle_worker_heartbeat(redis_url: str, prefix: str) -> None:
    client = connect(redis_url)
    beat = WorkerHeartbeat(id="idle-fuzz-worker", model="sim:0.0", modes=["t2i", "edit"])
    await WorkerRegistry(client, Keys(prefix)).heartbeat(beat, ttl_s=3600)
    await client.aclose()


# positive_data_acceptance is off: schema-valid bodies can still break rules the schema cannot
# state (an edit without a source image, a private callback URL), and those must be refused.
SKIPPED_PATHS = {
    "/jobs/{job_id}/events",  # an endless stream for a live job
    # These wait for a whole job, which nothing runs here: they answer 504 job_still_running
    # by design; tests/e2e/test_openai_compat.py drives them with the openai package.
    "/v1/images/generations",
    "/v1/images/edits",
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")
def test_api_conforms_to_its_schema(gateway_url: str) -> None:
    # NOTE: schemathesis' pytest plugin (from_fixture) breaks on pytest 9, so the
    # operations are driven through hypothesis directly: same strategies, same checks.
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10
    for operation in operations:
        if operation.path not in SKIPPED_PATHS:
            fuzz(operation)


def fuzz(operation: Any) -> None:
    # /readyz answers 503 on purpose while no worker is alive (its schema says so).
    excluded = [positive_data_acceptance] + ([not_a_server_error] if operation.path == "/readyz" else [])

    @settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        case.call_and_validate(timeout=20, excluded_checks=excluded)

    check()
