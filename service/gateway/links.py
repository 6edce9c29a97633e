"""The gateway owns URLs: workers store (round, candidate); every link a client sees is made
here, absolute, from the base URL the client used (or GCR_PUBLIC_URL)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from gcr.types import JobDocument
from service.settings import GatewaySettings


def base_url(request: Request, settings: GatewaySettings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


def job_url(base: str, job_id: str) -> str:
    return f"{base}/jobs/{job_id}"


def image_url(base: str, job_id: str, round_index: int, candidate: int) -> str:
    return f"{job_url(base, job_id)}/images/{round_index}/{candidate}"


def render(doc: JobDocument, base: str) -> JobDocument:
    """`doc` with absolute links: the job, its events, every stored image, the best one, the source."""
    doc.links = {"self": job_url(base, doc.id), "events": f"{job_url(base, doc.id)}/events"}
    if doc.spec.mode == "edit":
        doc.links["source_image"] = f"{job_url(base, doc.id)}/source"
    for round_ in doc.rounds:
        for candidate in round_.candidates:
            if candidate.has_image or candidate.image_url:
                candidate.image_url = image_url(base, doc.id, round_.index, candidate.index)
    if doc.best is not None:
        doc.best.image_url = image_url(base, doc.id, doc.best.round, doc.best.candidate)
        doc.links["best_image"] = doc.best.image_url
    return doc


def render_round(job_id: str, round_: dict[str, Any], base: str) -> dict[str, Any]:
    """A `round` event's round (as JSON) with absolute image links."""
    for candidate in round_.get("candidates", []):
        if candidate.get("has_image") or candidate.get("image_url"):
            candidate["image_url"] = image_url(base, job_id, round_["index"], candidate["index"])
    return round_
