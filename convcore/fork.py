"""Forking a conversation: a new conv_uid that shares the history up to a seq.

This is how a chat product edits an earlier message or regenerates a reply
without rewriting the past: fork before the message to change (up to the
seq before it) and send the new message, or the same one again, to the
fork. The original stays as it was. The fork copies the messages (with
their token counts and round marks), the system prompt, model, chat mode
and owner; it is stored in one append, so it exists whole or not at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from .errors import ConversationNotFoundError, ForkPointError, InvalidRequestError
from .models import Conversation, MessageDraft, TurnWrite
from .protocols import ConversationStore
from .schema import NOT_PRINTABLE_ID, is_printable_id

__all__ = ["fork_conversation"]


async def fork_conversation(
    store: ConversationStore,
    source: Conversation,
    up_to_seq: int,
    *,
    new_conv_uid: str | None,
    now: Callable[[], float],
) -> Conversation:
    """Store the fork and return it. ``up_to_seq`` must be at least 1
    (InvalidRequestError), and at most message_count and not between the
    tool results answering one assistant message (a prompt would then hold
    calls without all their results): ForkPointError, a conflict with what
    is stored; right after the calls is fine (the fork then awaits their
    results). A ``new_conv_uid`` already taken is a ConflictError (the store's)."""
    if up_to_seq < 1:
        raise InvalidRequestError(
            f"must be at least 1, got {up_to_seq}; to change the first message, start a new conversation",
            field="up_to_seq",
        )
    if up_to_seq > source.message_count:
        raise ForkPointError(
            f"up_to_seq: must be at most the last seq ({source.message_count}), got {up_to_seq}"
        )
    if new_conv_uid is not None and not is_printable_id(new_conv_uid):
        raise InvalidRequestError(NOT_PRINTABLE_ID, field="new_conv_uid")
    messages = await store.read_messages(source.conv_uid, limit=up_to_seq + 1)
    if len(messages) < up_to_seq:
        raise ConversationNotFoundError(source.conv_uid)  # deleted while we read it
    kept, after = messages[:up_to_seq], messages[up_to_seq:]
    if after and after[0].role == "tool" and kept[-1].role == "tool":
        raise ForkPointError(
            f"up_to_seq: seq {up_to_seq} is between the tool results that answer one assistant message; "
            "fork before that assistant message or after its last result"
        )
    fields = ("role", "content", "name", "parts", "tool_call_id", "tool_calls", "token_count", "starts_round")
    write = TurnWrite(
        conv_uid=new_conv_uid or uuid.uuid4().hex,
        turn_id=f"fork:{uuid.uuid4().hex}",
        messages=tuple(MessageDraft.model_validate(m.model_dump(include=set(fields))) for m in kept),
        system=source.system,
        encoding=source.encoding,
        model=source.model,
        user_name=source.user_name,
        sys_code=source.sys_code,
        chat_mode=source.chat_mode,
        chat_param=source.chat_param,
        prompt_tokens=0,
        completion_tokens=0,
        expect_last_seq=0,  # a new conversation, never an existing one's continuation
        created_at=now(),
    )
    result = await store.append_turn(write)
    return result.conversation
