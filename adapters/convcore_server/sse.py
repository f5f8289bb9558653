"""Server-Sent Events as DB-GPT's and OpenAI's clients read them.

Each event is one line ``data: <json>`` and a blank line; the stream ends
with exactly ``data: [DONE]``. The JSON is ASCII-escaped on purpose: a reply
holding U+2028 or U+0085 would otherwise be split by clients that read lines
with ``str.splitlines`` semantics (httpx's ``aiter_lines`` does).

:class:`SSEResponse` watches for the client going away while it streams and,
however the response ends, closes the event iterator, so an abandoned
:class:`~convcore.TurnStream` is closed (and stores nothing) at once rather
than whenever the garbage collector gets to it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["DONE", "SSEResponse", "sse_event"]

DONE = b"data: [DONE]\n\n"


def sse_event(payload: Mapping[str, Any]) -> bytes:
    """One ``data:`` event holding ``payload`` as single-line ASCII JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode("ascii") + b"\n\n"


class SSEResponse(Response):
    """Streams the byte events of ``events`` as ``text/event-stream``."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.events = events
        self.status_code = status_code
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch_disconnect)
                try:
                    await self._stream(send)
                except OSError:
                    pass  # the client went away mid-send (ASGI 2.4 servers say so this way)
                tg.cancel_scope.cancel()
        finally:
            # Close the source even when cancelled: shielded, so its own cleanup can await.
            with anyio.CancelScope(shield=True):
                await self.events.aclose()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
