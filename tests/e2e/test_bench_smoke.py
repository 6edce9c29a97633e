"""The benchmarks run end to end in a tiny configuration and write sane JSON.

Smoke tests, not timings: each runs the benchmark's one command as a subprocess
(servers, Redis and worker as the benchmark starts them) for a few seconds, then
checks the keys and the ranges of the numbers, never their size.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, args: list[str], out: Path, timeout_s: float = 150) -> dict[str, Any]:
    """Run `bench/<script> ARGS --json OUT` and return the JSON it wrote."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def run_bench(script: str, args: list[str], out: Path, redis_url: str, timeout_s: float = 150) -> dict[str, Any]:
    return run_script(script, [*args, "--redis-url", redis_url], out, timeout_s)


def test_orchestration_benchmark_smoke(tmp_path: Path, redis_url: str) -> None:
    result = run_bench(
        "orchestration.py",
        ["--jobs", "3", "--rounds", "2", "--t-gen", "0.1", "--t-critic", "0.1", "--seq-jobs", "1"],
        tmp_path / "orchestration.json",
        redis_url,
    )
    for key in ("busy_fraction", "speedup_vs_sequential", "ratio_to_bound", "overhead_fraction"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert (result["jobs"], result["rounds"], result["t_gen"], result["t_critic"]) == (3, 2, 0.1, 0.1)
    assert 0 < result["busy_fraction"] <= 1
    assert result["speedup_vs_sequential"] > 0 and result["ratio_to_bound"] > 0
    assert result["rounds_per_s"] > 0 and result["jobs_per_s"] > 0
    assert result["concurrent"]["rounds_done"] == 6 and result["sequential"]["rounds_done"] == 2
    assert result["errors"] == []
    assert "simulation" in result["note"] and result["machine"]["cpus_usable"] >= 1


def test_gateway_benchmark_smoke(tmp_path: Path, redis_url: str) -> None:
    result = run_bench(
        "gateway.py",
        ["--clients", "4", "--requests", "60", "--warmup", "10", "--repeats", "1"],
        tmp_path / "gateway.json",
        redis_url,
    )
    for op in ("submit", "poll"):
        assert result[f"{op}_ratio"] > 0
        for target in ("gateway", "bare"):
            stats = result[op][target]
            assert stats["errors"] == 0 and stats["requests"] == 60
            assert stats["req_per_s"] > 0
            assert 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]


@pytest.mark.timeout(180)  # two sizes x three batch sizes of the tiny FLUX on two shared cores
def test_gpu_validation_script_runs_on_cpu_with_the_tiny_flag(tmp_path: Path) -> None:
    result = run_script("gpu_validate.py", ["--tiny", "--device", "cpu", "--calls", "1"], tmp_path / "gpu.json", 170)
    rows = result["batches"]
    assert [(row["size"], row["batch"]) for row in rows] == [(64, 1), (64, 2), (64, 4), (128, 1), (128, 2), (128, 4)]
    assert all(row["s_per_image"] > 0 for row in rows)
    # The memory check's estimate for each row's own batch and size: it grows with both.
    estimates = [row["estimate_gib"] for row in rows]
    assert all(e > 0 for e in estimates) and estimates[:3] == sorted(estimates[:3]) and estimates[3] > estimates[0]
    assert all(row["estimate_covers_peak"] is None for row in rows)  # no peak to compare on the CPU
    assert result["cancel"]["ok"] and result["cancel"]["latency_s"] >= 0
    assert "interrupted after step 2" in result["cancel"]["message"]
    assert result["packages"]["diffusers"]["version"] and result["complete"] and result["ok"]


def test_previews_benchmark_runs_and_reports_both_sides(tmp_path: Path) -> None:
    result = run_script("previews.py", ["--repeats", "1", "--steps", "2", "--size", "64"], tmp_path / "previews.json")
    tiny = result["tiny_flux"]
    assert tiny["s_per_step_without"] > 0 and tiny["s_per_step_with_preview_every_step"] > 0
    assert tiny["previews_made"] >= 1 and result["full_size_flux_preview_ms"] > 0


def test_redis_bytes_benchmark_reports_a_job_without_its_images(tmp_path: Path, redis_url: str) -> None:
    result = run_bench("redis_bytes.py", ["--jobs", "1", "--size", "64"], tmp_path / "bytes.json", redis_url)
    assert result["images_in_artifact_store"] and result["redis_bytes_per_job"] > 0 and result["png_bytes_per_job"] > 0


def test_scaling_benchmark_runs_worker_processes_and_reports_each_count(tmp_path: Path, redis_url: str) -> None:
    args = ["--workers", "1,2", "--t-gen", "0.2", "--t-critic", "0.1", "--warmup", "1", "--duration", "2"]
    result = run_bench("scaling.py", args, tmp_path / "scaling.json", redis_url, timeout_s=120)
    runs = result["runs"]
    assert [r["workers"] for r in runs] == [1, 2]
    assert all(r["rounds"] > 0 and r["rounds_per_s"] > 0 and r["workers_with_rounds"] == r["workers"] for r in runs)
    assert runs[1]["efficiency"] > 0 and runs[1]["rounds_in_window_per_s"] > 0
    assert runs[1]["redis_commands_per_round"] > 0 and runs[1]["redis_bytes_per_job"] > 0
    assert set(runs[1]["cpu_ms_per_round"]) >= {"workers", "gateway", "redis"}


def test_streams_benchmark_smoke(tmp_path: Path, redis_url: str) -> None:
    result = run_bench(
        "streams.py",
        ["--streams", "30", "--requests", "40", "--clients", "4", "--repeats", "1", "--probe", "5",
         "--no-check-latency"],
        tmp_path / "streams.json",
        redis_url,
    )  # fmt: skip
    assert result["streams_opened"] == 30 and result["streams_open_after_load"] == 30
    assert result["probes"] == 5 and result["probes_ended"] == 5
    for phase in ("idle", "with_streams"):
        for op in ("submit", "poll"):
            numbers = result[phase][op]
            assert numbers["requests"] == 40 and numbers["errors"] == 0
            assert 0 < numbers["p50_ms"] <= numbers["p95_ms"] <= numbers["p99_ms"] <= numbers["max_ms"]
    assert {row["metric"] for row in result["targets"]} >= {"submit p95 with streams / idle"}
