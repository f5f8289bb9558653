"""Pieces every store shares, so each adapter only does its own I/O.

The rules live here once: who may use a conversation, how a turn's drafts
become numbered messages, how a conversation's metadata changes with a
turn, and what the longest tail within a budget is.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import PermissionDeniedError, shown
from .models import Conversation, Message, TurnRecord, TurnWrite, trusted, trusted_copy

__all__ = [
    "apply_turn",
    "check_owner",
    "check_turn_owner",
    "conflict_message",
    "number_messages",
    "tail_start",
    "turn_record",
]


def number_messages(turn: TurnWrite, first_seq: int) -> list[Message]:
    """The turn's drafts as stored messages from ``first_seq`` on."""
    turn_id, created_at = turn.turn_id, turn.created_at
    # A draft's fields then these three are a Message's, in its order.
    return [
        trusted_copy(draft, Message, seq=first_seq + i, turn_id=turn_id, created_at=created_at)
        for i, draft in enumerate(turn.messages)
    ]


def check_owner(
    conv: Conversation, user_name: str | None, sys_code: str | None, owned_only: bool = False
) -> None:
    """Refuse a conversation of another user_name or sys_code (with
    ``owned_only``, also one without a user_name)."""
    if owned_only and conv.user_name is None:
        raise PermissionDeniedError(
            f"conversation {conv.conv_uid!r} has no owner; only an operator may use it"
        )
    if user_name is not None and conv.user_name is not None and conv.user_name != user_name:
        raise PermissionDeniedError(f"conversation {shown(conv.conv_uid)} belongs to another user")
    if sys_code is not None and conv.sys_code is not None and conv.sys_code != sys_code:
        raise PermissionDeniedError(f"conversation {shown(conv.conv_uid)} belongs to another sys_code")


def check_turn_owner(conv: Conversation, turn: TurnWrite) -> None:
    """:func:`check_owner` for an append to ``conv``. The engine checks when
    it reads the conversation; a store checks again, in the write, because
    a conversation another user creates in between must not take the turn."""
    check_owner(conv, turn.user_name, turn.sys_code, turn.owned_only)


def apply_turn(conv: Conversation | None, turn: TurnWrite) -> Conversation:
    """The conversation's metadata after ``turn`` (creating it if None)."""
    added = sum(m.token_count for m in turn.messages)
    if conv is None:
        return trusted(
            Conversation,
            conv_uid=turn.conv_uid,
            user_name=turn.user_name,
            sys_code=turn.sys_code,
            chat_mode=turn.chat_mode,
            chat_param=turn.chat_param,
            model=turn.model,
            encoding=turn.encoding,
            system=turn.system or (),
            created_at=turn.created_at,
            updated_at=turn.created_at,
            message_count=len(turn.messages),
            total_tokens=added,
        )
    return trusted_copy(
        conv,
        Conversation,
        chat_mode=turn.chat_mode,
        chat_param=turn.chat_param,
        model=turn.model or conv.model,
        system=conv.system if turn.system is None else turn.system,
        updated_at=max(conv.updated_at, turn.created_at),
        message_count=conv.message_count + len(turn.messages),
        total_tokens=conv.total_tokens + added,
    )


def turn_record(turn: TurnWrite, messages: Sequence[Message]) -> TurnRecord:
    return trusted(
        TurnRecord,
        conv_uid=turn.conv_uid,
        turn_id=turn.turn_id,
        model=turn.model,
        prompt_tokens=turn.prompt_tokens,
        completion_tokens=turn.completion_tokens,
        finish_reason=turn.finish_reason,
        created_at=turn.created_at,
        messages=tuple(messages),
        params=turn.params,
    )


def conflict_message(conv_uid: str, expected: int, actual: int) -> str:
    return (
        f"conversation {shown(conv_uid)} is at seq {actual}, not {expected}: another turn was appended first"
    )


def tail_start(token_counts: Sequence[int], max_tokens: int) -> int:
    """Index where the longest suffix of ``token_counts`` summing to at most
    ``max_tokens`` begins (``len`` when not even the last one fits)."""
    total = 0
    i = len(token_counts)
    while i > 0 and total + token_counts[i - 1] <= max_tokens:
        total += token_counts[i - 1]
        i -= 1
    return i
