"""``POST /api/v2/chat/completions``: DB-GPT's chat API, OpenAI-compatible.

The route only converts: JSON in to a :class:`~convcore.ChatRequest`, the
engine's completion or chunks out (their wire shape: :mod:`.stream_wire`).
A stream answers 200 only once its first chunk is there, which waits for
the backend's first event; errors before that are raised and answered by
the app's one error table, with the status and body the same call would
get unstreamed. An error after the stream has started is sent as one error
event that both clients raise on, followed by ``data: [DONE]`` as always.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from convcore import ChatCompletion, ChatCompletionChunk, ChatRequest, TurnStream, parse_chat_request
from convcore.params import NEUTRAL, PASS_THROUGH
from convcore.registry import supported_params
from convcore.schema import NOT_BLANK
from convcore.trim import TrimReport

from .body import read_json_object
from .context import ServerContext, conv_uid_header
from .errors import CLIENT_CLOSED_REQUEST, MessageTooLongError, classify
from .headers import raw_header
from .openapi_doc import error_responses, json_body, sse_content
from .routes_conversations import conversation_links
from .sse import DONE, SSEResponse, sse_event
from .stream_wire import StreamedChunk, StreamErrorEvent, StreamShape, chunk_json

__all__ = [
    "CONVERSATION_LINKS",
    "SSE_CONTENT",
    "TURN_ERRORS",
    "answer_chat",
    "build_chat_router",
    "check_message_sizes",
    "chunk_json",
    "completion_json",
    "completion_json_bytes",
    "describe_chat_request",
    "parse_body",
    "request_from_body",
    "started_events",
    "turn_events",
]

log = logging.getLogger("convcore_server")

# An error a turn can end with, before its first byte (a stream's later errors are events).
TURN_ERRORS = (400, 401, 403, 404, 409, 413, 429, 500, 502, 503, 504)

# Where a reply's conv_uid leads.
CONVERSATION_LINKS = conversation_links(
    "$response.body#/conv_uid", "read_conversation", "delete_conversation", "fork_conversation"
)

TURN_HEADERS = {
    "X-Conv-Uid": {
        "description": "The conversation's conv_uid, percent-encoded (UTF-8)",
        "schema": {"type": "string"},
    },
    "X-Conversation-Created": {
        "description": "Whether this turn started the conversation",
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
    "X-History-Matched": {
        "description": "How many resent messages the conversation already had",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
}

SSE_CONTENT = sse_content(
    "With `stream: true`, one event per chat.completion.chunk; an error after the start is one "
    "event with the error body; the last event is `[DONE]`",
    StreamedChunk,
    StreamErrorEvent,
)


def build_chat_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/chat/completions",
        summary="Chat completion (DB-GPT / OpenAI compatible)",
        operation_id="create_chat_completion",
        response_model=None,
        openapi_extra=json_body(ChatRequest),
        responses={
            200: {
                "model": ChatCompletion,
                "description": "The reply (JSON), or with `stream: true` its chunks as Server-Sent Events",
                "content": SSE_CONTENT,
                "headers": TURN_HEADERS,
                "links": CONVERSATION_LINKS,
            },
            **error_responses(*TURN_ERRORS),
        },
    )
    async def chat_completions(request: Request) -> Response:
        return await answer_chat(request, ctx)

    return router


async def answer_chat(request: Request, ctx: ServerContext) -> Response:
    """The route's answer to an authorised request: a completion, or its SSE stream."""
    req = await parse_body(request, ctx)
    if req.stream:
        stream = await ctx.engine.open_stream(req, owned_only=ctx.is_bound(request))
        shape = StreamShape(req)
        events = await started_events(request, stream, shape.chunk, shape.error)
        if events is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return SSEResponse(
            events,
            headers=turn_headers(
                stream.conv_uid, stream.conversation_created, stream.history_matched, stream.trim
            ),
        )
    completion = await ctx.engine.chat(req, owned_only=ctx.is_bound(request))
    # Serialised once, by pydantic, straight to bytes (the same JSON as completion_json).
    return Response(
        completion_json_bytes(completion),
        media_type="application/json",
        headers=turn_headers(
            completion.conv_uid,
            completion.conversation_created,
            completion.history_matched,
            completion.trim,
        ),
    )


async def parse_body(request: Request, ctx: ServerContext) -> ChatRequest:
    """The request's JSON body as a checked ChatRequest (``Idempotency-Key`` → ``request_id``)."""
    return request_from_body(await read_json_object(request), request, ctx)


