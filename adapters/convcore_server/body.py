"""Request bodies: a size limit for every route, and strict JSON parsing.

:class:`BodyLimitMiddleware` is plain ASGI (streaming responses pass through
untouched). It does not answer by itself: it makes the body's ``receive``
raise :class:`PayloadTooLargeError` once the declared or the received size
passes the limit, so the route that reads the body answers in its own shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convcore.errors import InvalidRequestError

from .errors import PayloadTooLargeError
from .headers import raw_header

__all__ = ["DEFAULT_MAX_BODY_BYTES", "BodyLimitMiddleware", "read_json_object"]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Only a \uD800-\uDFFF escape can put a lone surrogate into valid UTF-8 JSON.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` (declared or actual)."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared: int | None = None
        length = raw_header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = None
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise PayloadTooLargeError(limit, declared)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(limit)
            return message

        await self.app(scope, limited, send)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every body: json.loads with an option builds a decoder (and its scanner) per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or :class:`InvalidRequestError` saying why not."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # RFC 8259: JSON is UTF-8
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the request body is not UTF-8 text (byte {exc.start})") from exc
    try:
        # json.loads's own message for a second byte order mark, else the decoder it would build.
        bom = text[:1] == "\ufeff"
        data = json.loads(text, parse_constant=_no_constants) if bom else _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise InvalidRequestError("the request body is nested too deeply") from exc
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {_json_type(data)}")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(data):
        raise InvalidRequestError("the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
    return data


def _has_lone_surrogate(value: object) -> bool:
    """True if a string anywhere in ``value`` cannot be encoded as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
