"""Critic prompt templates and the chat `messages` built from them.

A template is a pair of text files (system, optional; user) plus a manifest
`<name>.json` that says which mode it serves and which dimensions, in order, the
model writes under which header label::

    {"mode": "edit", "system": "edit.system.txt", "user": "edit.user.txt",
     "score_first": false,
     "dimensions": [{"key": "text_faithfulness", "label": "Text Faithfulness"}, ...]}

The packaged templates are the RationalRewards training prompts, byte for byte
(shared/reference/rationalrewards). `SharedSettings.critic_templates_dir` names a folder
with the same layout that replaces the packaged one as a whole, so a folder that
lacks a template the worker needs fails at start-up rather than silently mixing
our prompts with yours.

In the user text `<image>` marks where an image goes and `{request}` where the
instruction goes; `{request}` is replaced with `str.replace` because the text
holds other braces (the rubric's JSON-like brackets).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gcr.types import DIMENSIONS, Mode
from service.errors import TemplateError

IMAGE_PLACEHOLDER = "<image>"
REQUEST_PLACEHOLDER = "{request}"
IMAGE_SLOTS: dict[str, int] = {"t2i": 1, "edit": 2}

ImageInput = bytes | Image.Image
"""PNG, JPEG or WebP bytes, or a decoded PIL image."""

# Formats a vision server decodes as they are; anything else is re-encoded as PNG.
_PASS_THROUGH_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class _Dimension(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    label: str = Field(min_length=1)

    @field_validator("key")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DIMENSIONS:
            raise ValueError(f"unknown dimension {value!r}; known: {list(DIMENSIONS)}")
        return value


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["t2i", "edit"]
    user: str
    system: str | None = None
    score_first: bool = False
    dimensions: list[_Dimension] = Field(min_length=1)


@dataclass(frozen=True)
class Template:
    """One critic prompt: texts, the mode it judges and the dimensions it asks for."""

    name: str
    mode: Mode
    dimensions: tuple[tuple[str, str], ...]
    """(key, header label) in the order the model writes them."""
    user: str
    system: str | None = None
    score_first: bool = False
    """The answer format puts `## Score:` before `## Justification:` (the tuning variant)."""

    @property
    def image_slots(self) -> int:
        return self.user.count(IMAGE_PLACEHOLDER)


def packaged_templates_dir() -> Path:
    """The folder of the templates shipped with the package."""
    return Path(str(resources.files("service.critic") / "templates"))


def load_templates(directory: Path | None = None) -> dict[str, Template]:
    """Load every `<name>.json` manifest of `directory` (default: the packaged folder)."""
    folder = directory if directory is not None else packaged_templates_dir()
    if not folder.is_dir():
        raise TemplateError(f"critic templates folder {folder} does not exist")
    templates = {path.stem: _load_one(folder, path) for path in sorted(folder.glob("*.json"))}
    if not templates:
        raise TemplateError(f"critic templates folder {folder} holds no <name>.json manifest")
    return templates


def _load_one(folder: Path, manifest_path: Path) -> Template:
    try:
        manifest = _Manifest.model_validate(json.loads(manifest_path.read_text(encoding="utf-8")))
    except (ValueError, ValidationError) as exc:
        raise TemplateError(f"{manifest_path}: {exc}") from exc
    user = _read_text(folder, manifest.user, manifest_path)
    system = _read_text(folder, manifest.system, manifest_path) if manifest.system else None
    template = Template(
        name=manifest_path.stem,
        mode=manifest.mode,
        dimensions=tuple((d.key, d.label) for d in manifest.dimensions),
        user=user,
        system=system,
        score_first=manifest.score_first,
    )
    if template.image_slots != IMAGE_SLOTS[template.mode]:
        raise TemplateError(
            f"{manifest_path}: a {template.mode} template needs {IMAGE_SLOTS[template.mode]} "
            f"{IMAGE_PLACEHOLDER} slot(s), {manifest.user} has {template.image_slots}"
        )
    if REQUEST_PLACEHOLDER not in user:
        raise TemplateError(f"{manifest_path}: {manifest.user} has no {REQUEST_PLACEHOLDER} placeholder")
    keys = [key for key, _ in template.dimensions]
    if len(set(keys)) != len(keys):
        raise TemplateError(f"{manifest_path}: a dimension is declared twice: {keys}")
    return template


def _read_text(folder: Path, name: str, manifest_path: Path) -> str:
    path = folder / name
    try:
        # newline="" keeps the bytes as written: these texts are the model's training prompt.
        with path.open(encoding="utf-8", newline="") as handle:
            return handle.read()
    except OSError as exc:
        raise TemplateError(f"{manifest_path}: cannot read {path}: {exc}") from exc


# --- Images ----------------------------------------------------------------------


def encode_image(image: ImageInput, max_edge: int) -> tuple[bytes, str]:
    """Encoded bytes and MIME type of `image`, its long edge at most `max_edge`.

    PNG, JPEG and WebP bytes already within the bound go out unchanged (byte for
    byte: the stand-in critic reads our PNG text chunks, and re-encoding a lossy
    source as PNG would only inflate it). Everything else is re-encoded as PNG,
    carrying the source's text chunks over.
    """
    if isinstance(image, Image.Image):
        return _to_png(image, max_edge), "image/png"
    try:
        decoded = Image.open(io.BytesIO(image))
    except (OSError, ValueError) as exc:
        raise ValueError(f"not a decodable image: {exc}") from exc
    with decoded:
        mime = _PASS_THROUGH_MIME.get(decoded.format or "")
        if mime is not None and max(decoded.size) <= max_edge:
            return bytes(image), mime
        return _to_png(decoded, max_edge), "image/png"


def _to_png(image: Image.Image, max_edge: int) -> bytes:
    text_chunks = _text_chunks(image)
    # exif_transpose keeps the text chunks in `info` but may return a new image.
    oriented = ImageOps.exif_transpose(image) or image
    if oriented.mode not in ("RGB", "RGBA", "L", "LA"):
        has_alpha = "transparency" in oriented.info or oriented.mode in ("PA", "RGBa", "La")
        oriented = oriented.convert("RGBA" if has_alpha else "RGB")
    width, height = oriented.size
    long_edge = max(width, height)
    if long_edge > max_edge:
        scale = max_edge / long_edge
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        oriented = oriented.resize(size, Image.Resampling.LANCZOS)
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    oriented.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _text_chunks(image: Image.Image) -> dict[str, str]:
    # PngImageFile.text holds tEXt/zTXt/iTXt chunks; an in-memory image only has `info`.
    text = getattr(image, "text", None)
    source = text if isinstance(text, dict) else image.info
    return {str(k): str(v) for k, v in source.items() if isinstance(k, str) and isinstance(v, str)}


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


# --- Messages --------------------------------------------------------------------


def build_messages(
    template: Template, instruction: str, images: Sequence[ImageInput], *, max_edge: int
) -> list[dict[str, Any]]:
    """The OpenAI chat `messages` for judging `images` (edit: source first, edited second).

    The user text is split at each `<image>` and the images are interleaved there
    as `image_url` parts, the way the model saw them in training.
    """
    if len(images) != template.image_slots:
        raise ValueError(f"template {template.name!r} takes {template.image_slots} image(s), got {len(images)}")
    chunks = template.user.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, Any]] = []
    for index, chunk in enumerate(chunks):
        # Replace per chunk, so an instruction that contains "<image>" adds no image slot.
        text = chunk.replace(REQUEST_PLACEHOLDER, instruction)
        if text:
            parts.append({"type": "text", "text": text})
        if index < len(images):
            payload, mime = encode_image(images[index], max_edge)
            parts.append({"type": "image_url", "image_url": {"url": data_uri(payload, mime)}})
    messages: list[dict[str, Any]] = []
    if template.system is not None:
        messages.append({"role": "system", "content": template.system})
    messages.append({"role": "user", "content": parts})
    return messages
