"""DB-GPT's result envelope for the ``/api/v2/serve/...`` routers.

Success: ``{"success": true, "err_code": null, "err_msg": null, "data": ...}``.
Failure: ``{"success": false, "err_code": "...", "err_msg": "...", "data": null}``
with a 4xx for bad input (validation and duplicates 400, unknown ids 404)
and the HTTP adapter's table for everything else.

The routers use :class:`EnvelopeRoute`, which answers every error raised
while handling a request (body validation, the API-key dependency, the
registries) in that shape, whatever app includes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from convcore.errors import ConvcoreError, InvalidRequestError

from .base import DuplicateError, NotFoundError

__all__ = ["EnvelopeRoute", "error_envelope", "ok", "page_of"]

log = logging.getLogger("convcore_scenes")


def ok(data: Any) -> dict[str, Any]:
    return {"success": True, "err_code": None, "err_msg": None, "data": data}


def page_of(items: Sequence[Any], page: int, page_size: int) -> dict[str, Any]:
    """DB-GPT's paged list: ``items`` of page ``page`` (1-based) and the totals."""
    page = max(page, 1)
    page_size = max(min(page_size, 1000), 1)
    start = (page - 1) * page_size
    total = len(items)
    return {
        "items": list(items[start : start + page_size]),
        "total_count": total,
        "total_pages": (total + page_size - 1) // page_size,
        "page": page,
        "page_size": page_size,
    }


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header")]
    field = ".".join(loc) or None
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return (f"{field}: {msg}" if field else msg), field


def _status(exc: BaseException) -> tuple[int, str, str]:
    """HTTP status, err_code and err_msg for ``exc``."""
    if isinstance(exc, NotFoundError):
        return 404, "not_found", str(exc)
    if isinstance(exc, DuplicateError):
        return 400, "duplicate", str(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        message, _ = _validation_message(exc.errors())
        return 400, "invalid_request", message
    if isinstance(exc, HTTPException):
        # FastAPI and Starlette wrap errors met while reading the body (the body
        # limit's PayloadTooLargeError, a RecursionError from deep JSON, bad
        # multipart) in a Starlette HTTPException: answer the cause where it is ours.
        if isinstance(exc.__cause__, ConvcoreError):
            return _status(exc.__cause__)
        code = "invalid_request" if exc.status_code == 400 else "http_error"
        return exc.status_code, code, str(exc.detail)
    try:
        from convcore_server import classify
    except ImportError:  # pragma: no cover - the routers normally run inside the server
        if isinstance(exc, InvalidRequestError):
            return 400, "invalid_request", str(exc)
        if isinstance(exc, ConvcoreError):
            return 500, "internal_error", str(exc)
        return 500, "internal_error", "internal server error"
    kind = classify(exc)
    message = str(exc) if isinstance(exc, ConvcoreError) else "internal server error"
    return kind.status, kind.code, message


def error_envelope(exc: BaseException) -> JSONResponse:
    status, code, message = _status(exc)
    if status >= 500:
        log.error("serve API failed: %s", type(exc).__name__, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"success": False, "err_code": code, "err_msg": message, "data": None}
    return JSONResponse(body, status_code=status, headers=headers)


class EnvelopeRoute(APIRoute):
    """An APIRoute whose errors are answered as DB-GPT result envelopes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def enveloped(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_envelope(exc)

        return enveloped
