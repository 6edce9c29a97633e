"""One GPU, many jobs: a queue of generation requests in front of one executor thread.

Jobs submit requests and await their images. A single consumer task takes the
oldest waiting request, gathers up to `max_batch` compatible ones (equal
`batch_key`), waiting at most `batch_window_s` for more when fewer are there, and
runs them as ONE pipeline call in the executor thread. While that call runs, the
event loop keeps serving other jobs' critiques, so the GPU only idles when no job
has a generation to do. A request whose job was cancelled, or whose caller stopped
waiting, is dropped before it reaches the GPU.

The window starts when the GPU is free, even for requests that queued behind a busy
call: those milliseconds can catch a job coming back from its critique, and a fuller
batch saves a call later. (Counting the window from the oldest request's arrival
instead cut the GPU's idle time in bench/orchestration.py, but batches got smaller
and throughput did not improve.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.errors import GeneratorError
from workers import metrics
from workers.generators.base import Generator, GenRequest, StepHooks
from workers.generators.oom import generate_splitting_on_oom

if TYPE_CHECKING:
    from PIL import Image

StepListener = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
EXECUTOR_PROBE_S = 5.0


@dataclass(frozen=True)
class GenResult:
    """One request's outcome: an image or the error that stopped it, with its timings."""

    image: Image.Image | None
    error: GeneratorError | None
    queued_s: float
    run_s: float


@dataclass
class _Pending:
    request: GenRequest
    key: tuple[object, ...]
    future: asyncio.Future[GenResult]
    on_step: StepListener | None
    cancelled: CancelCheck
    enqueued_at: float = field(default_factory=time.monotonic)


class GenerationScheduler:
    """Micro-batches generation requests from many jobs onto one generator."""

    def __init__(self, generator: Generator, max_batch: int, batch_window_s: float) -> None:
        self.generator = generator
        self.on_call: Callable[[int, float], None] | None = None
        """Hears of every generator call: (batch, seconds). The worker's demand estimate listens."""
        self.max_batch = max(1, min(max_batch, generator.max_batch))
        self.batch_window_s = batch_window_s
        self.busy_s = 0.0
        self.calls = 0
        self._waiting: list[_Pending] = []
        self._running: list[_Pending] = []
        self._arrived = asyncio.Event()
        # NOTE: one thread: a pipeline is not thread-safe and the GPU runs one call at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gcr-gpu")
        self._task: asyncio.Task[None] | None = None
        self._progress_at = time.monotonic()
        """When the call in progress started or last made a step (written by the executor thread)."""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gcr-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # The batch of a call cut short by the cancel has no one left to answer it either.
        for pending in [*self._running, *self._waiting]:
            if not pending.future.done():
                pending.future.cancel()
        # Waits for the call in progress (at most one generation) off the event loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def generate(
        self,
        requests: Sequence[GenRequest],
        on_step: StepListener | None = None,
        cancelled: CancelCheck = lambda: False,
    ) -> list[GenResult]:
        """Queue `requests` and wait for all their results (in order)."""
        loop = asyncio.get_running_loop()
        # Resolve all before queueing any: a request the backend refuses then fails the
        # call without leaving its siblings to run on the GPU for nobody.
        resolved = [self.generator.resolve(request) for request in requests]
        pendings = [_Pending(r, r.batch_key(), loop.create_future(), on_step, cancelled) for r in resolved]
        self._waiting.extend(pendings)
        self._arrived.set()
        return list(await asyncio.gather(*(p.future for p in pendings)))

    async def alive(self, stall_s: float) -> tuple[bool, str]:
        """Whether the executor still works: idle, it runs a no-op at once; busy, its call has
        made a step within `stall_s`. For the worker's liveness probe."""
        if not self._running:
            loop = asyncio.get_running_loop()
            try:
                probe = loop.run_in_executor(self._executor, time.monotonic)
            except RuntimeError:
                return False, "the generator's executor is shut down"
            done, _ = await asyncio.wait({probe}, timeout=EXECUTOR_PROBE_S)
            if done:
                return True, "ok: event loop and idle generator answer"
            if not self._running:
                return False, f"the generator's executor did not run a no-op in {EXECUTOR_PROBE_S:.0f}s"
            # A call started meanwhile and the no-op waits behind it: judge that call instead.
        stalled = time.monotonic() - self._progress_at
        if stalled > stall_s:
            return False, f"the generator call in progress made no step for {stalled:.0f}s (limit {stall_s:.0f}s)"
        return True, f"ok: generating, last step {stalled:.0f}s ago"

    def _take_batch(self) -> list[_Pending]:
        key = self._waiting[0].key
        batch = [p for p in self._waiting if p.key == key][: self.max_batch]
        for pending in batch:
            self._waiting.remove(pending)
        return batch

    def _compatible_waiting(self) -> int:
        key = self._waiting[0].key
        return sum(1 for p in self._waiting if p.key == key)

    def _drop_abandoned(self) -> None:
        """Answer requests whose job was cancelled; forget those whose caller stopped waiting."""
        for pending in [p for p in self._waiting if p.future.done() or p.cancelled()]:
            self._waiting.remove(pending)
            if not pending.future.done():
                pending.future.set_result(GenResult(None, None, 0.0, 0.0))

    async def _run(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            self._drop_abandoned()
            if not self._waiting:
                continue
            window_end = time.monotonic() + self.batch_window_s
            while self._compatible_waiting() < self.max_batch:
                remaining = window_end - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                # NOTE: asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
                # the cancel of stop() when it lands as an arrival wakes it (gh-86296).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
            self._drop_abandoned()  # cancellations during the window
            if self._waiting:
                await self._execute(self._take_batch())

    async def _execute(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def on_step(step: int, total: int) -> None:
            self._progress_at = time.monotonic()
            for pending in batch:
                if pending.on_step is not None:
                    pending.on_step(step, total)

        def interrupt() -> bool:
            # Stop the call only when every job in it was cancelled (or stopped waiting);
            # otherwise the cancelled job's image is simply dropped.
            return all(p.cancelled() or p.future.done() for p in batch)

        requests = [p.request for p in batch]
        metrics.GENERATOR_BATCH_SIZE.observe(len(batch))
        for pending in batch:
            metrics.GENERATOR_QUEUE_WAIT.observe(started - pending.enqueued_at)
        self._progress_at = time.monotonic()
        self._running = batch
        try:
            outcomes = await loop.run_in_executor(
                self._executor, generate_splitting_on_oom, self.generator, requests, StepHooks(on_step, interrupt)
            )
        except Exception as exc:
            error = exc if isinstance(exc, GeneratorError) else GeneratorError(f"generator crashed: {exc!r}")
            outcomes = [error] * len(batch)
        finally:
            self._running = []
        run_s = time.monotonic() - started
        self.busy_s += run_s
        self.calls += 1
        if self.on_call is not None:
            self.on_call(len(batch), run_s)
        metrics.GENERATOR_BUSY_SECONDS.inc(run_s)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            queued_s = started - pending.enqueued_at
            if isinstance(outcome, GeneratorError):
                pending.future.set_result(GenResult(None, outcome, queued_s, run_s))
            else:
                pending.future.set_result(GenResult(outcome, None, queued_s, run_s))
