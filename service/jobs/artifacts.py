"""Image bytes outside Redis: candidates and edit sources in a file tree or an S3 bucket.

One URL setting, `GCR_ARTIFACT_URL`: `file:///path` (the default, under the cache folder:
one host, or a folder every gateway and worker mounts) or `s3://bucket/prefix` (AWS S3,
MinIO, R2, GCS's S3 API; credentials, region and `AWS_ENDPOINT_URL` from the usual
environment variables). Redis keeps only the job's references (which candidates have an
image); the key of each object is made by `Keys`, from the job id, round and candidate.

obstore (the Python binding of the Rust `object_store` crate that Arrow and Delta use)
does the I/O: one well-kept library, async, the same calls for files and S3, and
presigned URLs for S3 (`GCR_ARTIFACT_REDIRECT`). Objects expire with their job: a file
store is swept of objects older than the result TTL; an S3 bucket gets the lifecycle
rule in `deploy/s3-lifecycle.json`.

Its errors (obstore's own classes, which are not `OSError`s, and `OSError`s) become
`ArtifactStoreError` here: a retryable 503 at the gateway, a clear job error at the worker.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import NotFoundError
from obstore.store import ObjectStore, S3Store, from_url

from service.errors import ArtifactGone, ArtifactStoreError

log = logging.getLogger("gcr.artifacts")


class ArtifactStore:
    """Put, get and (for S3) presign objects under one URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.scheme = parts.scheme
        if self.scheme == "file":
            self.root: Path | None = Path(parts.path)
            self.root.mkdir(parents=True, exist_ok=True)
        elif self.scheme == "s3":
            self.root = None
        else:
            raise ValueError(f"GCR_ARTIFACT_URL must be file:///path or s3://bucket/prefix, not {url!r}")
        self.store: ObjectStore = from_url(url)

    async def put(self, key: str, data: bytes) -> None:
        try:
            await obstore.put_async(self.store, key, data)
        except (OSError, ObstoreError) as exc:
            name = key.rsplit("/", 1)[-1]
            raise ArtifactStoreError(f"the artifact store could not take {name}: {_first_line(exc)}") from exc

    async def get(self, key: str) -> bytes:
        """The object's bytes; `ArtifactGone` (410) when it is not there (any more)."""
        try:
            result = await obstore.get_async(self.store, key)
            return bytes(await result.bytes_async())
        except (FileNotFoundError, NotFoundError) as exc:
            raise ArtifactGone("this image is no longer stored (images expire with their job)") from exc
        except (OSError, ObstoreError) as exc:
            raise ArtifactStoreError(f"the artifact store could not read an image: {_first_line(exc)}") from exc

    async def presigned(self, key: str, expires_s: int = 300) -> str | None:
        """A short-lived URL to GET the object directly (S3 only; None for files)."""
        if not isinstance(self.store, S3Store):
            return None
        return await obstore.sign_async(self.store, "GET", key, datetime.timedelta(seconds=expires_s))

    async def sweep(self, older_than_s: float) -> int:
        """Delete file objects older than `older_than_s` (S3 expires by its lifecycle rule)."""
        if self.root is None:
            return 0
        return await asyncio.to_thread(_sweep_files, self.root, time.time() - older_than_s)


def _first_line(exc: BaseException) -> str:
    # obstore's messages go on with a multi-line debug dump of the Rust error; the first line says it.
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _sweep_files(root: Path, cutoff: float) -> int:
    removed = 0
    for path in root.rglob("*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError as exc:  # another replica swept it first
            log.debug("sweep skipped %s: %s", path, exc)
    return removed
