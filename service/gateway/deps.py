"""What every router depends on: the replica's connections, its job service and fleet, the
authenticated caller, a valid job id."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request

from gcr.types import ErrorResponse
from service.errors import NotFound
from service.gateway.auth import Principal, authenticate
from service.gateway.fleet import Fleet
from service.gateway.job_service import JobService
from service.gateway.state import GatewayState

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 408, 409, 422, 429, 502, 503, 504)
}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 413, 415)}


async def get_state(request: Request) -> GatewayState:
    # async: a plain def would be run in FastAPI's threadpool on every request.
    state: GatewayState = request.app.state.gcr
    return state


State = Annotated[GatewayState, Depends(get_state)]


async def get_jobs(request: Request) -> JobService:
    jobs: JobService = request.app.state.jobs
    return jobs


async def get_fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


Jobs = Annotated[JobService, Depends(get_jobs)]
Workers = Annotated[Fleet, Depends(get_fleet)]


async def get_principal(
    state: State, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> Principal:
    """Authenticate the key, then take a token from its rate-limit bucket."""
    principal = authenticate(state.settings, authorization)
    await state.rate_limiter.take(principal.key_id)
    return principal


Caller = Annotated[Principal, Depends(get_principal)]

# Ids are token_urlsafe(16); anything else cannot exist, and must never reach Redis as
# part of a key (`<id>:events` would name another key type).
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def valid_job_id(job_id: Annotated[str, Path(description="The id POST /generate returned.")], _caller: Caller) -> str:
    # Depends on Caller so that authentication and the rate limit come first (FastAPI
    # runs the shared dependency once per request).
    if not _JOB_ID.match(job_id):
        raise NotFound.job(job_id)
    return job_id


JobId = Annotated[str, Depends(valid_job_id)]

Before = Annotated[float | None, Query(allow_inf_nan=False, description="Only jobs created before this timestamp.")]
"""Paging of job listings: a `created_at` (finite: NaN or infinity is a 422)."""
