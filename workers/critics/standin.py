"""A STAND-IN critic: a real HTTP server that answers like RationalRewards, without a model.

It speaks the OpenAI chat-completions subset vLLM serves (`POST /v1/chat/completions`,
`GET /v1/models`, and vLLM's load gauges on `GET /metrics`) and answers in the exact RationalRewards output format with
deterministic, configured scores (`StandinConfig`), so that the loop, the worker
and the client can be tested end to end over HTTP where the GPU and the weights
would be. Its answers are not judgments: the model name is `gcr-standin-critic`
and every Summary says so.

What it reads from a request: the instruction from the `User Instruction:` line
of the user text; the round and candidate of the judged image from the
`gcr:round` / `gcr:candidate` PNG text chunks of the LAST image (0 when absent);
the mode from the image count (1: t2i dimensions, 2: edit dimensions); the
answer order (score first or justification first) from the order the prompt's
format section asks for.

Control endpoints, not part of the OpenAI API: `GET /standin/stats` (request
counters, the last request with image data elided, and the last JUDGED_KEPT requests'
instruction, mode, round, candidate, generator and image sizes), `GET|POST /standin/config`
(replace the config at run time; resets the counters).

Its pace: each answer takes `latency_s`; with `max_concurrency` C at most C answers are
worked on at once and the rest wait in line, first come first served, so that latency
grows with the critiques in flight past C as vLLM's does past its batch knee.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import socket
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gcr.types import overall_score
from service.critic.templates import load_templates
from service.servers import serving_in_thread
from workers.critics.standin_config import ScoreEntry, StandinConfig

STANDIN_FINGERPRINT = "gcr-standin"
JUDGED_KEPT = 500  # requests `GET /standin/stats` lists under `judged`, newest last
GARBAGE_ANSWER = (
    "STAND-IN FAULT: this answer deliberately holds no critique. The stand-in critic was "
    "configured to send an unparseable reply here."
)
_DATA_URI = re.compile(r"^data:image/(png|jpeg|jpg|webp|gif);base64,(.*)$", re.DOTALL)
_INSTRUCTION = re.compile(r"User Instruction:[ \t]*(.*)")
_MAX_IMAGE_PIXELS = 8192 * 8192
# Rough token costs, for the `usage` block only: ~4 characters per token, and a
# fixed per-image cost of the order Qwen3-VL spends on a 1024px image.
_CHARS_PER_TOKEN = 4
_TOKENS_PER_IMAGE = 1024


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-style error body, as vLLM sends it."""
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    headers = {"Retry-After": "0"} if status == 429 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Judged:
    """What the stand-in understood of one chat request."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.model = body.get("model")
        if not isinstance(self.model, str) or not self.model:
            raise _BadRequest("'model' is required and must be a non-empty string", "model")
        if body.get("stream"):
            raise _BadRequest("the stand-in critic does not stream", "stream")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' is required and must be a non-empty list", "messages")
        texts: list[str] = []
        self.images: list[Image.Image] = []
        for index, message in enumerate(messages):
            self._read_message(index, message, texts)
        count = len(self.images)
        if count not in (1, 2):
            raise _BadRequest(
                f"the stand-in judges 1 image (t2i) or 2 images (edit: source, edited), got {count}",
                "messages",
            )
        self.mode = "t2i" if count == 1 else "edit"
        self.text = "".join(texts)
        match = _INSTRUCTION.search(self.text)
        self.instruction = (match[1] if match else self.text).strip()
        info = self.images[-1].info
        self.round = _int_chunk(info.get("gcr:round"))
        self.candidate = _int_chunk(info.get("gcr:candidate"))
        self.generator = str(info.get("gcr:model", ""))
        score_at, justification_at = self.text.find("## Score:"), self.text.find("## Justification:")
        self.score_first = 0 <= score_at < justification_at

    def record(self) -> dict[str, Any]:
        """What `GET /standin/stats` lists of a judged request: enough for a test to check
        what the critic was asked, without the images."""
        return {
            "instruction": self.instruction,
            "mode": self.mode,
            "round": self.round,
            "candidate": self.candidate,
            "generator": self.generator,
            "sizes": [list(image.size) for image in self.images],
        }

    def _read_message(self, index: int, message: Any, texts: list[str]) -> None:
        param = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise _BadRequest(f"{param} needs a role of system, user or assistant", param)
        content = message.get("content")
        if isinstance(content, str):
            if message["role"] == "user":
                texts.append(content)
            return
        if not isinstance(content, list):
            raise _BadRequest(f"{param}.content must be a string or a list of parts", param)
        for part_index, part in enumerate(content):
            where = f"{param}.content[{part_index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if message["role"] == "user":
                    texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                self.images.append(_decode_image(part["image_url"].get("url"), where))
            else:
                raise _BadRequest(f"{where}: unsupported content part", where)


def _decode_image(url: Any, where: str) -> Image.Image:
    match = _DATA_URI.match(url) if isinstance(url, str) else None
    if match is None:
        raise _BadRequest(
            f"{where}: image_url must be a data:image/...;base64 URI (the stand-in fetches nothing)", where
        )
    try:
        payload = base64.b64decode(match[2], validate=True)
        image = Image.open(io.BytesIO(payload))
        if image.width * image.height > _MAX_IMAGE_PIXELS:
            raise _BadRequest(f"{where}: image too large", where)
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise _BadRequest(f"{where}: invalid image data: {exc}", where) from exc
    return image


def _int_chunk(value: Any) -> int:
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


def _fmt(score: float) -> str:
    text = f"{score:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def write_answer(
    instruction: str,
    dimensions: tuple[tuple[str, str], ...],
    entry: ScoreEntry,
    *,
    round_index: int,
    candidate: int,
    refine: bool,
    score_first: bool,
) -> str:
    """The RationalRewards-format answer for `entry`'s scores."""
    lines = [
        "# User Request Analysis",
        f'The user asks for: "{instruction}". This is the STAND-IN critic: the scores below '
        "are configured for tests, not judged from the image.",
        "# Detailed Judgement",
    ]
    scores: list[float | None] = []
    for number, (key, label) in enumerate(dimensions, start=1):
        score = entry.dimension_score(key)
        scores.append(score)
        reason = (
            f"Stand-in score for round {round_index + 1}, candidate {candidate + 1}; not a real judgment."
            if score is not None
            else "No text rendering was configured for this request."
        )
        justification = f"## Justification: {reason}"
        score_line = f"## Score: {_fmt(score) if score is not None else 'N/A'}"
        lines.append(f"{number}. {label}:")
        lines.extend([score_line, justification] if score_first else [justification, score_line])
    overall = overall_score(scores) if any(s is not None for s in scores) else 0.0
    lines += [
        f"# Summary: STAND-IN critic, not a real judgment: configured scores (overall {overall:.3f}) "
        f"for round {round_index + 1}, candidate {candidate + 1}.",
        "# User Request Refinement:",
        f"## Refinement Comments: Stand-in comment on round {round_index + 1}, candidate {candidate + 1}: "
        "no image was looked at."
        if refine
        else "## Refinement Comments: The stand-in was configured to give no refined request.",
    ]
    if refine:
        lines.append(f"## Refined Request: {instruction} [refined r{round_index} c{candidate}]")
    return "\n".join(lines)


