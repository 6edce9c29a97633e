"""The base URL of a request's links: GCR_PUBLIC_URL, else the one the client used.

Links themselves are made by the presenter (`service.jobs.presenter`), for routes and
webhooks alike."""

from __future__ import annotations

from fastapi import Request

from service.settings import GatewaySettings


def base_url(request: Request, settings: GatewaySettings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")
