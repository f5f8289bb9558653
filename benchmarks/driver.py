"""The seam between workloads and what they load: a :class:`Driver`.

A workload only ever runs turns, pre-fills a conversation and reads it back;
every target (a store through the library, the HTTP service, an external
endpoint) and every floor (the least a turn can cost on the same store)
implements these three calls, so each plugs into the same workloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from convcore import Message

__all__ = ["Ack", "Driver", "ReadBack", "TurnText", "prefill_content", "reply_for"]


@dataclass(frozen=True)
class Ack:
    """What a driver was told about a turn that succeeded."""

    turn_id: str | None  # None when the far side does not say
    conv_uid: str


@dataclass
class ReadBack:
    """A conversation as stored: full messages when the driver can see the
    store, else just roles and contents in order (an external endpoint)."""

    messages: Sequence[Message] | None = None
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (role, content), oldest first


class Driver(Protocol):
    """What a workload needs; targets and floors both implement it."""

    name: str

    async def turn(self, conv_uid: str, text: str) -> Ack:
        """One whole turn: ``text`` in, a reply out, both stored. Raises on failure."""
        ...

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        """Append ``count`` history messages (user/assistant alternating, from
        index ``start``) as fast as the store allows; return the turn ids written."""
        ...

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        """The stored conversation, or None when this driver cannot read it."""
        ...


@dataclass(frozen=True)
class TurnText:
    """How big the generated messages are, so target and floor move the same bytes."""

    input_words: int = 12
    history_tokens: int = 120  # per pre-filled message: big enough that H=100 already fills the window

    def user(self, tag: str) -> str:
        """A unique user message (the audit relies on inputs being unique)."""
        return f"{tag}: " + " ".join(_WORDS[i % len(_WORDS)] for i in range(self.input_words))


_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def reply_for(text: str) -> str:
    """The reply a floor stores: the shape of the local backend's echo."""
    return f"You said: {text}"


def prefill_content(run_tag: str, index: int, tokens: int) -> tuple[str, str]:
    """Role and unique content of pre-filled message ``index`` (about ``tokens`` tokens)."""
    role = "user" if index % 2 == 0 else "assistant"
    words = max(tokens - 8, 1)
    body = " ".join(_WORDS[(index + i) % len(_WORDS)] for i in range(words))
    return role, f"{run_tag} h{index}: {body}"