class _Standin:
    """The server's state: config, counters, fault budget."""

    def __init__(self, config: StandinConfig) -> None:
        dims = load_templates()
        self.dimensions = {"t2i": dims["t2i"].dimensions, "edit": dims["edit"].dimensions}
        self.reset(config)

    def reset(self, config: StandinConfig) -> None:
        self.config = config
        self.running = 0
        self.waiting = 0
        self._ceiling = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        self.requests = 0
        self.by_instruction: Counter[str] = Counter()
        self.fault_uses = [0] * len(config.faults)
        self.faults_served = 0
        self.last_request: dict[str, Any] | None = None
        self.judged: deque[dict[str, Any]] = deque(maxlen=JUDGED_KEPT)

    async def chat(self, request: Request) -> Response:
        self.requests += 1
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        self.last_request = _elide_images(body)
        try:
            judged = _Judged(body)
        except _BadRequest as exc:
            return _error(400, exc.message, exc.param)
        self.by_instruction[judged.instruction] += 1
        self.judged.append(judged.record())
        config = self.config
        for index, fault in enumerate(config.faults):
            if self.fault_uses[index] < fault.times and fault.matches(judged.instruction):
                self.fault_uses[index] += 1
                self.faults_served += 1
                if fault.kind == "status":
                    return _error(fault.status, f"stand-in fault: HTTP {fault.status}")
                if fault.kind == "timeout":
                    await _sleep_unless_disconnected(request, fault.timeout_s)
                    break
                await self._decode(config.latency_s)
                return _completion(config.model, GARBAGE_ANSWER, judged)
        await self._decode(config.latency_s)
        entry, refine = config.entry(judged.instruction, judged.round, judged.candidate)
        answer = write_answer(
            judged.instruction,
            self.dimensions[judged.mode],
            entry,
            round_index=judged.round,
            candidate=judged.candidate,
            refine=refine,
            score_first=judged.score_first,
        )
        return _completion(config.model, answer, judged)

    async def _decode(self, seconds: float) -> None:
        """The model's time on one answer: under a ceiling, its turn comes first (FIFO)."""
        ceiling = self._ceiling
        if ceiling is None:
            self.running += 1
            try:
                await asyncio.sleep(seconds)
            finally:
                self.running -= 1
            return
        self.waiting += 1
        try:
            await ceiling.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self.running -= 1
            ceiling.release()

    async def metrics(self, request: Request) -> Response:
        """The two load series of vLLM's `/metrics`, in its names: what a worker's critique limit reads."""
        name = self.config.model
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{name}"}} {float(self.running)}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{name}"}} {float(self.waiting)}\n'
        )
        return Response(text, media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": STANDIN_FINGERPRINT}
        return JSONResponse({"object": "list", "data": [model]})

    async def stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                "requests": self.requests,
                "by_instruction": dict(self.by_instruction),
                "faults_served": self.faults_served,
                "last_request": self.last_request,
                "judged": list(self.judged),
            }
        )

    async def get_config(self, request: Request) -> Response:
        return JSONResponse(self.config.model_dump(mode="json"))

    async def set_config(self, request: Request) -> Response:
        try:
            config = StandinConfig.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "BadRequestError"}}, status_code=422)
        self.reset(config)
        return JSONResponse(config.model_dump(mode="json"))

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)


