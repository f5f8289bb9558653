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
and so is a 405 for any other method on the route. Every envelope of one
request, each streamed event included, carries that request's id as
``request_id``: the ``X-Request-Id`` of the response and of its log lines.

The API's own rules apply to its fields: ``max_tokens`` is 0 to 4096
(default 4096, at most half the model's window when not sent; 0 means the
default), ``temperature`` 0 to 1 (default 0.1), and ``return_token_usage:
false`` leaves ``usage`` out (it is sent by default).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    Strict,
    StrictBool,
    ValidationError,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from convcore import ChatCompletionChunk, ChatRequest, TurnStream, Usage
from convcore.params import Unit, integral
from convcore.schema import invalid_from_pydantic

from .body import read_json_object
from .context import ServerContext, conv_uid_header
from .errors import RouteNotFoundError, classify
from .logs import current_request_id
from .openapi_doc import BEARER, KnowledgeErrorBody, error_responses, json_body, sse_content
from .routes_chat import CLIENT_CLOSED_REQUEST, TURN_ERRORS, request_from_body, started_events
from .routes_conversations import conversation_links
from .sse import SSEResponse

__all__ = ["KnowledgeAnswer", "KnowledgeChatRequest", "build_knowledge_router", "envelope_error"]

log = logging.getLogger("convcore_server")

ROUTE = "/api/knowledge/chat/completions"
MAX_TOKENS = 4096
DEFAULT_TEMPERATURE = 0.1

_NUMBERED = {401: (1000001, "unauthorized"), 403: (1000002, "no permission")}


class KnowledgeChatRequest(ChatRequest):
    """The chat request with the knowledge-base API's own ranges and switch."""

    max_tokens: Annotated[int, Strict(), Field(ge=0, le=MAX_TOKENS), BeforeValidator(integral)] | None = (
        Field(default=None, description="0 or absent: half the model's window, at most 4096")
    )
    temperature: Unit | None = Field(default=None, description=f"absent: {DEFAULT_TEMPERATURE}")
    return_token_usage: StrictBool | None = Field(default=None, description="false leaves usage out")


class KnowledgeAnswerData(BaseModel):
    generated_answer: str
    usage: str | None = Field(
        default=None, description="The token usage as a JSON string, ending in a newline"
    )
    conv_uid: str


class KnowledgeAnswer(BaseModel):
    """A knowledge-base answer (also each event of its stream)."""

    code: int = Field(description="0 for success")
    message: str
    request_id: str = Field(description="This request's id, as in the X-Request-Id response header")
    data: KnowledgeAnswerData


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

    @router.post(
        ROUTE,
        summary="Chat completion, knowledge-base envelope",
        operation_id="knowledge_chat_completion",
        response_model=None,
        openapi_extra={**json_body(KnowledgeChatRequest), "security": BEARER},
        responses={
            200: {
                "model": KnowledgeAnswer,
                "description": "The answer; with `stream: true`, an envelope per piece as Server-Sent Events",
                "content": sse_content(
                    "With `stream: true`, one envelope per piece of the answer (or the error); "
                    "the last event is `[DONE]`",
                    KnowledgeAnswer,
                    KnowledgeErrorBody,
                ),
                "links": conversation_links("$response.body#/data/conv_uid", "read_conversation"),
            },
            **error_responses(*TURN_ERRORS, model=KnowledgeErrorBody),
        },
    )
    async def knowledge_chat(request: Request) -> Response:
        request_id = current_request_id()
        try:
            ctx.auth.check(request)
            body = await read_json_object(request)
            with_usage = _apply_api_rules(body, ctx)
            req = request_from_body(body, request, ctx)
            if req.stream:
                stream = await ctx.engine.open_stream(req, owned_only=ctx.is_bound(request))
                render = functools.partial(_render_chunk, request_id=request_id, with_usage=with_usage)
                render_error = functools.partial(_render_error, request_id)
                events = await started_events(request, stream, render, render_error)
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
            "request_id": request_id,
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
        status, body = envelope_error(exc, current_request_id())
        return JSONResponse(body, status_code=status, headers={"Allow": "POST"})

    return router


def _apply_api_rules(body: dict[str, Any], ctx: ServerContext) -> bool:
    """Check ``body`` as a :class:`KnowledgeChatRequest` and default its
    fields by this API's rules, in place; whether the answer carries usage."""
    try:
        checked = KnowledgeChatRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc) from exc
    if checked.temperature is None:
        body["temperature"] = DEFAULT_TEMPERATURE
    if not checked.max_tokens:
        body.pop("max_tokens", None)
        if checked.max_new_tokens is None:
            spec = ctx.engine.models.get(checked.model)
            body["max_tokens"] = min(MAX_TOKENS, spec.context_window // 2)
    body.pop("return_token_usage", None)
    return checked.return_token_usage is not False


def _render_chunk(chunk: ChatCompletionChunk, request_id: str, with_usage: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "generated_answer": chunk.choices[0].delta.content or "",
        "conv_uid": chunk.conv_uid,
    }
    if with_usage and chunk.usage is not None:
        data["usage"] = usage_string(chunk.usage)
    return {"code": 0, "message": "success", "request_id": request_id, "data": data}


def _render_error(request_id: str, stream: TurnStream, exc: BaseException) -> dict[str, Any]:
    return envelope_error(exc, request_id)[1]
