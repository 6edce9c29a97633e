"""What Redis keeps of a job, apart from what clients see (`gcr.types.JobDocument`).

The stored record adds what only the service needs: the tenant that owns the job, the
base URL its links are made from, where it waits in the queue, and which candidates
have an image in the artifact store. `service.jobs.presenter` turns a record into the
document that routes and webhooks show; nothing else does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from gcr.types import Candidate, JobDocument, Round


class StoredCandidate(Candidate):
    has_image: bool = Field(False, description="Its image is in the artifact store (the worker writes this).")

    @model_validator(mode="before")
    @classmethod
    def _linked_means_stored(cls, data: Any) -> Any:
        # Rounds written before `has_image` existed carried a link instead.
        if isinstance(data, dict) and data.get("image_url") and "has_image" not in data:
            data = {**data, "has_image": True}
        return data


class StoredRound(Round):
    candidates: list[StoredCandidate]  # type: ignore[assignment]  # narrower: what the worker stored


class QueueEntry(BaseModel):
    """Where a queued job waits: its stream entry, for whichever model and mode it waits."""

    stream: str
    entry_id: str
    model: str
    mode: str
    priority: str
    queued_at: float = Field(description="When it was queued (created, or handed to another model).")


class StoredJob(JobDocument):
    """A job as stored: the document's fields and the service's own."""

    rounds: list[StoredRound] = Field(default_factory=list)  # type: ignore[assignment]
    owner: str | None = Field(None, description="The tenant that submitted the job.")
    base_url: str | None = Field(None, description="The base URL the client submitted to: links are made from it.")
    queue: QueueEntry | None = Field(None, description="Its queue entry, while it has one.")
