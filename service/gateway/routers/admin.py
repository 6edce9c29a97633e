"""Admin keys only: every tenant's jobs, the queue and the live workers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from gcr.types import JobList
from service.gateway import links
from service.gateway.auth import require_admin
from service.gateway.deps import ERROR_RESPONSES, Before, Caller, Jobs, State, Workers
from service.jobs.presenter import present

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/jobs", response_model=JobList, responses=ERROR_RESPONSES)
async def admin_jobs(
    request: Request,
    state: State,
    jobs: Jobs,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Before = None,
) -> JobList:
    """Admin keys only (403 for another key): every tenant's jobs, newest first."""
    require_admin(caller)
    base = links.base_url(request, state.settings)
    return JobList(jobs=[present(job, base) for job in await jobs.recent(caller, limit, before, everyone=True)])


@router.get("/queue", responses=ERROR_RESPONSES)
async def admin_queue(fleet: Workers, caller: Caller) -> dict[str, Any]:
    """Admin keys only (403 for another key): per model the jobs waiting, claimed and its ready
    workers; each model's streams by mode and priority (entries, pending); the live workers."""
    require_admin(caller)
    return await fleet.queue_stats()
