"""Critic templates: byte-exact training prompts, messages the OpenAI API accepts, image handling."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import (
    ChatCompletionContentPartImageParam,
    ChatCompletionContentPartParam,
    ChatCompletionContentPartTextParam,
    ChatCompletionMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from PIL import Image, PngImagePlugin
from pydantic import TypeAdapter

from service.critic.client import OpenAICritic, critique_mode
from service.critic.templates import (
    Template,
    build_messages,
    encode_image,
    load_templates,
    packaged_templates_dir,
)
from service.errors import TemplateError
from service.settings import Settings

# A copy kept beside the tests (the shared reference lives outside the checkout).
REFERENCE = Path(__file__).resolve().parent / "reference_rationalrewards"
PACKAGED_FROM_REFERENCE = {
    "t2i.system.txt": "t2i_pointwise.system.txt",
    "t2i.user.txt": "t2i_pointwise.user.txt",
    "edit.system.txt": "edit_pointwise.system.txt",
    "edit.user.txt": "edit_pointwise.user.txt",
    "edit_tuning.user.txt": "edit_pointwise.test_time_tuning_variant.user.txt",
}
GCR_CHUNKS = {"gcr:round": "2", "gcr:candidate": "1", "gcr:seed": "42", "gcr:prompt": "a {red} fox <image>"}


def png_bytes(size: tuple[int, int], chunks: dict[str, str] | None = None, color: str = "red") -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (chunks or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def decode_data_uri(url: str) -> tuple[str, bytes]:
    header, payload = url.split(",", 1)
    assert header.startswith("data:") and header.endswith(";base64")
    return header[5:-7], base64.b64decode(payload, validate=True)


def image_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [part for part in messages[-1]["content"] if part["type"] == "image_url"]


def validate_openai_message(message: dict[str, Any]) -> None:
    # TypedDicts accept unknown keys and pydantic validates `Iterable` content lazily;
    # so check the keys ourselves and validate the parts as a list.
    TypeAdapter(ChatCompletionMessageParam).validate_python(message)
    kind = ChatCompletionSystemMessageParam if message["role"] == "system" else ChatCompletionUserMessageParam
    assert set(message) <= kind.__required_keys__ | kind.__optional_keys__
    if isinstance(message["content"], list):
        TypeAdapter(list[ChatCompletionContentPartParam]).validate_python(message["content"])
        for part in message["content"]:
            part_type = (
                ChatCompletionContentPartImageParam
                if part["type"] == "image_url"
                else ChatCompletionContentPartTextParam
            )
            assert set(part) <= part_type.__required_keys__ | part_type.__optional_keys__


# --- the packaged files ----------------------------------------------------------------


@pytest.mark.parametrize(("packaged", "reference"), sorted(PACKAGED_FROM_REFERENCE.items()))
def test_packaged_template_equals_reference_byte_for_byte(packaged: str, reference: str) -> None:
    assert (packaged_templates_dir() / packaged).read_bytes() == (REFERENCE / reference).read_bytes()


def test_loaded_texts_are_the_file_bytes() -> None:
    templates = load_templates()
    folder = packaged_templates_dir()
    for name, template in templates.items():
        assert template.user.encode() == (folder / f"{name}.user.txt").read_bytes()
        if template.system is not None:
            assert template.system.encode() == (folder / f"{name}.system.txt").read_bytes()


def test_manifests_declare_modes_and_dimensions() -> None:
    templates = load_templates()
    assert set(templates) == {"t2i", "edit", "edit_tuning"}
    assert templates["t2i"].dimensions == (
        ("text_faithfulness", "Text Faithfulness"),
        ("physical_quality", "Physical and Visual Quality"),
        ("text_rendering", "Text Rendering"),
    )
    edit_dims = (
        ("text_faithfulness", "Text Faithfulness"),
        ("image_faithfulness", "Image Faithfulness"),
        ("physical_quality", "Physical and Visual Quality"),
        ("text_rendering", "Text Rendering"),
    )
    assert templates["edit"].dimensions == edit_dims == templates["edit_tuning"].dimensions
    assert (templates["t2i"].mode, templates["edit"].mode, templates["edit_tuning"].mode) == (
        "t2i",
        "edit",
        "edit",
    )
    assert templates["edit_tuning"].system is None and templates["edit_tuning"].score_first
    assert not templates["edit"].score_first
    # Every declared label is the one the template's own format section asks the model to write.
    for template in templates.values():
        for number, (_, label) in enumerate(template.dimensions, start=1):
            assert f"\n{number}. {label}:\n" in template.user


def test_user_folder_replaces_the_packaged_one(tmp_path: Path) -> None:
    (tmp_path / "t2i.user.txt").write_text("Judge {request}: <image>\n", encoding="utf-8")
    manifest = {
        "mode": "t2i",
        "user": "t2i.user.txt",
        "dimensions": [{"key": "text_faithfulness", "label": "TF"}],
    }
    (tmp_path / "t2i.json").write_text(json.dumps(manifest), encoding="utf-8")
    templates = load_templates(tmp_path)
    assert list(templates) == ["t2i"]
    assert templates["t2i"].system is None
    assert templates["t2i"].user == "Judge {request}: <image>\n"


@pytest.mark.parametrize(
    ("user_text", "manifest_update", "message"),
    [
        ("no slot {request}", {}, "slot"),
        ("<image> no placeholder", {}, "{request}"),
        ("{request} <image>", {"dimensions": [{"key": "beauty", "label": "Beauty"}]}, "unknown dimension"),
        ("{request} <image>", {"mode": "video"}, "mode"),
        ("{request} <image>", {"system": "missing.txt"}, "cannot read"),
    ],
)
def test_bad_user_templates_fail_at_load(
    tmp_path: Path, user_text: str, manifest_update: dict[str, Any], message: str
) -> None:
    (tmp_path / "t.user.txt").write_text(user_text, encoding="utf-8")
    manifest = {
        "mode": "t2i",
        "user": "t.user.txt",
        "dimensions": [{"key": "text_faithfulness", "label": "TF"}],
    }
    (tmp_path / "t.json").write_text(json.dumps({**manifest, **manifest_update}), encoding="utf-8")
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_templates(tmp_path)


def test_client_refuses_a_folder_without_the_templates_it_needs(tmp_path: Path) -> None:
    for name in ("t2i.json", "t2i.system.txt", "t2i.user.txt"):
        shutil.copy(packaged_templates_dir() / name, tmp_path / name)
    with pytest.raises(ValueError, match="'edit' is missing"):
        OpenAICritic(Settings(critic_templates_dir=tmp_path, critic_edit_template="edit"))


# --- messages ---------------------------------------------------------------------------


def test_t2i_messages_interleave_the_image_and_fill_the_request() -> None:
    template = load_templates()["t2i"]
    image = png_bytes((64, 32), GCR_CHUNKS)
    instruction = 'a sign that says "{hello}" <image>'
    messages = build_messages(template, instruction, [image], max_edge=1024)
    for message in messages:
        validate_openai_message(message)
    assert messages[0] == {"role": "system", "content": template.system}
    parts = messages[1]["content"]
    assert [part["type"] for part in parts] == ["text", "image_url", "text"]
    before, after = template.user.split("<image>")
    assert parts[0]["text"] == before.replace("{request}", instruction)
    assert parts[2]["text"] == after
    assert parts[0]["text"].startswith(f"User Instruction: {instruction}\n")
    mime, payload = decode_data_uri(parts[1]["image_url"]["url"])
    assert (mime, payload) == ("image/png", image)  # within the bound: the very same bytes


@pytest.mark.parametrize("name", ["edit", "edit_tuning"])
def test_edit_messages_put_the_source_first(name: str) -> None:
    template = load_templates()[name]
    source, edited = png_bytes((40, 40), color="blue"), png_bytes((40, 40), GCR_CHUNKS, color="green")
    messages = build_messages(template, "make it green", [source, edited], max_edge=1024)
    for message in messages:
        validate_openai_message(message)
    assert [m["role"] for m in messages] == (["user"] if name == "edit_tuning" else ["system", "user"])
    parts = messages[-1]["content"]
    assert [part["type"] for part in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[0]["text"].endswith("1. Source Image ")
    assert parts[2]["text"] == "\n2. Edited Image "
    urls = [part["image_url"]["url"] for part in image_parts(messages)]
    assert [decode_data_uri(url)[1] for url in urls] == [source, edited]
    text = "".join(part["text"] for part in parts if part["type"] == "text")
    assert text == template.user.replace("{request}", "make it green").replace("<image>", "")


def test_wrong_image_count_is_refused() -> None:
    template = load_templates()["edit"]
    with pytest.raises(ValueError, match="takes 2 image"):
        build_messages(template, "x", [png_bytes((8, 8))], max_edge=64)


async def test_request_body_validates_as_openai_create_params() -> None:
    settings = Settings(critic_model="t2i-model", critic_edit_model="edit-model", critic_max_tokens=3000)
    critic = OpenAICritic(settings)
    try:
        image = png_bytes((32, 32))
        for source, model in ((None, "t2i-model"), (png_bytes((16, 16)), "edit-model")):
            _, body = await critic.request_body("a fox", image, source, critique_mode(source, None))
            TypeAdapter(CompletionCreateParamsNonStreaming).validate_python(body)
            keys = CompletionCreateParamsNonStreaming.__required_keys__
            keys |= CompletionCreateParamsNonStreaming.__optional_keys__
            assert set(body) <= keys
            for message in body["messages"]:
                validate_openai_message(message)
            assert body["model"] == model
            assert body["temperature"] == 0.1
            assert body["max_tokens"] == 3000
            assert len(image_parts(body["messages"])) == (1 if source is None else 2)
    finally:
        await critic.aclose()


# --- images ---------------------------------------------------------------------------


def test_downscale_respects_the_bound_keeps_aspect_and_text_chunks() -> None:
    image = png_bytes((1500, 600), GCR_CHUNKS)
    messages = build_messages(load_templates()["t2i"], "x", [image], max_edge=500)
    mime, payload = decode_data_uri(image_parts(messages)[0]["image_url"]["url"])
    assert mime == "image/png"
    with Image.open(io.BytesIO(payload)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.size == (500, 200)
        assert {k: decoded.text[k] for k in GCR_CHUNKS} == GCR_CHUNKS  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_pass_through_within_the_bound_and_become_png_above(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 400), "white").save(buffer, format=fmt)
    source = buffer.getvalue()
    payload, mime = encode_image(source, 400)
    assert (payload, mime) == (source, f"image/{fmt.lower()}")
    payload, mime = encode_image(source, 100)
    assert mime == "image/png"
    with Image.open(io.BytesIO(payload)) as decoded:
        assert (decoded.format, decoded.size) == ("PNG", (75, 100))


def test_pil_images_are_encoded_with_their_text_chunks() -> None:
    with Image.open(io.BytesIO(png_bytes((20, 10), GCR_CHUNKS))) as opened:
        opened.load()
        payload, mime = encode_image(opened, 1024)
    with Image.open(io.BytesIO(payload)) as decoded:
        assert mime == "image/png" and decoded.size == (20, 10)
        assert decoded.text["gcr:round"] == "2"  # type: ignore[attr-defined]
    fresh = Image.new("RGBA", (3000, 10))
    fresh.info["gcr:candidate"] = "3"
    payload, _ = encode_image(fresh, 300)
    with Image.open(io.BytesIO(payload)) as decoded:
        assert decoded.size == (300, 1)
        assert decoded.mode == "RGBA"
        assert decoded.text == {"gcr:candidate": "3"}  # type: ignore[attr-defined]


def test_palette_images_are_converted_before_resizing() -> None:
    buffer = io.BytesIO()
    Image.new("P", (200, 100)).save(buffer, format="GIF")
    payload, mime = encode_image(buffer.getvalue(), 1024)  # GIF is not passed through
    with Image.open(io.BytesIO(payload)) as decoded:
        assert (mime, decoded.format, decoded.mode, decoded.size) == ("image/png", "PNG", "RGB", (200, 100))


def test_undecodable_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="not a decodable image"):
        encode_image(b"not an image", 64)


def test_template_is_immutable() -> None:
    template = load_templates()["t2i"]
    assert isinstance(template, Template)
    with pytest.raises(AttributeError):
        template.user = "x"  # type: ignore[misc]
