"""The reward model as a service: judge one client-supplied image."""

from __future__ import annotations

from fastapi import APIRouter

from gcr.types import Critique, CritiqueRequest
from service.gateway.deps import ERROR_RESPONSES, Caller, State

router = APIRouter(tags=["critique"])


@router.post("/critique", response_model=Critique, responses=ERROR_RESPONSES)
async def critique(body: CritiqueRequest, state: State, _caller: Caller) -> Critique:
    """Judge one client-supplied image with the reward model, synchronously."""
    return await state.critique(body)
