"""The in-memory store: the reference implementation of the store contract.

A ``threading.Lock`` guards each operation, and no operation awaits while
holding it, so one store can be shared by tasks on several event loops and
by threads at once. The tail read uses cumulative token counts and bisection,
so its cost follows the window, not the history.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from .errors import ConflictError
from .models import AppendResult, Conversation, Message, TurnContext, TurnRecord, TurnWrite, trusted
from .records import MemoryRecordStore
from .storekit import apply_turn, check_turn_owner, conflict_message, number_messages, turn_record

__all__ = ["MemoryStore"]


@dataclass
class _Log:
    conv: Conversation
    messages: list[Message] = field(default_factory=list)
    # cum_before[i] = tokens of messages[0:i]; non-decreasing, so bisectable.
    cum_before: list[int] = field(default_factory=list)
    turns: dict[str, TurnRecord] = field(default_factory=dict)


class MemoryStore:
    """Conversations, and in :attr:`records` the chat modes' records, in this
    process's memory; gone when it exits."""

    def __init__(self) -> None:
        self._logs: dict[str, _Log] = {}
        self._lock = threading.Lock()
        self.records = MemoryRecordStore()

    async def get_conversation(self, conv_uid: str) -> Conversation | None:
        log = self._logs.get(conv_uid)
        return log.conv if log else None

    async def append_turn(self, turn: TurnWrite) -> AppendResult:
        with self._lock:
            log = self._logs.get(turn.conv_uid)
            if log is not None:
                check_turn_owner(log.conv, turn)
            if log is not None and turn.turn_id in log.turns:
                return AppendResult(conversation=log.conv, turn=log.turns[turn.turn_id], duplicate=True)
            last_seq = log.conv.message_count if log else 0
            if turn.expect_last_seq is not None and turn.expect_last_seq != last_seq:
                raise ConflictError(conflict_message(turn.conv_uid, turn.expect_last_seq, last_seq))
            conv = apply_turn(log.conv if log else None, turn)
            if log is None:
                log = self._logs[turn.conv_uid] = _Log(conv=conv)
            messages = number_messages(turn, last_seq + 1)
            total = log.conv.total_tokens if log.messages else 0
            for m in messages:
                log.cum_before.append(total)
                total += m.token_count
            log.messages.extend(messages)
            log.conv = conv
            record = log.turns[turn.turn_id] = turn_record(turn, messages)
            return trusted(AppendResult, conversation=conv, turn=record, duplicate=False)

    async def get_turn(self, conv_uid: str, turn_id: str) -> TurnRecord | None:
        log = self._logs.get(conv_uid)
        return log.turns.get(turn_id) if log else None

    async def read_tail(self, conv_uid: str, max_tokens: int) -> list[Message]:
        with self._lock:
            log = self._logs.get(conv_uid)
            if log is None or max_tokens < 0:
                return []
            start = bisect.bisect_left(log.cum_before, log.conv.total_tokens - max_tokens)
            return log.messages[start:]

    async def read_context(
        self, conv_uid: str, max_tokens: int, *, turn_id: str | None = None
    ) -> TurnContext:
        with self._lock:
            log = self._logs.get(conv_uid)
            if log is None:
                return TurnContext(conversation=None)
            turn = log.turns.get(turn_id) if turn_id is not None else None
            start = bisect.bisect_left(log.cum_before, log.conv.total_tokens - max(max_tokens, 0))
            tail = log.messages[start:] if max_tokens >= 0 and turn is None else []
            return TurnContext(conversation=log.conv, tail=tuple(tail), turn=turn)

    async def read_messages(
        self, conv_uid: str, *, start_seq: int = 1, limit: int | None = None
    ) -> list[Message]:
        with self._lock:
            log = self._logs.get(conv_uid)
            if log is None:
                return []
            start = max(start_seq, 1) - 1
            end = None if limit is None else start + max(limit, 0)
            return log.messages[start:end]

    async def list_conversations(
        self,
        *,
        user_name: str | None = None,
        sys_code: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> list[Conversation]:
        with self._lock:
            convs = [
                log.conv
                for log in self._logs.values()
                if (user_name is None or log.conv.user_name == user_name)
                and (sys_code is None or log.conv.sys_code == sys_code)
            ]
        convs.sort(key=lambda c: (c.updated_at, c.conv_uid), reverse=True)
        return convs[offset : offset + limit]

    async def delete_conversation(self, conv_uid: str) -> bool:
        with self._lock:
            return self._logs.pop(conv_uid, None) is not None

    async def aclose(self) -> None:
        return None
