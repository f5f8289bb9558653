"""The chat turn's own door: ``POST …/chat/completions`` without the framework's routing.

Through FastAPI a turn passes the framework's error and exit-stack layers,
a match against every route of every included router, the request-response
wrapper and the dependency solver before its endpoint runs: about a quarter
of the app's CPU for a turn on the memory store (profiled in-process). This
plain ASGI layer answers that one route with the same steps the route takes:
the API key check, :func:`~.routes_chat.answer_chat`, and on an error the
handler the app registered for it (found by the exception's MRO, as
Starlette does); an error with no handler there goes on up to the app's
catch-all, as before.

Everything else goes to the app unchanged: other paths and methods, and
every request while the app has ``dependency_overrides`` (a test replacing
the key check sees it honoured). The route stays declared in the app, so
the OpenAPI document does not change.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .context import ServerContext

__all__ = ["TurnDoor"]

Answer = Callable[[Request, ServerContext], Awaitable[Response]]


class TurnDoor:
    """Answers ``POST <path>`` with ``answer``; passes anything else to ``app``."""

    def __init__(self, app: ASGIApp, *, owner: Any, ctx: ServerContext, path: str, answer: Answer) -> None:
        self.app = app
        self.owner = owner  # the FastAPI app: its exception handlers and dependency overrides
        self.ctx = ctx
        self.path = path
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != scope.get("root_path", "") + self.path
            or self.owner.dependency_overrides
        ):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            await self.ctx.require_api_key(request)
            response = await self.answer(request, self.ctx)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            answered = handler(request, exc)
            response = await answered if inspect.isawaitable(answered) else answered
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Callable[..., Any] | None:
        """The app's handler for ``exc``, as its exception middleware would pick it:
        an HTTP status handler first, then the nearest class in the MRO; the
        catch-all (``Exception``, 500) belongs to the outer error middleware."""
        handlers: dict[Any, Callable[..., Any]] = self.owner.exception_handlers
        if isinstance(exc, HTTPException) and exc.status_code in handlers and exc.status_code != 500:
            return handlers[exc.status_code]
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in handlers:
                return handlers[cls]
        return None
