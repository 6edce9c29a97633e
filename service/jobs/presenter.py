"""The one place a stored job becomes what clients see: links made absolute, service fields dropped.

Workers store (round, candidate) and whether an image exists; every link a client or a
webhook receiver sees is made here, from the base URL the client used (or
GCR_PUBLIC_URL). Routes and webhooks both call `present`, so they cannot disagree.
"""

from __future__ import annotations

from typing import Any

from gcr.types import Candidate, JobDocument, Round
from service.jobs.records import StoredCandidate, StoredJob, StoredRound

_STORED_ONLY = {"owner", "base_url", "queue", "rounds", "links"}


def job_url(base: str, job_id: str) -> str:
    return f"{base}/jobs/{job_id}"


def image_url(base: str, job_id: str, round_index: int, candidate: int) -> str:
    return f"{job_url(base, job_id)}/images/{round_index}/{candidate}"


def base_of(job: StoredJob, public_url: str | None) -> str:
    """The base of a job's links outside a request (webhooks): GCR_PUBLIC_URL, else the one the
    client submitted to."""
    return (public_url or job.base_url or "").rstrip("/")


def present(job: StoredJob, base: str) -> JobDocument:
    """The document clients see: absolute links to the job, its events, every stored image,
    the best one and the source; none of the service's own fields."""
    doc = JobDocument.model_validate(
        {
            **job.model_dump(exclude=_STORED_ONLY),
            "rounds": [present_round(job.id, round_, base) for round_ in job.rounds],
        }
    )
    url = job_url(base, job.id)
    doc.links = {"self": url, "events": f"{url}/events"}
    if doc.spec.mode == "edit":
        doc.links["source_image"] = f"{url}/source"
    if doc.best is not None:
        doc.best.image_url = image_url(base, job.id, doc.best.round, doc.best.candidate)
        doc.links["best_image"] = doc.best.image_url
    return doc


def present_round(job_id: str, round_: StoredRound, base: str) -> Round:
    """A stored round as clients see it: each candidate with an image linked."""
    candidates = [_candidate(job_id, round_.index, c, base) for c in round_.candidates]
    return Round.model_validate({**round_.model_dump(exclude={"candidates"}), "candidates": candidates})


def present_round_json(job_id: str, round_: dict[str, Any], base: str) -> dict[str, Any]:
    """A `round` event's round (stored JSON) as clients see it."""
    return present_round(job_id, StoredRound.model_validate(round_), base).model_dump(mode="json")


def _candidate(job_id: str, round_index: int, candidate: StoredCandidate, base: str) -> Candidate:
    link = image_url(base, job_id, round_index, candidate.index) if candidate.has_image else None
    return Candidate.model_validate({**candidate.model_dump(exclude={"has_image"}), "image_url": link})
