"""Builders shared by the tests."""

from __future__ import annotations

import itertools
import time

from convcore import ConversationStore, MessageDraft, TurnWrite
from convcore.audit import audit_messages

_clock = itertools.count(1)


def draft(role: str, content: str, tokens: int | None = None, starts_round: bool = False) -> MessageDraft:
    return MessageDraft(
        role=role,  # type: ignore[arg-type]
        content=content,
        token_count=len(content) + 4 if tokens is None else tokens,
        starts_round=starts_round,
    )


def turn(
    conv_uid: str,
    turn_id: str,
    question: str = "q",
    answer: str = "a",
    *,
    tokens: tuple[int | None, int | None] = (None, None),
    system: tuple[MessageDraft, ...] | None = None,
    expect_last_seq: int | None = None,
    user_name: str | None = None,
    sys_code: str | None = None,
    created_at: float | None = None,
    owned_only: bool = False,
) -> TurnWrite:
    """A one-round turn: a user question and its answer."""
    return TurnWrite(
        conv_uid=conv_uid,
        turn_id=turn_id,
        messages=(
            draft("user", question, tokens[0], starts_round=True),
            draft("assistant", answer, tokens[1]),
        ),
        system=system,
        encoding="cl100k_base",
        model="m",
        user_name=user_name,
        sys_code=sys_code,
        prompt_tokens=10,
        completion_tokens=5,
        expect_last_seq=expect_last_seq,
        created_at=created_at if created_at is not None else time.time() + next(_clock) * 1e-3,
        owned_only=owned_only,
    )


async def assert_race_kept_every_turn(
    store: ConversationStore, conv_uid: str, acknowledged: list[str]
) -> None:
    """After writers raced one-round turns at ``conv_uid``: every acknowledged
    turn stored once, whole, in gapless order, and the metadata agrees."""
    messages = await store.read_messages(conv_uid)
    conv = await store.get_conversation(conv_uid)
    report = audit_messages(messages, expected_turns=acknowledged, unique_inputs=True)
    assert report.ok, report.problems[:5]
    assert report.turns == len(acknowledged)
    assert len(messages) == 2 * len(acknowledged)
    assert conv is not None and conv.message_count == len(messages)
    assert conv.total_tokens == sum(m.token_count for m in messages)
