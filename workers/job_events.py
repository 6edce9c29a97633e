"""What one running job tells its followers: stages, step progress, live previews, and its cancel flag.

Stage changes are written on the job (`stage`) and sent as events; progress and previews
come from the generator's executor thread and are sent from the event loop, throttled.
None of these is a state change of the job (`service.jobs.lifecycle` owns those), so a
lost progress event costs nothing, and sending one never fails the job.

The cancel flag lives in Redis, set by any gateway replica: polling it is the way to see
it, at every stage boundary and, while the generator runs, every `CANCEL_POLL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from gcr.types import EventType, JobEvent
from service.errors import GcrError, OwnershipLost
from service.jobs.lifecycle import JobLifecycle
from service.jobs.store import JobStore
from workers.generators.base import PreviewSink

CANCEL_POLL_S = 0.25


@dataclass
class JobEvents:
    """The events and the cancel flag of one job run by one worker."""

    job_id: str
    worker_id: str
    store: JobStore
    lifecycle: JobLifecycle
    progress_interval_s: float
    previews: bool
    cancelled: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def emit(self, type_: EventType, **data: Any) -> None:
        await self.store.publish(JobEvent(type=type_, job_id=self.job_id, at=time.time(), data=data))

    async def stage(self, round_index: int, stage: str, **data: Any) -> None:
        """The job is at `stage` of round `round_index` (`generating`, `critiquing`; `refining`
        is an event only); `OwnershipLost` when another worker holds it now."""
        if stage != "refining" and not await self.lifecycle.update(self.job_id, self.worker_id, stage=stage):
            raise OwnershipLost(self.job_id)
        await self.emit("stage", round=round_index, stage=stage, **data)

    async def emit_quietly(self, type_: EventType, **data: Any) -> None:
        """An event whose loss costs nothing (progress, a preview, a note)."""
        with contextlib.suppress(GcrError):
            await self.emit(type_, **data)

    # --- from the generator's thread --------------------------------------------------------
    def progress_listener(self, round_index: int) -> Callable[[int, int], None]:
        """Throttled step events, sent from the executor thread to the event loop."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        def on_step(step: int, total: int) -> None:
            now = time.monotonic()
            if step < total and now - last[0] < self.progress_interval_s:
                return
            last[0] = now
            loop.call_soon_threadsafe(self._spawn, "progress", {"round": round_index, "step": step, "total": total})

        return on_step

    def preview_sink(self, round_index: int, candidate: int) -> PreviewSink | None:
        """Where the generator sends this candidate's previews (from its thread), if the job asked."""
        if not self.previews:
            return None
        loop = asyncio.get_running_loop()

        def send(step: int, total: int, image: str) -> None:
            data = {"round": round_index, "candidate": candidate, "step": step, "total": total, "image": image}
            loop.call_soon_threadsafe(self._spawn, "preview", data)

        return send

    def _spawn(self, type_: EventType, data: dict[str, Any]) -> None:
        # Keep a reference: the loop holds tasks weakly, and a collected one is lost.
        task = asyncio.create_task(self.emit_quietly(type_, **data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the cancel flag ----------------------------------------------------------------------
    async def check_cancel(self) -> bool:
        if not self.cancelled:
            self.cancelled = await self.store.cancel_requested(self.job_id)
        return self.cancelled

    @contextlib.asynccontextmanager
    async def watching_cancel(self) -> AsyncIterator[None]:
        """Poll the cancel flag while a long stage runs, so denoising can be interrupted.

        The poller is stopped by an event, never by cancelling it: redis-py can swallow
        a cancellation that lands mid-command (redis/redis-py#2028), and awaiting such a
        task would then hang the job."""
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set() and not await self.check_cancel():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CANCEL_POLL_S)

        task = asyncio.create_task(poll())
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(GcrError):
                await task
