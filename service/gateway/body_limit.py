"""Refuse oversized or stalled request bodies before they are buffered.

One limit per route, enforced while the body streams in: a declared Content-Length
over the route's limit is answered 413 at once, and a body without one (chunked) is
counted as it arrives and cut off at the limit, so no route ever buffers more than
its own limit. Routes not named get `default_bytes`. A body that stops arriving (a
Content-Length with nothing behind it) is answered 408 after `timeout_s`. Every answer
has its API's error shape (OpenAI's on /v1): the 413 at once from `error_bodies`, the
others as an HTTPException that `service.gateway.app` turns into it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gcr.types import ErrorBody
from service.gateway.error_bodies import error_answer


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limits: Mapping[str, int], default_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.limits = dict(limits)
        self.default_bytes = default_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, send, limit)
            return
        seen = 0
        complete = False

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # the body is in: what is left to receive is the disconnect, however late
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g}s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > limit:
                    # Raised into whoever reads the body; FastAPI passes HTTPException through
                    # to the app's handler, which answers with the usual error body.
                    raise HTTPException(413, f"request body is larger than {limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        error = ErrorBody(code="payload_too_large", message=f"request body is larger than {limit} bytes")
        status, content, headers = error_answer(scope["path"], 413, error)
        body = json.dumps(content).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *((name.encode(), value.encode()) for name, value in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
