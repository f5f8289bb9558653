"""``POST /api/knowledge/chat/completions``: the knowledge-base style envelope.

Answers ``{code, message, request_id, data{generated_answer, usage}}`` as the
knowledge-base API's documentation does, ``usage`` being a JSON *string* (``'{"prompt_tokens":…}\\n'``), and
their error codes::

    code      HTTP  message
    0         200   success
    1000001   401   unauthorized
    1000002   403   no permission
    1000003   400   invalid request:<reason>

Errors that documentation does not number (404, 409, 413, 5xx) keep their HTTP status
and use it as ``code`` too, with ``<err_code>:<reason>`` as message. The
request takes the same fields as ``/api/v2/chat/completions`` (``conv_uid``
continues a conversation; ``data.conv_uid`` says which one). With
``"stream": true`` each SSE event is an envelope whose ``generated_answer``
is the next piece; the last one carries ``usage``; then ``data: [DONE]``.
The key check happens here, not in a dependency, so a 401 is an envelope too,
and so is a 405 for any other method on the route.

The API's own rules apply to its fields: ``max_tokens`` is 0 to 4096
(default 4096, at most half the model's window when not sent; 0 means the
default), ``temperature`` 0 to 1 (default 0.1), and ``return_token_usage:
false`` leaves ``usage`` out (it is sent by default).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from convcore import ChatCompletionChunk, InvalidRequestError, TurnStream, Usage

from .body import read_json_object
from .context import ServerContext, conv_uid_header
from .errors import RouteNotFoundError, classify
from .routes_chat import CLIENT_CLOSED_REQUEST, request_from_body, started_events
from .sse import SSEResponse

__all__ = ["build_knowledge_router", "envelope_error"]

log = logging.getLogger("convcore_server")

ROUTE = "/api/knowledge/chat/completions"
MAX_TOKENS = 4096
DEFAULT_TEMPERATURE = 0.1

_NUMBERED = {401: (1000001, "unauthorized"), 403: (1000002, "no permission")}


def usage_string(usage: Usage) -> str:
    return json.dumps(usage.model_dump(), separators=(",", ":")) + "\n"


def envelope_error(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and envelope body for ``exc``."""
    kind = classify(exc)
    if kind.status in _NUMBERED:
        code, message = _NUMBERED[kind.status]
    elif kind.status == 400:
        code, message = 1000003, f"invalid request:{exc}"
    else:
        code = kind.status
        message = f"{kind.code}:{exc}" if kind.status < 500 or kind.code != "internal_error" else kind.code
    return kind.status, {"code": code, "message": message, "request_id": request_id}


def build_knowledge_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.post(ROUTE, summary="Chat completion, knowledge-base envelope")
    async def knowledge_chat(request: Request) -> Response:
        request_id = uuid.uuid4().hex
        try:
            ctx.auth.check(request)
            body = await read_json_object(request)
            with_usage = _apply_api_rules(body, ctx)
            req = request_from_body(body, request, ctx)
            if req.stream:
                stream = await ctx.engine.open_stream(req, owned_only=ctx.is_bound(request))
                render = _render_chunk if with_usage else _render_chunk_without_usage
                events = await started_events(request, stream, render, _render_error)
                if events is None:
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                return SSEResponse(events, headers=conv_uid_header(stream.conv_uid))
            completion = await ctx.engine.chat(req, owned_only=ctx.is_bound(request))
        except Exception as exc:
            status, body = envelope_error(exc, request_id)
            if status >= 500:
                log.error("knowledge chat failed: %s", exc, exc_info=exc)
            return JSONResponse(body, status_code=status)
        body = {
            "code": 0,
            "message": "success",
            "request_id": completion.id,
            "data": {
                "generated_answer": completion.content,
                "usage": usage_string(completion.usage),
                "conv_uid": completion.conv_uid,
            },
        }
        if not with_usage:
            del body["data"]["usage"]
        return JSONResponse(body, headers=conv_uid_header(completion.conv_uid))

    @router.api_route(
        ROUTE, methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False
    )
    async def other_methods(request: Request) -> Response:
        exc = RouteNotFoundError(f"method {request.method} is not allowed on {ROUTE}; use POST", 405)
        status, body = envelope_error(exc, uuid.uuid4().hex)
        return JSONResponse(body, status_code=status, headers={"Allow": "POST"})

    return router


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"must be a number, got {type(value).__name__}", field=name)
    return value


def _apply_api_rules(body: dict[str, Any], ctx: ServerContext) -> bool:
    """Check and default ``body``'s fields by this API's ranges, in place;
    whether the answer carries usage."""
    temperature = _number(body, "temperature")
    if temperature is None:
        body["temperature"] = DEFAULT_TEMPERATURE
    elif not 0 <= temperature <= 1:
        raise InvalidRequestError(f"must be between 0 and 1, got {temperature}", field="temperature")
    max_tokens = _number(body, "max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or not 0 <= max_tokens <= MAX_TOKENS):
        raise InvalidRequestError(
            f"must be an integer from 0 to {MAX_TOKENS}, got {max_tokens}", field="max_tokens"
        )
    if not max_tokens and body.get("max_new_tokens") is None:
        model = body.get("model")
        spec = ctx.engine.models.get(model if isinstance(model, str) else None)
        body["max_tokens"] = min(MAX_TOKENS, spec.context_window // 2)
    usage = body.pop("return_token_usage", None)
    if usage is not None and not isinstance(usage, bool):
        raise InvalidRequestError(
            f"must be true or false, got {type(usage).__name__}", field="return_token_usage"
        )
    return usage is not False


def _render_chunk(chunk: ChatCompletionChunk) -> dict[str, Any]:
    data: dict[str, Any] = {
        "generated_answer": chunk.choices[0].delta.content or "",
        "conv_uid": chunk.conv_uid,
    }
    if chunk.usage is not None:
        data["usage"] = usage_string(chunk.usage)
    return {"code": 0, "message": "success", "request_id": chunk.id, "data": data}


def _render_chunk_without_usage(chunk: ChatCompletionChunk) -> dict[str, Any]:
    event = _render_chunk(chunk)
    event["data"].pop("usage", None)
    return event


def _render_error(stream: TurnStream, exc: BaseException) -> dict[str, Any]:
    return envelope_error(exc, stream.id)[1]
