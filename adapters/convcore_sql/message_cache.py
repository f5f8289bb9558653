"""Messages decoded from the store's rows, kept by the rows' values.

Every turn reads back the window the previous turn read, so most of a
tail's rows were decoded (JSON, then a validated ``Message``) a moment
ago. The key is the row's values themselves, every column of the message,
so an entry is exactly what decoding that row again would give: it can
never be stale, whatever was deleted or rewritten in between.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

from convcore.models import Message

from .statements import CONV_COLUMNS, MSG_COLUMNS

__all__ = ["RawMessageCache", "decode_message"]

_TAIL = len(CONV_COLUMNS) + 1  # a context row: the conversation, the turn's first seq, a message
_WIDTH = len(MSG_COLUMNS)
_SEQ = MSG_COLUMNS.index("seq")


class RawMessageCache:
    """At most ``capacity`` messages and ``max_chars`` characters of content
    (a message over a quarter of that is decoded but not kept); the oldest
    entries go first. ``capacity=0`` keeps nothing."""

    def __init__(self, capacity: int = 16_384, max_chars: int = 64 * 1024 * 1024) -> None:
        self.capacity = capacity
        self.max_chars = max_chars
        self._entries: dict[tuple[Any, ...], Message] = {}
        self._chars = 0

    def tail(self, rows: Sequence[Sequence[Any]]) -> list[Message]:
        """The messages of the joined ``context`` statement's rows as
        SQLAlchemy decodes them, in seq order (the join returns them in no
        promised order; a missing tail is one row of NULLs)."""
        out = [self.message(row, _TAIL) for row in rows if row[_TAIL + _SEQ] is not None]
        out.sort(key=attrgetter("seq"))
        return out

    def message(
        self,
        row: Sequence[Any],
        at: int = 0,
        *,
        raw: bool = False,
        process: Callable[[Sequence[Any]], Sequence[Any]] | None = None,
    ) -> Message:
        """The message in ``row`` at positions ``at``… (MSG_COLUMNS).
        ``process``: what turns the row's values into the decoded ones
        (rows read through the driver); a hit skips it, the key being the
        values as read."""
        values = tuple(row[at : at + _WIDTH])
        message = self._entries.get(values) if raw or _hashable(values) else None
        if message is None:
            message = decode_message(values if process is None else process(values), raw=raw)
            if raw or _hashable(values):
                self._keep(values, message)
        return message

    def _keep(self, values: tuple[Any, ...], message: Message) -> None:
        size = len(message.content)
        if self.capacity and size * 4 <= self.max_chars and values not in self._entries:
            self._entries[values] = message
            self._chars += size
            while len(self._entries) > self.capacity or self._chars > self.max_chars:
                oldest = next(iter(self._entries))
                self._chars -= len(self._entries.pop(oldest).content)


def _hashable(values: tuple[Any, ...]) -> bool:
    """Decoded rows hold lists in the JSON columns: those are not kept."""
    return values[9] is None and values[10] is None


def decode_message(row: Sequence[Any], at: int = 0, *, raw: bool = False) -> Message:
    """The message in ``row`` at positions ``at``… (MSG_COLUMNS); ``raw``:
    its JSON columns are still text."""
    v = row[at : at + _WIDTH]
    return Message(
        role=v[0],
        content=v[1],
        name=v[2],
        tool_call_id=v[3],
        token_count=v[4],
        starts_round=bool(v[5]),
        seq=v[6],
        turn_id=v[7],
        created_at=v[8],
        parts=json.loads(v[9]) if raw and v[9] is not None else v[9],
        tool_calls=json.loads(v[10]) if raw and v[10] is not None else v[10],
    )
