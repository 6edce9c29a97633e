"""GPU smoke test: batching pays, bf16 is sane, a real CUDA OOM is split (see bench/gpu_smoke.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIZE, STEPS = 512, 8


@pytest.fixture(scope="module")
def smoke() -> Any:
    from bench import gpu_smoke

    return gpu_smoke


@pytest.fixture(scope="module")
def small_flux(smoke: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder: Path = smoke.build(tmp_path_factory.mktemp("small-flux") / "flux")
    return folder


@pytest.fixture(scope="module")
def bf16(smoke: Any, small_flux: Path) -> Iterator[Any]:
    generator = smoke.load(small_flux, "cuda", "bfloat16")
    yield generator
    del generator
    torch.cuda.empty_cache()


def test_batch_of_four_makes_more_images_per_second(smoke: Any, bf16: Any) -> None:
    one = smoke.measure_throughput(bf16, 1, SIZE, STEPS, calls=3)
    four = smoke.measure_throughput(bf16, 4, SIZE, STEPS, calls=3)
    assert four.images_per_s > one.images_per_s, (one, four)


def test_bf16_output_is_finite_varied_and_close_to_fp32(smoke: Any, bf16: Any, small_flux: Path) -> None:
    fp32 = smoke.load(small_flux, "cuda", "float32")
    try:
        check = smoke.check_bf16(bf16, fp32, SIZE, STEPS)
    finally:
        del fp32
        torch.cuda.empty_cache()
    assert check.ok, check


def test_a_real_cuda_oom_is_split_and_every_request_gets_its_image(smoke: Any, bf16: Any) -> None:
    check = smoke.check_oom_split(bf16, SIZE * 2, STEPS)
    assert check.ok, check
    assert check.calls[0] == 4 and len(check.calls) > 1, check
