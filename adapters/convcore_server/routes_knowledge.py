"""``POST /api/knowledge/chat/completions``: the knowledge-base style envelope.

Answers ``{code, message, request_id, data{generated_answer, usage}}`` as the
seeds do, ``usage`` being a JSON *string* (``'{"prompt_tokens":…}\\n'``), and
their error codes::

    code      HTTP  message
    0         200   success
    1000001   401   unauthorized
    1000002   403   no permission
    1000003   400   invalid request:<reason>

Errors the seeds do not number (404, 409, 413, 5xx) keep their HTTP status
and use it as ``code`` too, with ``<err_code>:<reason>`` as message. The
request takes the same fields as ``/api/v2/chat/completions`` (``conv_uid``
continues a conversation; ``data.conv_uid`` says which one). With
``"stream": true`` each SSE event is an envelope whose ``generated_answer``
is the next piece; the last one carries ``usage``; then ``data: [DONE]``.
The key check happens here, not in a dependency, so a 401 is an envelope too.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from convcore import ChatCompletionChunk, TurnStream, Usage

from .context import ServerContext, conv_uid_header
from .errors import classify
from .routes_chat import CLIENT_CLOSED_REQUEST, parse_body, started_events
from .sse import SSEResponse

__all__ = ["build_knowledge_router", "envelope_error"]

log = logging.getLogger("convcore_server")

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

    @router.post("/api/knowledge/chat/completions", summary="Chat completion, knowledge-base envelope")
    async def knowledge_chat(request: Request) -> Response:
        request_id = uuid.uuid4().hex
        try:
            ctx.auth.check(request)
            req = await parse_body(request, ctx)
            if req.stream:
                stream = await ctx.engine.open_stream(req, owned_only=ctx.is_bound(request))
                events = await started_events(request, stream, _render_chunk, _render_error)
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
        return JSONResponse(body, headers=conv_uid_header(completion.conv_uid))

    return router


def _render_chunk(chunk: ChatCompletionChunk) -> dict[str, Any]:
    data: dict[str, Any] = {
        "generated_answer": chunk.choices[0].delta.content or "",
        "conv_uid": chunk.conv_uid,
    }
    if chunk.usage is not None:
        data["usage"] = usage_string(chunk.usage)
    return {"code": 0, "message": "success", "request_id": chunk.id, "data": data}


def _render_error(stream: TurnStream, exc: BaseException) -> dict[str, Any]:
    return envelope_error(exc, stream.id)[1]
