"""Runs the items of a prompt set through a gateway, under each policy, and records them.

At most `concurrency` jobs are in flight at once, over all policies; items go in
prompt order, every policy of an item before the next item, so an interrupted
run still compares the policies on the same prompts.

What counts as finished, and so is skipped by a re-run (docs/evaluation.md):

- a job that ended, whatever its status (`succeeded`, `failed`, `cancelled`,
  `expired`): a failure is an outcome of the policy, and retrying it until it
  succeeds would bias the numbers; the line keeps the status and the error;
- a request the gateway refused as invalid (4xx): recorded as `rejected`, since
  sending it again cannot change the answer.

Not recorded, so retried by the next run: the gateway unreachable or answering
5xx, the queue staying full, a job that vanished. A 401/403 stops the whole run:
every item would fail the same way.

Each submission carries an `Idempotency-Key` derived from the output folder, the
policy, the item and the exact body: a re-run after an interrupt re-attaches to
the jobs still running (or finished unrecorded) on the gateway instead of paying
for them twice. Interrupting does not cancel the jobs, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from gcr import AsyncClient
from gcr.errors import APIStatusError, GcrError
from gcr.types import TERMINAL_STATUSES, JobDocument
from service.evaluation.dataset import EvalItem
from service.evaluation.policies import Policy
from service.evaluation.records import PolicyFolder, RunLog, exclusive, write_atomic
from service.retrying import retrying

log = logging.getLogger("gcr.eval")
T = TypeVar("T")

POLL_S = 0.5
# 429 answers are retried with exponential backoff up to this many times (about 5 minutes).
BUSY_RETRIES = 35
BUSY_MAX_WAIT_S = 10.0


class EvalAborted(Exception):
    """The run cannot go on (the gateway refuses our credentials)."""


class ProgressSink(Protocol):
    """Where the runner reports progress (the terminal bar, or nothing)."""

    def start(self, total: int, done: int) -> None: ...

    def item_done(self) -> None: ...

    def round_done(self) -> None: ...


class NoProgress:
    """A `ProgressSink` that shows nothing."""

    def start(self, total: int, done: int) -> None:
        pass

    def item_done(self) -> None:
        pass

    def round_done(self) -> None:
        pass


@dataclass
class RunOutcome:
    """What one invocation did."""

    run: int
    total: int
    skipped: int
    recorded: int = 0
    unfinished: int = 0
    interrupted: bool = False


class _Unrecorded(Exception):
    """This item could not be finished now; the next run retries it."""


class EvalRunner:
    """One invocation over an output folder."""

    def __init__(
        self,
        client: AsyncClient,
        items: Sequence[EvalItem],
        policies: Sequence[Policy],
        out_dir: Path,
        *,
        concurrency: int = 4,
        progress: ProgressSink | None = None,
    ) -> None:
        self.client = client
        self.items = list(items)
        self.policies = list(policies)
        self.out_dir = out_dir
        self.concurrency = concurrency
        self.progress = progress or NoProgress()
        self.folders = {p.name: PolicyFolder(out_dir, p.name) for p in self.policies}
        # Resolved once: part of every idempotency key, so another folder means new jobs.
        self._folder_key = str(out_dir.resolve())

    async def run(self) -> RunOutcome:
        """Run every unfinished (item, policy) pair; on cancel, record the run as interrupted."""
        with exclusive(self.out_dir):
            for policy in self.policies:
                self.folders[policy.name].prepare(policy.spec())
            finished = {p.name: self.folders[p.name].finished_ids() for p in self.policies}
            work = [
                (item, policy)
                for item in self.items
                for policy in self.policies
                if item.id not in finished[policy.name]
            ]
            runs = RunLog(self.out_dir)
            outcome = RunOutcome(
                run=runs.start([p.name for p in self.policies]),
                total=len(self.items) * len(self.policies),
                skipped=len(self.items) * len(self.policies) - len(work),
            )
            self.progress.start(outcome.total, outcome.skipped)
            slots = asyncio.Semaphore(self.concurrency)
            tasks = [asyncio.create_task(self._one(slots, item, policy, outcome)) for item, policy in work]
            try:
                if tasks:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                    for task in done:
                        error = None if task.cancelled() else task.exception()
                        if error is not None:
                            raise error
            except BaseException:  # cancelled (Ctrl-C) or aborted: the run log says it did not complete
                outcome.interrupted = True
                raise
            finally:
                # Stop what is still in flight (an abort, or the caller's interrupt); the jobs
                # themselves keep running on the gateway and a re-run re-attaches to them.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                outcome.unfinished = len(work) - outcome.recorded
                runs.end(
                    outcome.run,
                    recorded=outcome.recorded,
                    unfinished=outcome.unfinished,
                    interrupted=outcome.interrupted,
                )
            return outcome

    async def _one(self, slots: asyncio.Semaphore, item: EvalItem, policy: Policy, outcome: RunOutcome) -> None:
        async with slots:
            try:
                line = await self._evaluate(item, policy, outcome.run)
            except _Unrecorded as exc:
                log.warning("item %s (%s) not finished, a re-run retries it: %s", item.id, policy.name, exc)
                return
            # Synchronous on purpose: no cancellation can land between the durable write
            # and the count, so the run log's numbers match the file.
            self.folders[policy.name].record(line)
            outcome.recorded += 1
            self.progress.item_done()

    async def _evaluate(self, item: EvalItem, policy: Policy, run: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": item.prompt,
            "mode": item.mode,
            "generation": policy.generation,
            "loop": policy.loop,
        }
        if item.mode == "edit":
            try:
                body["source_image"] = await asyncio.to_thread(item.source_image)
            except OSError as exc:  # checked at load time, so moved or deleted since
                raise _Unrecorded(f"cannot read the source image: {exc}") from exc
        line: dict[str, Any] = {
            "id": item.id,
            "policy": policy.name,
            "run": run,
            "prompt": item.prompt,
            "mode": item.mode,
            "source_image": item.source_ref,
            "meta": item.meta,
        }
        try:
            job_id = await self._submit(body, self._idempotency_key(policy, item, body))
        except GcrError as exc:
            status = exc.status if isinstance(exc, APIStatusError) else 0
            if status in (401, 403):
                raise EvalAborted(f"the gateway refused the request: {exc}") from exc
            if exc.code == "no_worker":  # nothing would ever run it: say so rather than wait
                raise EvalAborted(f"cannot evaluate {item.mode} items: {exc.message}") from exc
            if status == 0 or status >= 500 or status in (409, 429):
                # 409: the same idempotency key is still being stored; the next run replays it.
                raise _Unrecorded(str(exc)) from exc
            return {
                **line,
                "status": "rejected",
                "stop_reason": None,
                "error": {"code": exc.code, "message": exc.message, "status": status},
                "job_id": None,
                "image": None,
                "recorded_at": time.time(),
                "job": None,
            }
        try:
            doc = await self._follow(job_id)
            image = await self._save_best(policy, item, doc)
        except (GcrError, httpx.HTTPError) as exc:
            raise _Unrecorded(f"job {job_id}: {exc}") from exc
        return {
            **line,
            "status": doc.status,
            "stop_reason": doc.stop_reason,
            "error": doc.error.model_dump() if doc.error else None,
            "job_id": job_id,
            "image": image,
            "recorded_at": time.time(),
            "job": doc.model_dump(mode="json"),
        }

    def _idempotency_key(self, policy: Policy, item: EvalItem, body: dict[str, Any]) -> str:
        digest = hashlib.sha256()
        for part in (self._folder_key, policy.name, item.id, json.dumps(body, sort_keys=True)):
            digest.update(part.encode("utf-8"))
            digest.update(b"\0")
        return f"gcr-eval-{digest.hexdigest()[:40]}"

    async def _submit(self, body: dict[str, Any], key: str) -> str:
        job = await self._patiently(lambda: self.client.submit(body, idempotency_key=key))
        return job.id

    async def _patiently(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, again after a pause while the gateway answers 429 (queue full, rate limit)."""
        # The queue and the rate limit are shared with other clients: wait rather than give up the item.
        busy = retrying(
            on=lambda exc: isinstance(exc, APIStatusError) and exc.status == 429,
            first_s=0.5,
            cap_s=BUSY_MAX_WAIT_S,
            attempts=BUSY_RETRIES + 1,
        )
        async for attempt in busy:
            with attempt:
                return await call()
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _follow(self, job_id: str) -> JobDocument:
        """Count `round` events until the job ends; poll if the stream breaks off."""
        seen = 0
        with contextlib.suppress(GcrError, httpx.HTTPError):
            async for event in self.client.events(job_id):
                if event.type == "round":
                    seen += 1
                    self.progress.round_done()
        doc = await self._patiently(lambda: self.client.get(job_id))
        while doc.status not in TERMINAL_STATUSES:
            await asyncio.sleep(POLL_S)
            doc = await self._patiently(lambda: self.client.get(job_id))
        for _ in range(len(doc.rounds) - seen):
            self.progress.round_done()
        return doc

    async def _save_best(self, policy: Policy, item: EvalItem, doc: JobDocument) -> str | None:
        """Fetch the best image into `images/<id>.png`; its path relative to the policy folder."""
        if doc.best is None or doc.best.image_url is None:
            return None
        url = doc.best.image_url
        png = await self._patiently(lambda: self.client.download(url))
        path = self.folders[policy.name].image_path(item.id)
        await asyncio.to_thread(write_atomic, path, png)
        return str(path.relative_to(self.folders[policy.name].path))
