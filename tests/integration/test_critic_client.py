"""The OpenAI-protocol critic client against the stand-in critic over real HTTP on loopback.

One stand-in serves the module; each test installs its own config through
`POST /standin/config` (which also resets the counters) and reads what the server
saw from `GET /standin/stats`.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletion
from PIL import Image, PngImagePlugin

from service.critic import client as client_module
from service.critic.client import CriticLoad, OpenAICritic, engine_load
from service.critic.parser import critique_regex, parse_critique
from service.critic.templates import data_uri, load_templates
from service.errors import CriticError, CriticTimeout, CriticUnavailable, CritiqueUnparseable, InvalidInput
from service.servers import free_port
from service.settings import Settings
from workers.critics.standin import GARBAGE_ANSWER, running_standin
from workers.critics.standin_config import StandinConfig

TEMPLATES = load_templates()


def png(round_index: int | None = None, candidate: int | None = None, size: tuple[int, int] = (48, 32)) -> bytes:
    info = PngImagePlugin.PngInfo()
    if round_index is not None:
        info.add_text("gcr:round", str(round_index))
    if candidate is not None:
        info.add_text("gcr:candidate", str(candidate))
    buffer = io.BytesIO()
    Image.new("RGB", size, (180, 40, 20)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class StandinHandle:
    """A running stand-in: its base URL and its control endpoints."""

    def __init__(self, url: str, control: httpx.Client) -> None:
        self.url = url
        self._control = control
        self._base = url.removesuffix("/v1")

    def configure(self, config: dict[str, Any], *, status: int = 200) -> None:
        response = self._control.post(f"{self._base}/standin/config", json=config)
        assert response.status_code == status, response.text

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._control.get(f"{self._base}/standin/stats").json()
        return result

    def post(self, path: str, body: Any) -> httpx.Response:
        return self._control.post(f"{self.url}{path}", json=body)


@pytest.fixture(scope="module")
def standin() -> Iterator[StandinHandle]:
    with running_standin(StandinConfig()) as url, httpx.Client() as control:
        yield StandinHandle(url, control)


def settings_for(url: str, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "critic_base_url": url,
        "critic_model": "rr-t2i",
        "critic_edit_model": "rr-edit",
        "critic_timeout_s": 10.0,
        "critic_retries": 3,
        "critic_max_tokens": 2048,
        "critic_temperature": 0.1,
        "critic_structured_outputs": False,
        "critic_templates_dir": None,
        "critic_edit_template": "edit",
        "critic_api_key": None,
        "critic_max_image_edge": 1024,
    }
    return Settings(**{**fields, **overrides})


# --- success ---------------------------------------------------------------------------


async def test_t2i_critique(standin: StandinHandle) -> None:
    standin.configure({"rules": [{"instruction": "red fox", "rounds": [0.4, [0.6, 0.9]]}]})
    async with OpenAICritic(settings_for(standin.url), backoff_base_s=0.01) as critic:
        critique = await critic.critique("a red fox in the snow", png(round_index=1, candidate=1))
    assert critique.overall == pytest.approx(0.9)
    assert list(critique.dimensions) == ["text_faithfulness", "physical_quality", "text_rendering"]
    assert critique.score("text_rendering") is None
    assert critique.refined_request == "a red fox in the snow [refined r1 c1]"
    assert critique.model == "gcr-standin-critic"
    assert "STAND-IN" in critique.summary
    assert critique.latency_ms > 0
    assert critique.usage is not None and critique.usage["total_tokens"] > critique.usage["completion_tokens"] > 0
    seen = standin.stats()
    assert seen["requests"] == 1 and seen["by_instruction"] == {"a red fox in the snow": 1}
    body = seen["last_request"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("rr-t2i", 0.1, 2048)
    assert "structured_outputs" not in body


async def test_downscaled_image_keeps_its_round_and_candidate(standin: StandinHandle) -> None:
    # Above the bound the client re-encodes the PNG; the stand-in must still see its text chunks.
    standin.configure({"rules": [{"instruction": "fox", "rounds": [0.1, [0.2, 0.3, 0.7]]}]})
    settings = settings_for(standin.url, critic_max_image_edge=256)
    async with OpenAICritic(settings, backoff_base_s=0.01) as critic:
        critique = await critic.critique("a fox", png(round_index=1, candidate=2, size=(1200, 600)))
    assert critique.refined_request == "a fox [refined r1 c2]"
    assert critique.overall == pytest.approx(0.7)


@pytest.mark.parametrize("template", ["edit", "edit_tuning"])
async def test_edit_critique(standin: StandinHandle, template: str) -> None:
    standin.configure(
        {"rules": [{"instruction": "blue", "rounds": [{"overall": 0.7, "scores": {"text_rendering": 2.5}}]}]},
    )
    settings = settings_for(standin.url, critic_edit_template=template)
    async with OpenAICritic(settings, backoff_base_s=0.01) as critic:
        critique = await critic.critique("paint the door blue", png(0, 0), source_image=png(size=(2000, 1000)))
    assert list(critique.dimensions) == [
        "text_faithfulness",
        "image_faithfulness",
        "physical_quality",
        "text_rendering",
    ]
    assert critique.score("image_faithfulness") == pytest.approx(3.1)
    assert critique.score("text_rendering") == 2.5
    assert critique.refined_request == "paint the door blue [refined r0 c0]"
    # The stand-in answers in the order the template's format section asks for.
    assert (critique.raw.index("## Score:") < critique.raw.index("## Justification:")) == (template == "edit_tuning")
    body = standin.stats()["last_request"]
    assert body["model"] == "rr-edit"
    assert [m["role"] for m in body["messages"]] == (["user"] if template == "edit_tuning" else ["system", "user"])
    images = [p for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
    assert len(images) == 2


async def test_mode_and_image_arguments_are_checked(standin: StandinHandle) -> None:
    standin.configure({})
    async with OpenAICritic(settings_for(standin.url)) as critic:
        with pytest.raises(InvalidInput):
            await critic.critique("x", png(), mode="edit")
        with pytest.raises(InvalidInput):
            await critic.critique("x", png(), source_image=png(), mode="t2i")
        with pytest.raises(InvalidInput):
            await critic.critique("x", b"not an image")
    assert standin.stats()["requests"] == 0


# --- retries and errors --------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_retries_then_succeeds(standin: StandinHandle, status: int) -> None:
    standin.configure({"faults": [{"kind": "status", "status": status, "times": 2}]})
    async with OpenAICritic(settings_for(standin.url, critic_retries=2), backoff_base_s=0.01) as critic:
        critique = await critic.critique("a cat", png())
    assert critique.overall == pytest.approx(0.5)
    seen = standin.stats()
    assert (seen["requests"], seen["faults_served"]) == (3, 2)


async def test_429_honours_retry_after_not_backoff(standin: StandinHandle) -> None:
    # The stand-in's 429 says Retry-After: 0; a 5 s backoff would blow the budget below.
    standin.configure({"faults": [{"kind": "status", "status": 429, "times": 2}]})
    started = time.monotonic()
    async with OpenAICritic(settings_for(standin.url), backoff_base_s=5.0) as critic:
        await critic.critique("a cat", png())
    assert time.monotonic() - started < 2.5


async def test_exhausted_retries_are_unavailable(standin: StandinHandle) -> None:
    standin.configure({"faults": [{"kind": "status", "status": 503, "times": 100}]})
    async with OpenAICritic(settings_for(standin.url, critic_retries=2), backoff_base_s=0.01) as critic:
        with pytest.raises(CriticUnavailable, match="HTTP 503 after 3 attempt"):
            await critic.critique("a cat", png())
    assert standin.stats()["requests"] == 3


async def test_client_error_is_not_retried(standin: StandinHandle) -> None:
    standin.configure({"faults": [{"kind": "status", "status": 404, "times": 100}]})
    async with OpenAICritic(settings_for(standin.url), backoff_base_s=0.01) as critic:
        with pytest.raises(CriticError, match="HTTP 404") as info:
            await critic.critique("a cat", png())
    assert type(info.value) is CriticError
    assert standin.stats()["requests"] == 1


async def test_timeout(standin: StandinHandle) -> None:
    standin.configure({"faults": [{"kind": "timeout", "timeout_s": 5, "times": 1}]})
    started = time.monotonic()
    async with OpenAICritic(settings_for(standin.url, critic_timeout_s=0.3), backoff_base_s=0.01) as critic:
        with pytest.raises(CriticTimeout):
            await critic.critique("a cat", png())
    assert time.monotonic() - started < 3
    assert standin.stats()["requests"] == 1  # a timeout spent the budget: not retried


async def test_connection_refused_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with OpenAICritic(settings_for(url, critic_retries=1), backoff_base_s=0.01) as critic:
        with pytest.raises(CriticUnavailable, match="unreachable"):
            await critic.critique("a cat", png())
        assert await critic.probe() is False


# --- unparseable answers -------------------------------------------------------------------


async def test_unparseable_once_is_asked_again(standin: StandinHandle) -> None:
    standin.configure({"faults": [{"kind": "garbage", "times": 1}]})
    async with OpenAICritic(settings_for(standin.url), backoff_base_s=0.01) as critic:
        critique = await critic.critique("a cat", png())
    assert critique.overall == pytest.approx(0.5)
    assert standin.stats()["requests"] == 2
    assert "structured_outputs" not in standin.stats()["last_request"]
    assert critique.usage is not None and critique.usage["completion_tokens"] > len(GARBAGE_ANSWER) // 4


async def test_unparseable_twice_raises(standin: StandinHandle) -> None:
    standin.configure({"faults": [{"kind": "garbage", "times": 2}]})
    async with OpenAICritic(settings_for(standin.url), backoff_base_s=0.01) as critic:
        with pytest.raises(CritiqueUnparseable, match="after one re-ask") as info:
            await critic.critique("a cat", png())
    assert info.value.raw == GARBAGE_ANSWER
    assert "score: text_faithfulness" in info.value.missing
    assert standin.stats()["requests"] == 2


@pytest.mark.parametrize("template", ["t2i", "edit_tuning"])
async def test_structured_outputs_constrain_the_reask(standin: StandinHandle, template: str) -> None:
    standin.configure({"faults": [{"kind": "garbage", "times": 1, "instruction": "cat"}]})
    settings = settings_for(standin.url, critic_structured_outputs=True, critic_edit_template="edit_tuning")
    source = png() if template != "t2i" else None
    async with OpenAICritic(settings, backoff_base_s=0.01) as critic:
        await critic.critique("a dog", png(), source_image=source)
        assert "structured_outputs" not in standin.stats()["last_request"]  # only a re-ask is constrained
        await critic.critique("a cat", png(), source_image=source)
    body = standin.stats()["last_request"]
    chosen = TEMPLATES[template]
    expected = critique_regex(chosen.dimensions, max_tokens=settings.critic_max_tokens, score_first=chosen.score_first)
    assert body["structured_outputs"] == {"regex": expected}
    assert "guided_regex" not in body
    assert standin.stats()["by_instruction"] == {"a dog": 1, "a cat": 2}


# --- probe -----------------------------------------------------------------------------------


async def test_probe(standin: StandinHandle) -> None:
    async with OpenAICritic(settings_for(standin.url)) as critic:
        result = await critic.probe()
    assert isinstance(result, dict)
    assert [model["id"] for model in result["data"]] == ["gcr-standin-critic"]


# --- cases the stand-in cannot produce: a transport at the client's seam ----------------------


def _completion(content: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "served",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


GOOD_ANSWER = (
    "# Detailed Judgement\n1. Text Faithfulness:\n## Justification: ok\n## Score: 3.0\n"
    "2. Physical and Visual Quality:\n## Justification: ok\n## Score: 4.0\n"
    "# User Request Refinement:\n## Refined Request: a better cat\n"
)


async def test_answer_cut_at_max_tokens_is_reasked_then_refused() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=_completion(GOOD_ANSWER, finish_reason="length"))

    settings = settings_for("http://critic.test/v1", critic_api_key="sekret")
    async with OpenAICritic(settings, transport=httpx.MockTransport(handler)) as critic:
        with pytest.raises(CritiqueUnparseable, match="cut off at max_tokens=2048") as info:
            await critic.critique("a cat", png())
    assert info.value.raw == GOOD_ANSWER
    assert len(seen) == 2
    assert str(seen[0].url) == "http://critic.test/v1/chat/completions"
    assert seen[0].headers["Authorization"] == "Bearer sekret"


async def test_retry_after_is_capped_and_dates_are_read() -> None:
    answers = [
        httpx.Response(429, headers={"Retry-After": "3600"}, json={"error": {"message": "slow down"}}),
        httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
        httpx.Response(200, json=_completion(GOOD_ANSWER)),
    ]
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    settings = settings_for("http://critic.test/v1", critic_retries=2)
    async with OpenAICritic(settings, transport=httpx.MockTransport(lambda _: answers.pop(0))) as critic:
        critic._sleep = record
        critique = await critic.critique("a cat", png())
    assert waits == [client_module.RETRY_AFTER_CAP_S, 0.0]
    assert critique.overall == pytest.approx(5 / 6)
    assert (critique.refined_request, critique.model) == ("a better cat", "served")


async def test_malformed_completion_is_a_critic_error() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json={"choices": []}))
    async with OpenAICritic(settings_for("http://critic.test/v1"), transport=transport) as critic:
        with pytest.raises(CriticError, match="malformed"):
            await critic.critique("a cat", png())


def test_standin_answers_validate_as_openai_completions(standin: StandinHandle) -> None:
    standin.configure({})
    content = [
        {"type": "text", "text": "User Instruction: x\n"},
        {"type": "image_url", "image_url": {"url": data_uri(png())}},
    ]
    body = {"model": "anything", "messages": [{"role": "user", "content": content}]}
    response = standin.post("/chat/completions", body)
    assert response.status_code == 200
    completion = ChatCompletion.model_validate(response.json())
    assert completion.model == "gcr-standin-critic"
    assert completion.usage is not None and completion.usage.total_tokens > 0


# --- the stand-in's own contract (others' tests rely on it) --------------------------------


def _chat_body(*images: bytes, instruction: str = "a cat") -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": f"User Instruction: {instruction}\n"}]
    content += [{"type": "image_url", "image_url": {"url": data_uri(image)}} for image in images]
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("mutate", "param"),
    [
        (lambda b: b.pop("model"), "model"),
        (lambda b: b.pop("messages"), "messages"),
        (lambda b: b.update(messages=[]), "messages"),
        (
            lambda b: b["messages"][0]["content"][1]["image_url"].update(url="http://example.com/a.png"),
            "content[1]",
        ),
        (
            lambda b: b["messages"][0]["content"][1]["image_url"].update(url="data:image/png;base64,@@@"),
            "content[1]",
        ),
        (
            lambda b: b["messages"][0]["content"][1]["image_url"].update(url=data_uri(b"no png", "image/png")),
            "content",
        ),
        (lambda b: b["messages"][0]["content"].pop(1), "messages"),
        (lambda b: b["messages"][0]["content"].extend([b["messages"][0]["content"][1]] * 2), "messages"),
    ],
)
def test_standin_refuses_what_vllm_would(standin: StandinHandle, mutate: Any, param: str) -> None:
    standin.configure({})
    body = _chat_body(png())
    mutate(body)
    response = standin.post("/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert param in (error["param"] or "")
    assert standin.stats()["by_instruction"] == {}


def test_standin_rules_by_round_and_candidate(standin: StandinHandle) -> None:
    rules = [
        {"instruction": "fox", "rounds": [0.2, [0.4, 0.6, 0.8]]},
        {"instruction": "sign", "rounds": [{"scores": {"text_faithfulness": 5.0, "text_rendering": 1.5}}]},
    ]
    standin.configure({"default": 0.1, "rules": rules})
    cases = [
        ("a fox", png(), 0.2),
        ("a fox", png(0, 2), 0.2),
        ("a fox", png(1, 0), 0.4),
        ("a fox", png(1, 4), 0.6),  # candidate modulo the list
        ("a fox", png(7, 2), 0.8),  # the last round entry repeats
        ("a dog", png(3, 3), 0.1),  # no rule: the default
    ]
    for instruction, image, overall in cases:
        answer = standin.post("/chat/completions", _chat_body(image, instruction=instruction)).json()
        content = answer["choices"][0]["message"]["content"]
        parsed = parse_critique(content, TEMPLATES["t2i"].dimensions)
        assert parsed.overall == pytest.approx(overall, abs=1e-9), (instruction, overall)
    answer = standin.post("/chat/completions", _chat_body(png(), instruction="a sign")).json()
    parsed = parse_critique(answer["choices"][0]["message"]["content"], TEMPLATES["t2i"].dimensions)
    # Unnamed dimensions take 1 + 3 * overall (0.5 by default); 5.0 is written and clamped by the parser.
    assert {k: v.score for k, v in parsed.dimensions.items()} == {
        "text_faithfulness": 4.0,
        "physical_quality": 2.5,
        "text_rendering": 1.5,
    }
    assert parsed.dimensions["text_faithfulness"].clamped
    assert standin.stats()["by_instruction"] == {"a fox": 5, "a dog": 1, "a sign": 1}


def test_standin_without_refinement_and_with_latency(standin: StandinHandle) -> None:
    standin.configure({"latency_s": 0.3, "rules": [{"instruction": "done", "rounds": [0.9], "refine": False}]})
    started = time.monotonic()
    answer = standin.post("/chat/completions", _chat_body(png(), png(), instruction="done")).json()
    assert time.monotonic() - started >= 0.3
    content = answer["choices"][0]["message"]["content"]
    assert "## Refined Request:" not in content
    parsed = parse_critique(content, TEMPLATES["edit"].dimensions)
    assert parsed.refined_request is None
    assert parsed.score("image_faithfulness") == pytest.approx(3.7)


def test_standin_answers_match_the_constrained_format(standin: StandinHandle) -> None:
    standin.configure({})
    for images, name in (((png(),), "t2i"), ((png(), png()), "edit")):
        answer = standin.post("/chat/completions", _chat_body(*images)).json()
        regex = critique_regex(TEMPLATES[name].dimensions, max_tokens=2048)
        assert re.fullmatch(regex, answer["choices"][0]["message"]["content"])


def test_standin_faults_filter_by_instruction_and_count_down(standin: StandinHandle) -> None:
    standin.configure({"faults": [{"kind": "status", "status": 429, "times": 1, "instruction": "cat"}]})
    assert standin.post("/chat/completions", _chat_body(png(), instruction="a dog")).status_code == 200
    first = standin.post("/chat/completions", _chat_body(png(), instruction="a cat"))
    assert (first.status_code, first.headers["Retry-After"]) == (429, "0")
    assert first.json()["error"]["code"] == 429
    assert standin.post("/chat/completions", _chat_body(png(), instruction="a cat")).status_code == 200
    seen = standin.stats()
    assert (seen["requests"], seen["faults_served"]) == (3, 1)
    assert seen["last_request"]["messages"][0]["content"][1]["image_url"]["url"].endswith("chars)")


def test_standin_config_is_validated_and_resets_counters(standin: StandinHandle) -> None:
    standin.configure({})
    standin.post("/chat/completions", _chat_body(png()))
    assert standin.stats()["requests"] == 1
    standin.configure({"rules": [{"instruction": "x", "rounds": []}]}, status=422)
    standin.configure({"default": 2.0}, status=422)
    standin.configure({"faults": [{"kind": "explode"}]}, status=422)
    assert standin.stats()["requests"] == 1  # a refused config changes nothing
    standin.configure({"model": "other-name"})
    assert standin.stats() == {
        "requests": 0,
        "by_instruction": {},
        "faults_served": 0,
        "last_request": None,
        "judged": [],
    }
    answer = standin.post("/chat/completions", _chat_body(png())).json()
    assert answer["model"] == "other-name"


def test_vllms_load_gauges_summed_over_models_and_nan_skipped() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="a"} 2.0\n'
        'vllm:num_requests_running{model_name="b"} 1.0\n'
        'vllm:num_requests_waiting{model_name="a"} NaN\n'
        'vllm:num_requests_waiting{model_name="b"} 3.0\n'
    )
    assert engine_load(text) == CriticLoad(running=3, waiting=3)
    assert engine_load("process_cpu_seconds_total 1.5\n") is None  # not vLLM: no gauge
