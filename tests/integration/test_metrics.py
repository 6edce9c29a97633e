"""Prometheus metrics say whether the GPU is the bottleneck."""

from __future__ import annotations

import httpx
from prometheus_client import REGISTRY

from tests.stack import Stack


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_gateway_and_worker_metrics(stack: Stack) -> None:
    busy_before = sample("gcr_generator_busy_seconds_total")
    batches_before = sample("gcr_generator_batch_size_count")
    await stack.start_worker(generator="sim:0.05")
    await stack.wait(await stack.submit("measured", loop={"max_rounds": 2, "threshold": 1.0}))
    assert sample("gcr_generator_busy_seconds_total") - busy_before >= 0.09
    assert sample("gcr_generator_batch_size_count") - batches_before == 2
    assert sample("gcr_stage_seconds_count", {"stage": "critique"}) >= 2

    async with httpx.AsyncClient(base_url=stack.url) as http:
        await http.get("/jobs/unknown-id")
        text = (await http.get("/metrics")).text
    assert 'gcr_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"}' in text
    assert 'gcr_http_errors_total{code="not_found"}' in text
    assert "unknown-id" not in text  # ids never become label values
