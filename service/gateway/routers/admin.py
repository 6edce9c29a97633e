"""Admin keys only: every tenant's jobs, the queue and the live workers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from gcr.types import JobList
from service.gateway import links
from service.gateway.deps import ERROR_RESPONSES, Before, Caller, State

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/jobs", response_model=JobList, responses=ERROR_RESPONSES)
async def admin_jobs(
    request: Request,
    state: State,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Before = None,
) -> JobList:
    """Admin keys only: every tenant's jobs, newest first."""
    state.require_admin(caller)
    base = links.base_url(request, state.settings)
    return JobList(jobs=[links.render(doc, base) for doc in await state.recent_jobs(limit, before)])


@router.get("/queue", responses=ERROR_RESPONSES)
async def admin_queue(state: State, caller: Caller) -> dict[str, Any]:
    """Admin keys only: per model the jobs waiting, claimed and its ready workers; each model's
    streams by mode and priority (entries, pending); the live workers."""
    state.require_admin(caller)
    return await state.queue_stats()
