"""How many jobs one worker needs to keep its generator busy, from measured stage times.

A job round-trips through the generator: one call (its round's images), then `away` while
its images are critiqued, checkpointed and refined, then its next call. To start a full
call of `b` requests every `t` seconds (the call's time at the batch reached), with `k`
requests a round, b/k jobs must come back every `t`; by Little's law the worker needs

    jobs = b/k x (t + away) / t + b/k      (the last b/k: one batch queued, so no call waits)

A critique costs 10 to 100 generations, so `away` >> `t`, and the number of jobs is large
and moves with the model, the batch and the critic; a fixed count left the generator idle
most of the time (bench/README.md, "Keep the GPU busy"). `t` and `away` are moving
averages of what this worker measured; until a first job came back, the longest a job has
been away so far stands in for `away`, so the count grows while the first critiques run.

The count is also bounded by what the critique limit admits (`CritiqueLimit`: the
critiques this worker sends at once, which grows as fast as the critic takes them and
stops at its knee), and one batch ready for the next free places: a job more would only
wait for a critique. The worker claims up to this many jobs, and none while its critiques wait
for the critic (`CritiqueLimit.saturated`): past the critic's knee a job more only waits
longer, and is better left in the shared queue for a worker that can run it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

EWMA = 0.2


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA * (sample - old)


class Demand:
    def __init__(self, max_batch: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_batch = max(1, max_batch)
        self._clock = clock
        self._call_s: dict[int, float] = {}
        """A call's seconds, by its batch size."""
        self._away_s: float | None = None
        self._per_round: float | None = None
        """Requests a round (candidates), averaged; none measured yet: one."""
        self._away_since: dict[str, float] = {}

    # --- what the worker measures ---------------------------------------------------------
    def call_done(self, batch: int, seconds: float) -> None:
        """A generator call of `batch` requests took `seconds`."""
        self._call_s[batch] = _ewma(self._call_s.get(batch), seconds)

    def left_generator(self, job_id: str, requests: int) -> None:
        """The job's round got its `requests` images: it is away until its next round."""
        self._per_round = _ewma(self._per_round, float(max(1, requests)))
        self._away_since[job_id] = self._clock()

    def back_at_generator(self, job_id: str) -> None:
        """The job queued its next round's requests."""
        since = self._away_since.pop(job_id, None)
        if since is not None:
            self._away_s = _ewma(self._away_s, self._clock() - since)

    def gone(self, job_id: str) -> None:
        """The job ended, or went to another worker."""
        self._away_since.pop(job_id, None)

    # --- what it needs --------------------------------------------------------------------
    def call_seconds(self) -> float | None:
        """A full call's time: measured at `max_batch`, else from the largest batch measured
        (a call's time growing with its requests, as it does on a GPU past small batches)."""
        if not self._call_s:
            return None
        if self.max_batch in self._call_s:
            return self._call_s[self.max_batch]
        largest = max(self._call_s)
        return self._call_s[largest] * self.max_batch / largest

    def jobs_needed(self, critic_limit: int | None = None) -> int:
        """How many jobs keep the generator busy (the module's formula); with `critic_limit`,
        the critiques this worker may send at once (`CritiqueLimit.admits`), no more than
        that admits: those being judged, and a batch ready to take the next free places."""
        per_round = self._per_round or 1.0
        per_call = self.max_batch / per_round
        t = self.call_seconds()
        now = self._clock()
        away = self._away_s
        if away is None:  # none came back yet: the longest away so far stands in
            away = max((now - since for since in self._away_since.values()), default=0.0)
        if t is None or t <= 0:
            needed = math.ceil(2 * per_call)  # nothing measured yet: one batch running, one queued
        else:
            needed = math.ceil(per_call * (t + away) / t + per_call)
        if critic_limit is not None:
            needed = min(needed, math.ceil((critic_limit + self.max_batch) / per_round))
        return needed
