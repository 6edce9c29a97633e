"""How many event streams and waits one gateway holds open, per key and in all.

An open stream costs a socket and a little memory, never a Redis connection (see
`service.jobs.listener`); the limits keep one client from taking every socket a gateway
has. They count per gateway process, so a fleet of N replicas holds N times as many.
The decision is taken before a stream starts: beyond a limit the client gets a 429
with Retry-After in the one error body, never a stream that fails later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sse_starlette import EventSourceResponse

from service.errors import TooManyStreams


class StreamSlots:
    """Counts open streams; `take` hands out a slot or refuses with `TooManyStreams`."""

    def __init__(self, limit: int, per_key: int) -> None:
        self.limit = limit
        self.per_key = per_key
        self.open = 0
        self._by_key: Counter[str] = Counter()

    def available(self, key_id: str) -> bool:
        return self.open < self.limit and self._by_key[key_id] < self.per_key

    def take(self, key_id: str) -> Slot:
        """A slot for `key_id` (an API key's id), released with `Slot.release`."""
        if self.open >= self.limit:
            raise TooManyStreams(
                f"this gateway holds its limit of {self.limit} open event streams and waits "
                "(GCR_MAX_OPEN_STREAMS); retry later, or poll GET /jobs/{id}"
            )
        if self._by_key[key_id] >= self.per_key:
            raise TooManyStreams(
                f"this API key holds its limit of {self.per_key} open event streams and waits "
                "(GCR_MAX_OPEN_STREAMS_PER_KEY); close one, or poll GET /jobs/{id}"
            )
        self.open += 1
        self._by_key[key_id] += 1
        return Slot(self, key_id)

    @contextmanager
    def held(self, key_id: str) -> Iterator[Slot]:
        slot = self.take(key_id)
        try:
            yield slot
        finally:
            slot.release()

    def _release(self, key_id: str) -> None:
        self.open -= 1
        self._by_key[key_id] -= 1
        if self._by_key[key_id] <= 0:
            del self._by_key[key_id]


class Slot:
    """One open stream's place; releasing it twice is harmless."""

    def __init__(self, slots: StreamSlots, key_id: str) -> None:
        self._slots = slots
        self._key_id = key_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._release(self._key_id)


class HeldEventSource(EventSourceResponse):
    """An SSE response that gives its stream slot back however the stream ends (the client
    leaving, the end event, a server shutdown)."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
