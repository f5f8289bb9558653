"""Deliberately broken stores, to prove the audit catches damage (``--fault``).

Each wraps a real store and passes everything through except, on every
``every``-th append, the damage it is named for. A run with one of these
must end with a non-zero exit and a report naming the damage.
"""

from __future__ import annotations

import itertools
from typing import Any

from convcore import AppendResult, TurnWrite
from convcore.storekit import apply_turn, number_messages, turn_record

__all__ = ["FAULTS", "DroppingStore", "SplittingStore"]


class _Wrapper:
    def __init__(self, inner: Any, every: int = 5) -> None:
        self.inner = inner
        self.every = every
        self._n = itertools.count(1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _hit(self) -> bool:
        return next(self._n) % self.every == 0


class DroppingStore(_Wrapper):
    """Acknowledges every ``every``-th append without storing it: lost turns."""

    async def append_turn(self, turn: TurnWrite) -> AppendResult:
        if not self._hit():
            result: AppendResult = await self.inner.append_turn(turn)
            return result
        conv = await self.inner.get_conversation(turn.conv_uid)
        first = (conv.message_count if conv else 0) + 1
        messages = number_messages(turn, first)
        return AppendResult(
            conversation=apply_turn(conv, turn), turn=turn_record(turn, messages), duplicate=False
        )


class SplittingStore(_Wrapper):
    """Stores every ``every``-th turn's input and reply as two separate turns: split turns."""

    async def append_turn(self, turn: TurnWrite) -> AppendResult:
        if not self._hit() or len(turn.messages) < 2:
            result: AppendResult = await self.inner.append_turn(turn)
            return result
        head = turn.model_copy(update={"messages": turn.messages[:-1]})
        reply = turn.model_copy(update={"messages": turn.messages[-1:], "turn_id": f"{turn.turn_id}:reply"})
        await self.inner.append_turn(head)
        second: AppendResult = await self.inner.append_turn(reply)
        record = turn_record(turn, second.turn.messages)
        return AppendResult(conversation=second.conversation, turn=record, duplicate=False)


FAULTS = {"drop": DroppingStore, "split": SplittingStore}
