"""Error answers found by the red team: each a clear JSON 4xx/5xx over real HTTP, never plain text."""

from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.types import Receive, Scope, Send

from service.gateway.app import create_app
from service.gateway.bodies import JSON_OVERHEAD_BYTES
from service.servers import serving
from tests.stack import Stack


def _noise_png(side: int) -> bytes:
    """An incompressible PNG: random pixels."""
    image = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _openai(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused-auth-is-off")


async def test_an_edit_without_its_image_is_a_422_even_when_no_edit_worker_runs(stack: Stack) -> None:
    await stack.register_idle_worker(modes=("t2i",))  # nobody serves edits
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post("/generate", json={"prompt": "make it blue", "mode": "edit"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and error["field"] == "source_image" and not error["retryable"]


async def test_v1_edits_take_an_image_as_large_as_the_image_limit(stack: Stack) -> None:
    await stack.start_worker()
    png = _noise_png(700)
    assert 1.3e6 < len(png) < stack.settings.max_image_bytes  # over the old 1 MiB body limit
    async with _openai(stack) as client:
        result = await client.images.edit(
            image=("big.png", png, "image/png"),
            prompt="make it blue",
            extra_body={"gcr": '{"loop": {"max_rounds": 1}}'},
        )
    assert result.data and result.data[0].b64_json


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "²x²"}, "size"),
        ({"size": "64x"}, "size"),
        ({"extra_body": {"gcr": {"loop": {"candidates_per_round": None}}}}, "gcr.loop.candidates_per_round"),
        ({"extra_body": {"gcr": {"loop": {"candidates_per_round": "many"}}}}, "gcr.loop.candidates_per_round"),
    ],
)
async def test_bad_v1_fields_are_a_400_in_openais_shape(stack: Stack, body: dict[str, object], param: str) -> None:
    await stack.start_worker()
    async with _openai(stack) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(prompt="a kite", **body)  # type: ignore[call-overload]
    error = refused.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert param.split(".")[-1] in str(refused.value.param) and refused.value.code
    assert refused.value.response.headers["x-should-retry"] == "false"


async def test_deeply_nested_gcr_json_in_a_v1_edit_is_a_400_not_a_500(stack: Stack) -> None:
    await stack.start_worker()
    async with _openai(stack) as client:
        for deep in ("[" * 100_000 + "]" * 100_000, '{"loop": ' * 5_000 + "1" + "}" * 5_000):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.images.edit(
                    image=("src.png", _noise_png(32), "image/png"), prompt="make it blue", extra_body={"gcr": deep}
                )
            assert refused.value.param == "gcr" and "recursion limit" in refused.value.message


class _ExplodingMiddleware:
    """Raises on one path, outside every route: where plain-text 500s came from."""

    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/boom-in-middleware":
            raise RuntimeError("a bug in a middleware")
        await self.app(scope, receive, send)  # type: ignore[operator]


@pytest.fixture
async def exploding_gateway(stack: Stack) -> AsyncIterator[str]:
    app: FastAPI = create_app(stack.settings)

    async def boom() -> None:
        raise ZeroDivisionError("a bug in a route")

    app.add_api_route("/boom-in-route", boom)
    app.add_api_route("/v1/boom-in-route", boom)
    app.add_middleware(_ExplodingMiddleware)
    async with serving(app) as url:
        yield url


@pytest.mark.parametrize("path", ["/boom-in-route", "/boom-in-middleware", "/v1/boom-in-route"])
async def test_an_unexpected_exception_is_a_json_500_with_a_request_id(exploding_gateway: str, path: str) -> None:
    async with httpx.AsyncClient(base_url=exploding_gateway) as http:
        response = await http.get(path)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    request_id = response.headers["x-request-id"]
    assert error["code"] == "internal" and error["request_id"] == request_id and request_id in error["message"]
    assert "bug" not in error["message"]  # the traceback stays in the log


async def test_a_clients_request_id_is_kept(exploding_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=exploding_gateway) as http:
        response = await http.get("/boom-in-route", headers={"X-Request-Id": "trace-42"})
    assert response.json()["error"]["request_id"] == "trace-42" == response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {"prompt": "x", "loop": {"max_rounds": True}}, "loop.max_rounds"),
        ("/generate", {"prompt": "x", "loop": {"max_rounds": "3"}}, "loop.max_rounds"),
        ("/generate", {"prompt": "x", "generation": {"width": "64"}}, "generation.width"),
        ("/generate", {"prompt": "x", "loop": {"history": "yes"}}, "loop.history"),
        ("/generate", {"prompt": "\u200b\u200b \ufeff"}, "prompt"),
        ("/critique", {"instruction": "\u200b", "image": "aGVsbG8="}, "instruction"),
        ("/v1/images/generations", {"prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/images/generations", {"prompt": "\u200b"}, "prompt"),
    ],
)
async def test_types_are_strict_and_invisible_text_is_blank(
    stack: Stack, path: str, body: dict[str, object], field: str
) -> None:
    await stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post(path, json=body)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert (error.get("field") or error.get("param")) == field, error


async def test_v1_errors_name_what_was_wrong(stack: Stack) -> None:
    await stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        generations = "/v1/images/generations"
        headers = {"content-type": "application/json"}
        nan = await http.post(generations, content=b'{"prompt": "x", "guidance_scale": NaN}', headers=headers)
        assert nan.status_code == 400 and nan.json()["error"]["param"] == "guidance_scale", nan.text
        assert "disagree" not in nan.json()["error"]["message"]

        broken = await http.post(generations, content=b'{"prompt": "x",', headers=headers)
        assert broken.status_code == 400 and broken.json()["error"]["param"] is None, broken.text

        files = {"image": ("src.png", _noise_png(32), "image/png")}
        empty = await http.post("/v1/images/edits", data={"prompt": ""}, files=files)
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt", empty.text
        assert "Field required" not in empty.json()["error"]["message"]

        too_large = await http.post(generations, content=b" " * (JSON_OVERHEAD_BYTES + 1), headers=headers)
        assert too_large.status_code == 413
        assert too_large.json()["error"]["type"] == "invalid_request_error", too_large.text
        assert too_large.json()["error"]["code"] == "payload_too_large"
        assert too_large.headers["x-should-retry"] == "false"
