"""The conversation API, answered in DB-GPT's ``{success, err_code, err_msg, data}``.

- ``GET /api/v2/conversations?user_name=&sys_code=&limit=&offset=``: newest
  updated first.
- ``GET /api/v2/conversations/{conv_uid}?start_seq=&limit=&user_name=&sys_code=``:
  metadata and one page of messages in seq order (newest last);
  ``next_start_seq`` is where the next page starts, null at the end.
- ``DELETE /api/v2/conversations/{conv_uid}?user_name=&sys_code=``.
- ``POST /api/v2/conversations/{conv_uid}/fork`` with ``{"up_to_seq": N,
  "new_conv_uid": optional, "user_name", "sys_code"}``: a new conversation
  sharing messages 1..N (to edit a message or regenerate a reply, fork
  before it and send the new message to the fork); 409 if new_conv_uid exists.

A conv_uid may hold any character: percent-encode it in the path (slashes
may be sent as they are). With ``user_name`` or ``sys_code`` given, a
conversation that belongs to another one is refused with 403; a key bound
to a user always acts as that user, and reaches no conversation without an
owner (those are the operators').
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictStr, ValidationError
from starlette.requests import Request

from convcore import Conversation, ConversationNotFoundError, Message
from convcore.engine import MAX_INDEX
from convcore.params import integral
from convcore.schema import MAX_ID_LENGTH, MAX_NAME_LENGTH, PRINTABLE_ID, invalid_from_pydantic

from .body import read_json_object
from .context import ServerContext, ok
from .openapi_doc import Envelope, error_responses, json_body

__all__ = [
    "STORE_ERRORS",
    "build_conversations_router",
    "conversation_json",
    "conversation_links",
    "message_json",
]

MAX_PAGE = 1000

_Name = Annotated[str | None, Query(max_length=256)]


class ForkRequest(BaseModel):
    """The fork route's body."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    up_to_seq: Annotated[int, Strict(), Field(ge=1, le=MAX_INDEX), BeforeValidator(integral)]
    new_conv_uid: StrictStr | None = Field(
        default=None, min_length=1, max_length=MAX_ID_LENGTH, pattern=PRINTABLE_ID
    )
    user_name: StrictStr | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    sys_code: StrictStr | None = Field(default=None, max_length=MAX_NAME_LENGTH)


class SystemMessageOut(BaseModel):
    role: str
    content: str
    name: str | None


class ConversationOut(BaseModel):
    """A conversation's metadata, as :func:`conversation_json` answers it."""

    conv_uid: str
    user_name: str | None
    sys_code: str | None
    chat_mode: str
    chat_param: str | None
    model: str | None
    system: list[SystemMessageOut]
    created_at: float
    updated_at: float
    message_count: int
    total_tokens: int


class MessageOut(BaseModel):
    """A stored message, as :func:`message_json` answers it."""

    seq: int
    role: str
    content: str | list[dict[str, Any]] = Field(description="Text, or the list of parts as sent")
    name: str | None
    tool_call_id: str | None
    tool_calls: list[dict[str, Any]] | None
    token_count: int
    turn_id: str
    created_at: float


class ConversationPage(BaseModel):
    conversation: ConversationOut
    messages: list[MessageOut]
    next_start_seq: int | None = Field(description="Where the next page starts; null at the end")


class Deleted(BaseModel):
    conv_uid: str
    deleted: bool


class Forked(BaseModel):
    conversation: ConversationOut
    forked_from: str
    up_to_seq: int


def conversation_json(conv: Conversation) -> dict[str, Any]:
    return {
        "conv_uid": conv.conv_uid,
        "user_name": conv.user_name,
        "sys_code": conv.sys_code,
        "chat_mode": conv.chat_mode,
        "chat_param": conv.chat_param,
        "model": conv.model,
        "system": [{"role": m.role, "content": m.content, "name": m.name} for m in conv.system],
        "created_at": conv.created_at,
        "updated_at": conv.updated_at,
        "message_count": conv.message_count,
        "total_tokens": conv.total_tokens,
    }


def message_json(m: Message) -> dict[str, Any]:
    """A stored message; content with image, audio or file parts is the
    list of parts as sent."""
    content: Any = m.content
    if m.parts is not None:
        content = [p.model_dump(mode="json", exclude_none=True) for p in m.parts]
    return {
        "seq": m.seq,
        "role": m.role,
        "content": content,
        "name": m.name,
        "tool_call_id": m.tool_call_id,
        "tool_calls": [c.model_dump() for c in m.tool_calls] if m.tool_calls else None,
        "token_count": m.token_count,
        "turn_id": m.turn_id,
        "created_at": m.created_at,
    }