def request_from_body(body: dict[str, Any], request: Request, ctx: ServerContext) -> ChatRequest:
    """``body`` (already read) as a checked ChatRequest, as :func:`parse_body` makes it."""
    given = body.get("user_name")
    if isinstance(given, str) or given is None:
        body["user_name"] = ctx.acting_user(request, given)
    key = raw_header(request.scope, b"idempotency-key")
    if key is not None and body.get("request_id") is None:
        body["request_id"] = key.decode("latin-1")
    req = parse_chat_request(body)
    check_message_sizes(req, ctx.max_message_chars)
    return req


def check_message_sizes(req: ChatRequest, limit: int) -> None:
    if isinstance(req.messages, str):
        if len(req.messages) > limit:
            raise MessageTooLongError("messages", len(req.messages), limit)
        return
    for i, m in enumerate(req.messages):
        if len(m.content) > limit:
            raise MessageTooLongError(f"messages.{i}.content", len(m.content), limit)


def completion_json(completion: ChatCompletion) -> dict[str, Any]:
    """DB-GPT's non-streaming shape plus ``conv_uid``; the extension fields
    only when they say something (``duplicate`` and ``conversation_created``
    when true, ``history_matched`` when not 0; the headers always carry the
    last two); a message's ``tool_calls`` only when it has some, as OpenAI
    sends it."""
    data = completion.model_dump(mode="json", exclude=_quiet_fields(completion))
    for choice in data["choices"]:
        if choice["message"].get("tool_calls") is None:
            choice["message"].pop("tool_calls", None)
    return data


_QUIET_FIELDS = ("trim", "duplicate", "conversation_created", "history_matched")


def _quiet(completion: ChatCompletion) -> tuple[bool, ...]:
    """Which of :data:`_QUIET_FIELDS` say nothing in ``completion``."""
    return (
        completion.trim is None,
        not completion.duplicate,
        not completion.conversation_created,
        not completion.history_matched,
    )


def _quiet_fields(completion: ChatCompletion) -> set[str]:
    return {name for name, quiet in zip(_QUIET_FIELDS, _quiet(completion), strict=True) if quiet}


@functools.cache
def _encoder_exclude(quiet: tuple[bool, ...]) -> dict[str, Any]:
    """The serializer's ``exclude`` for one combination of quiet fields, made
    once (there are sixteen): never changed after, as pydantic only reads it."""
    exclude: dict[str, Any] = {name: True for name, q in zip(_QUIET_FIELDS, quiet, strict=True) if q}
    exclude["choices"] = {"__all__": {"message": {"tool_calls"}}}
    return exclude


def completion_json_bytes(completion: ChatCompletion) -> bytes:
    """:func:`completion_json` encoded, without the dict in between: pydantic's
    serializer writes the bytes (``model_dump_json`` would decode them to a
    str, to be encoded again)."""
    if any(choice.message.tool_calls is not None for choice in completion.choices):
        return json.dumps(completion_json(completion), separators=(",", ":"), ensure_ascii=False).encode()
    exclude = _encoder_exclude(_quiet(completion))
    return completion.__pydantic_serializer__.to_json(completion, exclude=exclude)


def turn_headers(conv_uid: str, created: bool, matched: int, trim: TrimReport | None) -> dict[str, str]:
    """``X-Conv-Uid``, whether the turn started the conversation, how many
    resent messages it already had and its trim report, for clients that
    read headers only."""
    headers = {
        **conv_uid_header(conv_uid),
        "X-Conversation-Created": "true" if created else "false",
        "X-History-Matched": str(matched),
    }
    if trim is not None:
        headers["X-Convcore-Trim"] = trim.header()
    return headers


async def started_events(
    request: Request,
    stream: TurnStream,
    render: Callable[[ChatCompletionChunk], dict[str, Any]],
    render_error: Callable[[TurnStream, BaseException], dict[str, Any]],
) -> AsyncGenerator[bytes, None] | None:
    """:func:`turn_events` of ``stream`` once its first chunk has come. That
    chunk waits for the backend's first event, so a failure before it
    (an upstream 400 or 429, a backend that cannot be reached) is raised
    here, before any status is sent. None if the client went away first
    (the stream is closed then, and with it the backend's request)."""
    first: ChatCompletionChunk | None = None
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                first = await anext(stream)
            except Exception as exc:  # raised below, outside the task group
                error = exc
            tg.cancel_scope.cancel()
    finally:
        if first is None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
    if error is not None:
        raise error
    return None if first is None else turn_events(stream, render, render_error, first)


async def turn_events(
    stream: TurnStream,
    render: Callable[[ChatCompletionChunk], dict[str, Any]],
    render_error: Callable[[TurnStream, BaseException], dict[str, Any]],
    first: ChatCompletionChunk | None = None,
) -> AsyncGenerator[bytes, None]:
    """SSE events of ``stream`` (after ``first``, if it was read already):
    each chunk via ``render``, an error via ``render_error``, then
    ``data: [DONE]``. Closing this generator early (client gone) closes the
    stream, so nothing of the turn is stored."""
    try:
        try:
            if first is not None:
                yield sse_event(render(first))
            async for chunk in stream:
                yield sse_event(render(chunk))
        except Exception as exc:
            if classify(exc).status >= 500:
                log.error("stream %s failed: %s", stream.id, exc, exc_info=exc)
            yield sse_event(render_error(stream, exc))
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()


