"""Resent histories: matching a request's messages against the stored conversation.

OpenAI SDK users send the whole message list every turn. With a conv_uid,
a request whose messages are a history (more than one non-system message,
one of them an assistant's: new input is user messages or tool results, so
an assistant message can only be history) is matched against the stored
messages from seq 1. The part the conversation already has is dropped and
only the new suffix is stored; a history that differs (an edited earlier
message) is refused with :class:`HistoryConflictError` naming the first
differing position, since storing it would silently rewrite the past —
fork the conversation at that point instead (:mod:`convcore.fork`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConflictError, HistoryConflictError
from .models import INSTRUCTION_ROLES, Message
from .schema import InputMessage

__all__ = ["is_resent_history", "match_history", "same_message"]


def same_message(sent: InputMessage, stored: Message) -> bool:
    """Whether a request's message is this stored one (token counts and seqs aside)."""
    return (
        sent.role == stored.role
        and sent.content == stored.content
        and sent.name == stored.name
        and sent.parts == stored.parts
        and sent.tool_call_id == stored.tool_call_id
        and (sent.tool_calls or None) == (stored.tool_calls or None)
    )


def is_resent_history(messages: Sequence[InputMessage]) -> bool:
    """Whether a request's messages carry history rather than only new input."""
    logged = [m for m in messages if m.role not in INSTRUCTION_ROLES]
    return len(logged) > 1 and any(m.role == "assistant" for m in logged)


def match_history(messages: Sequence[InputMessage], stored: Sequence[Message], message_count: int) -> int:
    """How many of the request's non-system messages the conversation
    already has (all of ``stored``, its first messages); raises
    :class:`HistoryConflictError` when they differ or nothing is new.

    ``stored`` holds the conversation's first ``min(len(logged), message_count)``
    messages, in seq order.
    """
    positions = [i for i, m in enumerate(messages) if m.role not in INSTRUCTION_ROLES]
    if len(stored) != min(len(positions), message_count):
        raise ConflictError("the conversation changed while its history was read; send the request again")
    for i, m in zip(positions, stored, strict=False):
        if not same_message(messages[i], m):
            raise HistoryConflictError(
                f"differs from the stored message at seq {m.seq} ({m.role}); the resent history must "
                "match the conversation's. To change an earlier message, fork the conversation before "
                f"seq {m.seq} and send the new message there",
                field=f"messages.{i}",
                seq=m.seq,
            )
    if len(positions) <= message_count:
        last = positions[-1]
        raise HistoryConflictError(
            f"the resent history ends at seq {len(positions)} but the conversation goes on to seq "
            f"{message_count}: nothing in the request is new. To answer again from an earlier point, "
            "fork the conversation there",
            field=f"messages.{last}",
            seq=len(positions) + 1,
        )
    return message_count
