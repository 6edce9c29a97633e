"""When to try again: the one backoff policy of gcr, client and server alike.

"Equal jitter": the delay before retry n (n = 0, 1, ...) is uniform in [d/2, d] with
d = min(cap, first * 2**n), so retries spread out but never come at once. A server's
`Retry-After` (delta-seconds or an HTTP date) says better than any formula. The SDK
retries its calls with these; the gateway's and the worker's retry loops
(`service.retrying`) and the critic client use the same two functions.
"""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

import httpx


def equal_jitter_s(attempt: int, first_s: float, cap_s: float) -> float:
    """Seconds to wait before retry number `attempt + 1` (attempt counts from 0)."""
    ceiling = min(cap_s, first_s * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