def describe_chat_request(schema: dict[str, Any], ctx: ServerContext, *names: str) -> None:
    """Narrow the chat request schemas ``names`` in the document ``schema``
    to what ``ctx`` serves: its engine's models and chat modes, ``compact``
    only with compaction configured, the OpenAI parameters each model
    honours (a chat mode other than a plain chat honours none), a reply
    budget within the model's window, and a message text within the
    service's limit; a chat mode that needs chat_param requires it. The
    request model cannot know these: they are the service's configuration."""
    engine = ctx.engine
    components = schema.get("components", {}).get("schemas", {})
    specs = list(engine.models)
    modes = engine.scenes.names()
    plain = [m for m in modes if getattr(engine.scenes.scenes[m], "passes_params", False)]
    needs_param = [m for m in modes if engine.scenes.scenes[m].needs_param]
    rules: list[dict[str, Any]] = []
    if len(plain) < len(modes):
        no_params = {p: refused(p) for p in PASS_THROUGH}
        rules.append(
            {"if": _is("chat_mode", [m for m in modes if m not in plain]), "then": {"properties": no_params}}
        )
    if needs_param:
        rules.append(
            {
                "if": _is("chat_mode", needs_param),
                "then": {
                    "required": ["chat_param"],
                    "properties": {"chat_param": {"type": "string", "pattern": NOT_BLANK}},
                },
            }
        )
    for i, spec in enumerate(specs):
        honoured = supported_params(spec.backend)
        limits = {p: _honoured(p, honoured) for p in PASS_THROUGH}
        limits = {p: s for p, s in limits.items() if s is not None}
        # Necessary, not enough: the prompt must fit beside the reply, which no schema can say.
        limits.update({field: {"maximum": spec.context_window} for field in BUDGET_FIELDS})
        when = _is("model", engine.models.names_of(spec))
        if i == 0:  # the default model answers requests that name none
            when = {
                "anyOf": [when, {"not": {"required": ["model"]}}, {"properties": {"model": {"type": "null"}}}]
            }
        rules.append({"if": when, "then": {"properties": limits}})
    model_names = [n for spec in specs for n in engine.models.names_of(spec)]
    message = components.get("InputMessage", {}).get("properties", {}).get("content", {})
    for form in message.get("anyOf", []):
        if form.get("type") == "string":
            form["maxLength"] = ctx.max_message_chars
    for name in names:
        request = components.get(name)
        if request is None:
            continue
        properties = request["properties"]
        properties["model"] = _nullable({"type": "string", "enum": model_names}, properties["model"])
        properties["chat_mode"] = _nullable({"type": "string", "enum": modes}, properties["chat_mode"])
        if engine.compaction is None:
            properties["compact"] = _nullable({"const": False}, properties["compact"])
        for form in properties["messages"]["anyOf"]:
            if form.get("type") == "string":
                form["maxLength"] = ctx.max_message_chars
        if rules:
            request["allOf"] = [*request.get("allOf", []), *rules]


BUDGET_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")


def _nullable(schema: dict[str, Any], was: dict[str, Any]) -> dict[str, Any]:
    kept = {k: was[k] for k in ("default", "description", "title") if k in was}
    return {"anyOf": [schema, {"type": "null"}], **kept}


def _is(field: str, values: list[str]) -> dict[str, Any]:
    return {"properties": {field: {"enum": values}}, "required": [field]}


def refused(param: str) -> dict[str, Any]:
    """What may be sent for a parameter that is not honoured: nothing, or a value asking for nothing."""
    if param in NEUTRAL:
        neutral = NEUTRAL[param]
        # An empty object as a shape, not a const: client generators take only scalar consts.
        value = {"type": "object", "maxProperties": 0} if neutral == {} else {"const": neutral}
        return {"anyOf": [{"type": "null"}, value]}
    return {"type": "null"}


def _honoured(param: str, honoured: frozenset[str]) -> dict[str, Any] | None:
    """The limit on ``param`` for a model that honours ``honoured``; None if it takes any value."""
    if param in honoured:
        return None
    kinds = sorted(s.split(":", 1)[1] for s in honoured if s.startswith(f"{param}:"))
    if kinds:
        return {
            "anyOf": [
                {"type": "null"},
                {"type": "object", "properties": {"type": {"enum": kinds}}, "required": ["type"]},
            ]
        }
    return refused(param)
