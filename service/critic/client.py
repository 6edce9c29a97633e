"""The critic over an OpenAI-compatible chat-completions endpoint (vLLM serving RationalRewards).

This is the only place httpx errors of the critic are seen: they become
`CriticTimeout` (a request took longer than `critic_timeout_s`) or
`CriticUnavailable` (connection refused or dropped, 5xx or 429, after
`critic_retries` retries with exponential backoff and jitter; a 429's
`Retry-After` is honoured up to `RETRY_AFTER_CAP_S`). Another 4xx is our
request's or our configuration's fault, never retried: a request past a limit the
server was started with (vLLM's 400s for the context length and the images per
prompt) is `CriticRefused`, whose message names the limit and the setting that moves
it; anything else (an unknown model name, say) a plain `CriticError`.

An answer the parser cannot read (or one cut off at `max_tokens`) is asked for
once more, the same request, constrained by vLLM `structured_outputs` when
`critic_structured_outputs` is on (the default: a random-weight Qwen3-VL under the real
`vllm serve` never wrote a parseable first answer, and always did under the bounded
regex); a second failure raises `CritiqueUnparseable`, carrying the tokens spent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client import Counter
from tenacity import RetryCallState

from gcr.backoff import equal_jitter_s, retry_after_s
from gcr.types import Critique, Mode, source_image_problem
from service.critic.parser import critique_regex, parse_critique
from service.critic.templates import ImageInput, Template, build_messages, load_templates
from service.errors import (
    ConfigurationError,
    CriticError,
    CriticRefused,
    CriticTimeout,
    CriticUnavailable,
    CritiqueUnparseable,
    InvalidInput,
)
from service.retrying import retrying
from service.settings import SharedSettings

log = logging.getLogger("gcr.critic")

CRITIC_RETRIES = Counter("gcr_critic_retries_total", "Critic requests retried, by cause.", ["reason"])

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
RETRY_AFTER_CAP_S = 30.0
PROBE_TIMEOUT_S = 5.0
_RETRY_STATUSES = frozenset({429}) | frozenset(range(500, 600))
# Errors after which the same request may simply be sent again: nothing was
# answered (refused, reset, dropped). Read/write/pool timeouts are not retried: the
# request already spent its whole time budget.
_RETRY_ERRORS: tuple[type[Exception], ...] = (
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ConnectTimeout,
)


@dataclass(frozen=True)
class CriticLoad:
    """What the critic's engine is doing: requests it decodes now, and requests that wait."""

    running: int
    waiting: int


class _Answer:
    def __init__(self, content: str, model: str, usage: dict[str, int] | None, truncated: bool) -> None:
        self.content = content
        self.model = model
        self.usage = usage
        self.truncated = truncated


def _reask_regexes(settings: SharedSettings, templates: dict[str, Template]) -> dict[str, str]:
    """The constrained re-ask's regex per template, built at start-up: a max_tokens too small
    for a constrained answer fails here, naming the settings, not in a job."""
    try:
        return {
            name: critique_regex(t.dimensions, max_tokens=settings.critic_max_tokens, score_first=t.score_first)
            for name, t in templates.items()
        }
    except ValueError as exc:
        raise ConfigurationError(
            f"GCR_CRITIC_MAX_TOKENS={settings.critic_max_tokens} with GCR_CRITIC_STRUCTURED_OUTPUTS on: {exc}; "
            "raise GCR_CRITIC_MAX_TOKENS (RationalRewards writes 1-3k tokens)"
        ) from exc


def critique_mode(source_image: ImageInput | None, mode: Mode | None) -> Mode:
    """The mode a critique is judged in: the one asked for, else edit with a source image
    and t2i without; a source image that does not fit the mode is refused."""
    mode = mode or ("edit" if source_image is not None else "t2i")
    problem = source_image_problem(mode, source_image is not None)
    if problem is not None:
        raise InvalidInput(problem, field="source_image")
    return mode


