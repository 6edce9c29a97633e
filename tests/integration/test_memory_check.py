"""The worker's memory check: parameters from configs alone, a clear refusal, and a worker
that reports it does not fit instead of crash-looping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.stack import Stack
from workers.generators.diffusers_backend import DiffusersGenerator
from workers.generators.memory import GIB, MemoryEstimate, count_parameters, judge
from workers.generators.tiny import ensure_tiny_pipeline
from workers.preflight import hold_until_it_fits

pytest_plugins = ("tests.generator_fixtures",)

FLUX_SCHNELL = Path(__file__).resolve().parents[2] / "workers" / "generators" / "data" / "flux1-schnell"


@pytest.mark.parametrize(("kind", "fixture"), [("sd", "tiny_sd"), ("flux", "tiny_flux")])
def test_counted_from_configs_equals_what_loads(
    kind: str, fixture: str, tiny_cache_dir: Path, request: pytest.FixtureRequest
) -> None:
    generator: DiffusersGenerator = request.getfixturevalue(fixture)
    loaded = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in generator.pipeline.components.items()
        if hasattr(module, "parameters")
    }
    assert count_parameters(ensure_tiny_pipeline(kind, tiny_cache_dir)) == loaded


def test_flux_schnell_full_size_from_its_configs() -> None:
    counts = count_parameters(FLUX_SCHNELL)
    assert counts["transformer"] == 11_891_178_560  # "a 12 billion parameter rectified flow transformer"
    assert counts["text_encoder_2"] == 4_762_310_656  # the T5 v1.1 XXL encoder
    needs = MemoryEstimate(counts, dtype_bytes=2, max_batch=4, megapixels=1.048576)
    assert 31 * GIB < needs.weights < 32 * GIB
    assert needs.total < 45 * GIB
    offloaded = MemoryEstimate(counts, dtype_bytes=2, max_batch=1, megapixels=1.0, cpu_offload=True)
    assert offloaded.weights == counts["transformer"] * 2


def test_a_model_that_does_not_fit_is_refused_with_what_to_change() -> None:
    needs = MemoryEstimate(count_parameters(FLUX_SCHNELL), dtype_bytes=2, max_batch=4, megapixels=1.048576)
    verdict = judge(needs, "cuda:0", free=14 * GIB, total=80 * GIB)
    assert not verdict.fits
    line = verdict.message
    assert "\n" not in line and line.startswith("needs ~")
    assert "14.0 GiB free of 80.0 on cuda:0 (other processes hold 66.0 GiB)" in line
    assert "VLLM_GPU_MEMORY_UTILIZATION" in line and "GCR_MAX_BATCH" in line and "second GPU" in line
    assert judge(needs, "cuda:0", free=60 * GIB, total=80 * GIB).fits


async def test_a_worker_that_does_not_fit_says_so_and_loads_once_it_does(stack: Stack) -> None:
    free = [10 * GIB]

    def probe(device: str) -> tuple[int, int]:  # stands in for torch.cuda.mem_get_info
        return free[0], 80 * GIB

    settings = stack.settings.model_copy(update={"worker_id": "unfit-1", "memory_retry_s": 0.3, "max_batch": 4})
    waiting = asyncio.create_task(hold_until_it_fits(settings, str(FLUX_SCHNELL), "cuda:0", probe))
    async with httpx.AsyncClient(base_url=stack.url) as http:
        async with asyncio.timeout(30):
            while "unfit-1" not in str((await http.get("/readyz")).json()):
                await asyncio.sleep(0.05)
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert "does not fit on cuda:0: needs ~" in ready.json()["reason"]
        refused = await http.post("/generate", json={"prompt": "x"})
        assert refused.status_code == 503 and "10.0 GiB free of 80.0" in refused.json()["error"]["message"]
        assert not waiting.done()

        free[0] = 70 * GIB  # vLLM was restarted with a smaller share
        verdict = await asyncio.wait_for(waiting, timeout=30)
        assert verdict.fits
        assert "unfit-1" not in str((await http.get("/readyz")).json()["workers"])


def test_the_estimate_assumes_the_workers_output_cap() -> None:
    """GCR_MAX_OUTPUT_PIXELS is the size the gateway lets through, so the check plans for it."""
    from workers.generators.memory import megapixels_for

    flux = "black-forest-labs/FLUX.1-schnell"
    assert megapixels_for(flux, Settings(), edit=False) == 1024 * 1024 / 1e6
    assert megapixels_for(flux, Settings(max_output_pixels=2048 * 2048), edit=False) == 2048 * 2048 / 1e6
    assert megapixels_for(flux, Settings(max_output_pixels=2048 * 2048, edit_max_edge=512), edit=True) == 0.262144
