"""The studio: static pages the gateway serves itself, which call the public API like any client.

Every studio answer carries a Content-Security-Policy: scripts and styles only from
the gateway (the pages have no inline code), no framing by other sites
(`frame-ancestors 'none'`, clickjacking), and `X-Content-Type-Options: nosniff`. Images
and API calls may also go to `GCR_PUBLIC_URL`'s origin, and to any https origin when
image requests redirect to presigned S3 URLs (`GCR_ARTIFACT_REDIRECT`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

from service.gateway.deps import State
from service.settings import GatewaySettings

STUDIO = Path(__file__).resolve().parent.parent / "studio"

# No prefix: besides /studio/..., the router answers the site-wide /favicon.ico.
router = APIRouter(tags=["studio"], include_in_schema=False)


def security_headers(settings: GatewaySettings) -> dict[str, str]:
    """The headers of every studio page and asset."""
    sources = ["'self'"]
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        sources.append(f"{parts.scheme}://{parts.netloc}")
    if settings.artifact_redirect:
        sources.append("https:")
    fetched = " ".join(sources)
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src {fetched} blob: data:; connect-src {fetched}; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


class StudioFiles(StaticFiles):
    """The studio's scripts and styles, with the studio's security headers."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:  # fmt: skip
        response = super().file_response(full_path, stat_result, scope, status_code)
        app: Any = scope["app"]
        response.headers.update(security_headers(app.state.gcr.settings))
        return response


static = StudioFiles(directory=STUDIO)


@router.get("/studio")
async def studio_home(state: State) -> FileResponse:
    """Submit jobs, see this key's jobs."""
    return FileResponse(STUDIO / "index.html", headers=security_headers(state.settings))


@router.get("/studio/jobs/{job_id}")
async def studio_job(job_id: str, state: State) -> FileResponse:
    """One job's trajectory (the page loads the job through the API, with the stored key)."""
    return FileResponse(STUDIO / "job.html", headers=security_headers(state.settings))


@router.get("/favicon.ico")
async def favicon(state: State) -> FileResponse:
    """The studio's icon, where browsers ask for it by convention (and the pages link it)."""
    headers = {**security_headers(state.settings), "Cache-Control": "public, max-age=86400"}
    return FileResponse(STUDIO / "favicon.ico", media_type="image/x-icon", headers=headers)
