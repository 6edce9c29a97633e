"""The reward model as a service: judge one client-supplied image."""

from __future__ import annotations

from fastapi import APIRouter

from gcr.types import Critique, CritiqueRequest
from service.gateway.deps import ERROR_RESPONSES, Caller, State
from service.gateway.uploads import check_text, checked_png, decode_base64_image

router = APIRouter(tags=["critique"])


@router.post("/critique", response_model=Critique, responses=ERROR_RESPONSES)
async def critique(body: CritiqueRequest, state: State, _caller: Caller) -> Critique:
    """Judge one client-supplied image with the reward model, synchronously."""
    settings = state.settings
    check_text(body.instruction, field="instruction", limit=settings.max_prompt_chars)
    images = {}
    for field, value in (("image", body.image), ("source_image", body.source_image)):
        if value is not None:
            raw = decode_base64_image(value, field=field, max_bytes=settings.max_image_bytes)
            images[field] = await checked_png(raw, field=field, settings=settings)
    return await state.critic.critique(
        body.instruction, images["image"], source_image=images.get("source_image"), mode=body.mode
    )