class OpenAICritic:
    """Judge images with RationalRewards (or any OpenAI-compatible vision model) over HTTP.

    One pooled `httpx.AsyncClient` per critic; call `aclose()` when done (or use
    `async with`). `transport` replaces the network, for tests.
    """

    def __init__(
        self,
        settings: SharedSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        templates: dict[str, Template] | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
    ) -> None:
        self.settings = settings
        self.templates = templates if templates is not None else load_templates(settings.critic_templates_dir)
        for name in ("t2i", settings.critic_edit_template):
            if name not in self.templates:
                raise ValueError(f"critic template {name!r} is missing (have: {sorted(self.templates)})")
        self._regexes = _reask_regexes(settings, self.templates) if settings.critic_structured_outputs else {}
        self.backoff_base_s = backoff_base_s
        self._no_metrics = False
        # An attribute, so that a test can watch the waits.
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        headers = {}
        if settings.critic_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.critic_api_key.get_secret_value()}"
        connections = settings.max_inflight_critiques
        self._http = httpx.AsyncClient(
            base_url=settings.critic_base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(settings.critic_timeout_s),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=transport,
        )

    async def __aenter__(self) -> OpenAICritic:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def template_for(self, mode: Mode) -> tuple[Template, str]:
        """The template and served model name that judge `mode`."""
        if mode == "t2i":
            return self.templates["t2i"], self.settings.critic_model
        return self.templates[self.settings.critic_edit_template], self.settings.effective_edit_model

    async def request_body(
        self, instruction: str, image: ImageInput, source_image: ImageInput | None, mode: Mode
    ) -> tuple[Template, dict[str, Any]]:
        """The chat-completions body for one critique in `mode` (images encoded off the event loop)."""
        template, model = self.template_for(mode)
        images = [image] if source_image is None else [source_image, image]
        try:
            messages = await asyncio.to_thread(
                build_messages, template, instruction, images, max_edge=self.settings.critic_max_image_edge
            )
        except ValueError as exc:
            raise InvalidInput(f"cannot prepare the critique: {exc}", field="image") from exc
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": self.settings.critic_temperature,
            "max_tokens": self.settings.critic_max_tokens,
        }
        return template, body

    async def critique(
        self,
        instruction: str,
        image: ImageInput,
        source_image: ImageInput | None = None,
        mode: Mode | None = None,
    ) -> Critique:
        """Judge `image` against `instruction` (and `source_image` for an edit).

        `latency_ms` covers the whole call (retries and a re-ask included);
        `usage` sums the tokens of every answer received.
        """
        started = time.perf_counter()
        template, body = await self.request_body(instruction, image, source_image, critique_mode(source_image, mode))
        answer = await self._complete(body)
        usage = answer.usage
        try:
            return self._parse(answer, template, started, usage)
        except CritiqueUnparseable:
            pass
        if self.settings.critic_structured_outputs:
            body = {**body, "structured_outputs": {"regex": self._regexes[template.name]}}
        answer = await self._complete(body)
        usage = _add_usage(usage, answer.usage)
        try:
            return self._parse(answer, template, started, usage).model_copy(update={"reasked": True})
        except CritiqueUnparseable as exc:
            error = CritiqueUnparseable(f"{exc.message} (after one re-ask)", missing=exc.missing, raw=exc.raw)
            error.usage = usage
            raise error from exc

    def _parse(self, answer: _Answer, template: Template, started: float, usage: dict[str, int] | None) -> Critique:
        if answer.truncated:
            raise CritiqueUnparseable(
                f"critic answer was cut off at max_tokens={self.settings.critic_max_tokens}",
                missing=["end of answer"],
                raw=answer.content,
            )
        return parse_critique(
            answer.content,
            template.dimensions,
            model=answer.model,
            latency_ms=(time.perf_counter() - started) * 1000,
            usage=usage,
        )

    async def _complete(self, body: dict[str, Any]) -> _Answer:
        """POST the chat completion; connection errors, 429 and 5xx are retried (429 after its
        Retry-After), `critic_retries` times, then fail as `CriticUnavailable`."""
        attempts = self.settings.critic_retries + 1
        calls = retrying(
            on=_Retry,
            first_s=self.backoff_base_s,
            cap_s=BACKOFF_CAP_S,
            attempts=attempts,
            wait=self._wait,
            sleep=self._sleep,
        )
        try:
            async for attempt in calls:
                with attempt:
                    return await self._post(body, last=attempt.retry_state.attempt_number == attempts)
        except _Retry as exc:
            raise exc.final from exc.__cause__
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _post(self, body: dict[str, Any], last: bool) -> _Answer:
        """One attempt; `_Retry` carries what to raise if it was the last."""
        attempts = self.settings.critic_retries + 1
        try:
            async with asyncio.timeout(self.settings.critic_timeout_s):
                response = await self._http.post("chat/completions", json=body)
        except _RETRY_ERRORS as exc:
            if last:
                # The address (and any credentials in it) is for the logs, never for clients.
                log.warning("critic at %s unreachable: %r", redacted(self.settings.critic_base_url), exc)
            else:
                CRITIC_RETRIES.labels("connection").inc()
            final = CriticUnavailable(
                f"the critic is unreachable ({type(exc).__name__} after {attempts} attempt(s)); "
                "check that the reward model server (vLLM) is up"
            )
            raise _Retry(final) from exc
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise CriticTimeout(f"critic gave no answer within {self.settings.critic_timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            log.warning("critic request to %s failed: %r", redacted(self.settings.critic_base_url), exc)
            raise CriticUnavailable(f"the critic request failed ({type(exc).__name__})") from exc
        if response.status_code in _RETRY_STATUSES:
            if not last:
                CRITIC_RETRIES.labels(str(response.status_code)).inc()
            final = CriticUnavailable(
                f"critic answered HTTP {response.status_code} after {attempts} attempt(s): {_error_message(response)}"
            )
            raise _Retry(final, response)
        if response.status_code != 200:
            raise _refusal(response.status_code, _error_message(response))
        return _read_answer(response)

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        attempt = state.attempt_number - 1
        if isinstance(error, _Retry) and error.response is not None:
            return self._retry_delay(attempt, error.response)
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        return equal_jitter_s(attempt, self.backoff_base_s, BACKOFF_CAP_S)

    def _retry_delay(self, attempt: int, response: httpx.Response) -> float:
        if response.status_code == 429:
            retry_after = retry_after_s(response)
            if retry_after is not None:
                return min(retry_after, RETRY_AFTER_CAP_S)
        return self._backoff(attempt)

    async def load(self) -> CriticLoad | None:
        """Requests the critic's engine runs and keeps waiting (vLLM's gauges on the server's
        `/metrics`): any waiting, and the critic is past its batch knee. None where the server
        publishes no such gauge (not vLLM); then it is not asked again. Never raises."""
        if self._no_metrics:
            return None
        root = self.settings.critic_base_url.rstrip("/").removesuffix("/v1")
        timeout = min(PROBE_TIMEOUT_S, self.settings.critic_timeout_s)
        try:
            response = await self._http.get(f"{root}/metrics", timeout=timeout)
        except httpx.HTTPError:
            return None
        load = engine_load(response.text) if response.status_code == 200 else None
        if load is None and response.status_code in (200, 404):
            self._no_metrics = True  # it answered, without the gauge: a server that has none
        return load

    async def probe(self) -> dict[str, Any] | bool:
        """`GET {base}/models`: its JSON when the endpoint answers 200, else False. Never raises."""
        try:
            timeout = min(PROBE_TIMEOUT_S, self.settings.critic_timeout_s)
            response = await self._http.get("models", timeout=timeout)
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        try:
            payload = response.json()
        except ValueError:
            return True
        return payload if isinstance(payload, dict) else True


# What vLLM answers (400) for a request past the limits it was started with, and what moves each.
_LIMITS = (
    (
        re.compile(r"maximum context length|exceeds the model's|input length", re.IGNORECASE),
        "the critique is longer than the critic's context (the instruction, the template and the images): "
        "raise vLLM's --max-model-len, or lower GCR_CRITIC_MAX_IMAGE_EDGE or GCR_CRITIC_MAX_TOKENS "
        "(the answer's room counts too)",
    ),
    (
        re.compile(r"at most \d+ image|image\(s\) may be provided|limit_mm_per_prompt", re.IGNORECASE),
        "the critique sends more images than the critic takes (an edit sends two: source and result): "
        "raise vLLM's --limit-mm-per-prompt",
    ),
)


def _refusal(status: int, message: str) -> CriticError:
    """The error of a 4xx answer: `CriticRefused` naming the limit when it is one we know."""
    for pattern, cause in _LIMITS:
        if pattern.search(message):
            return CriticRefused(
                f"the critic refused the critique (HTTP {status}): {cause}. The server said: {message}"
            )
    return CriticError(f"critic refused the request (HTTP {status}): {message}")


def engine_load(metrics_text: str) -> CriticLoad | None:
    """vLLM's `vllm:num_requests_running` and `vllm:num_requests_waiting`, each summed over its
    series (one per served model); None when the text has no waiting gauge."""
    totals: dict[str, float] = {}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            if math.isfinite(value):  # NaN would break `int` below, and `load` never raises
                totals[name] = totals.get(name, 0.0) + value
    if "vllm:num_requests_waiting" not in totals:
        return None
    return CriticLoad(int(totals.get("vllm:num_requests_running", 0)), int(totals["vllm:num_requests_waiting"]))


def _read_answer(response: httpx.Response) -> _Answer:
    try:
        payload = response.json()
        choice = payload["choices"][0]
        content = choice["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise CriticError(f"critic sent a malformed chat completion: {exc!r}") from exc
    usage = payload.get("usage")
    clean_usage = (
        {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
        if isinstance(usage, dict)
        else None
    )
    return _Answer(
        content=str(content),
        model=str(payload.get("model") or ""),
        usage=clean_usage,
        truncated=choice.get("finish_reason") == "length",
    )


def _add_usage(first: dict[str, int] | None, second: dict[str, int] | None) -> dict[str, int] | None:
    if first is None or second is None:
        return second or first
    return {key: first.get(key, 0) + second.get(key, 0) for key in first.keys() | second.keys()}


class _Retry(Exception):
    """An attempt that may be retried; `final` is what the caller gets if it was the last."""

    def __init__(self, final: CriticError, response: httpx.Response | None = None) -> None:
        super().__init__(final.message)
        self.final = final
        self.response = response


def redacted(url: str) -> str:
    """`url` without its user:password part (logs keep the host, never the credentials)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:200]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(payload, dict) and payload.get("message"):  # vLLM before 0.6 put it at the top
        return str(payload["message"])
    return response.text[:200]
