"""The studio: static pages the gateway serves itself, which call the public API like any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STUDIO = Path(__file__).resolve().parent.parent / "studio"

router = APIRouter(prefix="/studio", tags=["studio"], include_in_schema=False)
static = StaticFiles(directory=STUDIO)


@router.get("")
async def studio_home() -> FileResponse:
    """Submit jobs, see this key's jobs."""
    return FileResponse(STUDIO / "index.html")


@router.get("/jobs/{job_id}")
async def studio_job(job_id: str) -> FileResponse:
    """One job's trajectory (the page loads the job through the API, with the stored key)."""
    return FileResponse(STUDIO / "job.html")