def _completion(model: str, content: str, judged: _Judged) -> JSONResponse:
    prompt_tokens = len(judged.text) // _CHARS_PER_TOKEN + _TOKENS_PER_IMAGE * len(judged.images)
    completion_tokens = len(content) // _CHARS_PER_TOKEN + 1
    return JSONResponse(
        {
            "id": f"chatcmpl-standin-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": STANDIN_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


async def _sleep_unless_disconnected(request: Request, seconds: float) -> None:
    # Polling lets a client that gave up free the server (and a test's shutdown) at once.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return
        await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _elide_images(body: dict[str, Any]) -> dict[str, Any]:
    """The request body with image data replaced by its size: stats stay small."""

    def elide(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: elide(v) for k, v in value.items()}
        if isinstance(value, list):
            return [elide(v) for v in value]
        if isinstance(value, str) and value.startswith("data:") and len(value) > 64:
            return f"{value.split(',', 1)[0]},...({len(value)} chars)"
        return value

    elided: dict[str, Any] = elide(body)
    return elided


def create_app(config: StandinConfig | None = None) -> Starlette:
    """The stand-in critic as an ASGI app."""
    state = _Standin(config or StandinConfig())
    routes = [
        Route("/v1/chat/completions", state.chat, methods=["POST"]),
        Route("/v1/models", state.models, methods=["GET"]),
        Route("/health", state.health, methods=["GET"]),
        Route("/metrics", state.metrics, methods=["GET"]),
        Route("/standin/stats", state.stats, methods=["GET"]),
        Route("/standin/config", state.get_config, methods=["GET"]),
        Route("/standin/config", state.set_config, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _uvicorn_config(app: Starlette, host: str, port: int, log_level: str) -> uvicorn.Config:
    # No websockets and no lifespan: neither is used, and loading them only adds
    # imports (and their deprecation warnings) to every test that starts a stand-in.
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, ws="none", lifespan="off", timeout_graceful_shutdown=2
    )


@contextmanager
def running_standin(config: StandinConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run a stand-in on a background thread; yields its base URL (`http://HOST:PORT/v1`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(_uvicorn_config(create_app(config), host, bound_port, "warning"))
    try:
        with serving_in_thread(server, sockets=[sock]):
            url_host = f"[{host}]" if ":" in host else host
            yield f"http://{url_host}:{bound_port}/v1"
    finally:
        sock.close()


def serve_standin(config: StandinConfig | None = None, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Run a stand-in in the foreground until interrupted (for `gcr` commands)."""
    uvicorn.Server(_uvicorn_config(create_app(config), host, port, "info")).run()