# What any route that reads the store may answer besides its own errors.
STORE_ERRORS = (400, 401, 403, 500, 503)
_USING_CONV_UID = ("read_conversation", "delete_conversation", "fork_conversation")
_FORKED = "$response.body#/data/conversation/conv_uid"


def conversation_links(conv_uid: str, *operation_ids: str) -> dict[str, Any]:
    """OpenAPI links from an answer that carries a conv_uid at ``conv_uid``
    (a runtime expression) to the operations (by operationId) that take it."""
    return {
        "".join(w.title() for w in op.split("_")): {"operationId": op, "parameters": {"conv_uid": conv_uid}}
        for op in operation_ids
    }


def build_conversations_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()
    engine = ctx.engine

    @router.get(
        "/conversations",
        summary="List conversations",
        operation_id="list_conversations",
        response_model=None,
        responses={
            200: {
                "model": Envelope[list[ConversationOut]],
                "links": conversation_links("$response.body#/data/0/conv_uid", *_USING_CONV_UID),
            },
            **error_responses(*STORE_ERRORS),
        },
    )
    async def list_conversations(
        request: Request,
        user_name: _Name = None,
        sys_code: _Name = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
        offset: Annotated[int, Query(ge=0, le=MAX_INDEX)] = 0,
    ) -> dict[str, Any]:
        user_name = ctx.acting_user(request, user_name)
        convs = await engine.list_conversations(
            user_name=user_name, sys_code=sys_code, limit=limit, offset=offset
        )
        return ok([conversation_json(c) for c in convs])

    @router.get(
        "/conversations/{conv_uid:path}",
        summary="Read a conversation and a page of its messages",
        operation_id="read_conversation",
        response_model=None,
        responses={200: {"model": Envelope[ConversationPage]}, **error_responses(404, *STORE_ERRORS)},
    )
    async def read_conversation(
        request: Request,
        conv_uid: str,
        user_name: _Name = None,
        sys_code: _Name = None,
        start_seq: Annotated[int, Query(ge=1, le=MAX_INDEX)] = 1,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> dict[str, Any]:
        if not conv_uid:
            raise ConversationNotFoundError(conv_uid)
        user_name = ctx.acting_user(request, user_name)
        owned = ctx.is_bound(request)
        conv = await engine.get_conversation(
            conv_uid, user_name=user_name, sys_code=sys_code, owned_only=owned
        )
        messages = await engine.read_messages(
            conv_uid,
            start_seq=start_seq,
            limit=limit,
            user_name=user_name,
            sys_code=sys_code,
            owned_only=owned,
        )
        last = messages[-1].seq if messages else start_seq - 1
        more = bool(messages) and last < conv.message_count
        return ok(
            {
                "conversation": conversation_json(conv),
                "messages": [message_json(m) for m in messages],
                "next_start_seq": last + 1 if more else None,
            }
        )

    @router.post(
        "/conversations/{conv_uid:path}/fork",
        summary="Fork a conversation up to a seq",
        operation_id="fork_conversation",
        openapi_extra=json_body(ForkRequest),
        response_model=None,
        responses={
            200: {"model": Envelope[Forked], "links": conversation_links(_FORKED, *_USING_CONV_UID)},
            **error_responses(404, 409, 413, *STORE_ERRORS),
        },
    )
    async def fork_conversation(request: Request, conv_uid: str) -> dict[str, Any]:
        body = await read_json_object(request)
        try:
            fork = ForkRequest.model_validate(body)
        except ValidationError as exc:
            raise invalid_from_pydantic(exc) from exc
        user_name = ctx.acting_user(request, fork.user_name)
        conv = await engine.fork(
            conv_uid,
            fork.up_to_seq,
            new_conv_uid=fork.new_conv_uid,
            user_name=user_name,
            sys_code=fork.sys_code,
            owned_only=ctx.is_bound(request),
        )
        return ok(
            {"conversation": conversation_json(conv), "forked_from": conv_uid, "up_to_seq": fork.up_to_seq}
        )

    @router.delete(
        "/conversations/{conv_uid:path}",
        summary="Delete a conversation",
        operation_id="delete_conversation",
        response_model=None,
        responses={200: {"model": Envelope[Deleted]}, **error_responses(404, *STORE_ERRORS)},
    )
    async def delete_conversation(
        request: Request, conv_uid: str, user_name: _Name = None, sys_code: _Name = None
    ) -> dict[str, Any]:
        user_name = ctx.acting_user(request, user_name)
        if not conv_uid or not await engine.delete_conversation(
            conv_uid, user_name=user_name, sys_code=sys_code, owned_only=ctx.is_bound(request)
        ):
            raise ConversationNotFoundError(conv_uid)
        return ok({"conv_uid": conv_uid, "deleted": True})

    return router
