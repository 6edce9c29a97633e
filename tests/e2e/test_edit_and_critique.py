"""Edit mode end to end on the tiny FLUX Kontext pipeline (the class users deploy), and
critique as a service (`POST /critique`, `gcr critique`) against the stand-in over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.settings import Settings
from tests.stack import Stack

pytest_plugins = ("tests.generator_fixtures",)
pytestmark = [
    pytest.mark.filterwarnings(w)
    for w in (
        "ignore:.*torch.jit.script.*is deprecated:DeprecationWarning",
        "ignore:.*torch_dtype.*is deprecated:FutureWarning",
    )
]
ROOT = Path(__file__).resolve().parents[2]


def png(size: tuple[int, int], colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_edit_job_on_tiny_kontext(stack: Stack, generator_settings: Callable[..., Settings]) -> None:
    cache = generator_settings().cache_dir
    await stack.start_worker(
        generator="tiny:kontext", cache_dir=cache, generator_device="cpu", generator_dtype="float32"
    )
    source = png((96, 64), "navy")
    job_id = await stack.submit(
        "make the sky orange",
        mode="edit",
        source_image=base64.b64encode(source).decode(),
        loop={"max_rounds": 2, "threshold": 1.0, "patience": None},
    )
    doc = await stack.wait(job_id, timeout_s=120)
    assert doc.status == "succeeded", doc.error
    assert len(doc.rounds) == 2 and doc.generator_model == "tiny:kontext"
    # the critic judged source + edited image with the edit template's four dimensions
    critique = doc.rounds[0].candidates[0].critique
    assert critique is not None and "image_faithfulness" in critique.dimensions
    stats = await stack.critic_stats()
    images = [
        p
        for m in stats["last_request"]["messages"]
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image_url"
    ]
    assert len(images) == 2
    # the edited image keeps the source's aspect (long edge bounded by the tiny pipeline's cap)
    edited = Image.open(io.BytesIO(await stack.client.download(doc.best.image_url or "")))  # type: ignore[union-attr]
    assert edited.size[0] > edited.size[1]
    async with httpx.AsyncClient() as http:
        linked = await http.get(doc.links["source_image"])
    assert Image.open(io.BytesIO(linked.content)).size == (96, 64)


async def test_a_t2i_worker_leaves_edit_jobs_to_edit_workers(
    stack: Stack, generator_settings: Callable[..., Settings]
) -> None:
    cache = generator_settings().cache_dir
    await stack.start_worker(generator="tiny:sd", cache_dir=cache, generator_device="cpu", generator_dtype="float32")
    await stack.register_idle_worker(modes=("edit",))  # admits the edit job, claims nothing
    job_id = await stack.submit(
        "add a hat", mode="edit", source_image=base64.b64encode(png((64, 64), "red")).decode(), loop={"max_rounds": 1}
    )
    t2i = await stack.wait(await stack.submit("a hat", loop={"max_rounds": 1}), timeout_s=60)
    assert t2i.status == "succeeded" and t2i.generator_model == "tiny:sd"
    assert (await stack.client.get(job_id)).status == "queued"
    await stack.start_worker(generator="sim:0.0")  # serves both modes
    assert (await stack.wait(job_id)).status == "succeeded"


@pytest.mark.parametrize("mode", ["t2i", "edit"])
async def test_post_critique(stack: Stack, mode: str) -> None:
    body = {"instruction": "a green apple", "image": base64.b64encode(png((64, 64), "green")).decode()}
    if mode == "edit":
        body["source_image"] = base64.b64encode(png((64, 64), "red")).decode()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post("/critique", json=body)
    assert response.status_code == 200, response.text
    critique = response.json()
    assert critique["model"] == "gcr-standin-critic"
    assert ("image_faithfulness" in critique["dimensions"]) == (mode == "edit")
    assert 0 <= critique["overall"] <= 1 and critique["refined_request"]


async def test_post_critique_refuses_a_non_image(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post("/critique", json={"instruction": "x", "image": base64.b64encode(b"hi").decode()})
    assert response.status_code == 422 and response.json()["error"]["field"] == "image"


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


@pytest.mark.parametrize("mode", ["t2i", "edit"])
async def test_gcr_critique_cli_goes_through_the_gateway(stack: Stack, tmp_path: Path, mode: str) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(png((64, 64), "green"))
    args = ["critique", "--instruction", "a green apple", "--image", str(image), "--json", "--url", stack.url]
    if mode == "edit":
        source = tmp_path / "source.png"
        source.write_bytes(png((64, 64), "red"))
        args += ["--source-image", str(source)]
    result = await asyncio.to_thread(run_cli, args)  # the gateway answers on this test's event loop
    assert result.returncode == 0, result.stderr
    critique = json.loads(result.stdout)
    assert ("image_faithfulness" in critique["dimensions"]) == (mode == "edit")
    assert critique["model"] == "gcr-standin-critic"


def test_gcr_critique_direct_calls_the_configured_critic(standin_url: str, tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(png((64, 64), "green"))
    args = ["critique", "--direct", "--instruction", "a green apple", "--image", str(image), "--json"]
    result = run_cli(args, GCR_CRITIC_BASE_URL=standin_url, GCR_CRITIC_MODEL="gcr-standin-critic")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "gcr-standin-critic"


def test_gcr_critique_cli_fails_with_one_line_when_unreachable(tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(png((64, 64), "green"))
    gateway = run_cli(["critique", "--instruction", "x", "--image", str(image), "--url", "http://127.0.0.1:9"])
    assert gateway.returncode != 0
    assert (
        gateway.stderr.strip().count("\n") == 0 and "cannot reach the gateway at http://127.0.0.1:9" in gateway.stderr
    )
    direct = run_cli(
        ["critique", "--direct", "--instruction", "x", "--image", str(image)],
        GCR_CRITIC_BASE_URL="http://gcr:s3cret@127.0.0.1:9/v1",
        GCR_CRITIC_RETRIES="0",
    )
    assert direct.returncode != 0
    assert direct.stderr.strip().count("\n") == 0 and "critic_unavailable" in direct.stderr
    assert "s3cret" not in direct.stderr


def test_worker_with_an_unloadable_model_fails_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_cli(
        ["worker"], GCR_GENERATOR=str(tmp_path / "no-such-model"), GCR_LOG_FORMAT="text", HF_HUB_OFFLINE="1"
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error:") and "no-such-model" in last
