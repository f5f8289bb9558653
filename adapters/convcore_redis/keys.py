"""Key names: every key of one conversation shares one hash tag.

The tag is the SHA-1 of the conv_uid, never the conv_uid itself, so any
string (braces, colons, glob characters, 1,000 characters of unicode) makes
a short, safe key, and all of a conversation's keys land in one Redis
Cluster slot. The listing indexes are keyed by digests too; they are not
tagged, so in a cluster they spread over the slots like any other key.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

__all__ = ["ConversationKeys", "IndexKeys", "RecordKeys", "check_prefix", "digest"]


def digest(text: str) -> str:
    """SHA-1 hex of ``text`` (lone surrogates included, so no str can fail)."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def check_prefix(prefix: str) -> str:
    """The prefix, refused if it could move the hash tag (a brace) or is empty."""
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError(f"a Redis key prefix must be non-empty and brace-free, got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class ConversationKeys:
    """The four keys of one conversation, all in the slot of ``{sha1(conv_uid)}``.

    - ``meta``: hash of the conversation's metadata (and its index key names);
    - ``msgs``: hash seq -> message JSON;
    - ``cum``: sorted set, member seq, score = tokens of all earlier messages
      (non-decreasing in seq, so the tail within a budget is one ZCOUNT away);
    - ``turns``: hash turn_id -> "<first seq> <count> <turn JSON>", the
      idempotency record.
    """

    meta: str
    msgs: str
    cum: str
    turns: str

    @classmethod
    def of(cls, prefix: str, conv_uid: str) -> ConversationKeys:
        return _conversation_keys(prefix, conv_uid)

    def all(self) -> list[str]:
        return [self.meta, self.msgs, self.cum, self.turns]


@functools.lru_cache(maxsize=4096)
def _conversation_keys(prefix: str, conv_uid: str) -> ConversationKeys:
    """Each turn names its conversation's keys twice: the digest once."""
    base = f"{prefix}:{{{digest(conv_uid)}}}"
    return ConversationKeys(
        meta=f"{base}:meta", msgs=f"{base}:msgs", cum=f"{base}:cum", turns=f"{base}:turns"
    )


@dataclass(frozen=True)
class IndexKeys:
    """Sorted sets of conv_uids scored by updated_at, one per listing filter.

    A conversation's user_name and sys_code are fixed when it is created, so
    it belongs to the same (at most four) indexes all its life.
    """

    prefix: str

    @property
    def all(self) -> str:
        return f"{self.prefix}:idx:all"

    def user(self, user_name: str) -> str:
        return f"{self.prefix}:idx:user:{digest(user_name)}"

    def sys(self, sys_code: str) -> str:
        return f"{self.prefix}:idx:sys:{digest(sys_code)}"

    def user_sys(self, user_name: str, sys_code: str) -> str:
        return f"{self.prefix}:idx:user-sys:{digest(user_name)}:{digest(sys_code)}"

    def for_filters(self, user_name: str | None, sys_code: str | None) -> str:
        """The one index that answers a listing with these filters."""
        if user_name is not None and sys_code is not None:
            return self.user_sys(user_name, sys_code)
        if user_name is not None:
            return self.user(user_name)
        if sys_code is not None:
            return self.sys(sys_code)
        return self.all

    def of_conversation(self, user_name: str | None, sys_code: str | None) -> tuple[str, str, str]:
        """(user, sys, user+sys) index keys of a conversation; "" where it has none."""
        return _conversation_indexes(self, user_name, sys_code)


@functools.lru_cache(maxsize=4096)
def _conversation_indexes(
    index: IndexKeys, user_name: str | None, sys_code: str | None
) -> tuple[str, str, str]:
    """Every append names its conversation's indexes: the digests once."""
    return (
        index.user(user_name) if user_name is not None else "",
        index.sys(sys_code) if sys_code is not None else "",
        index.user_sys(user_name, sys_code) if user_name is not None and sys_code is not None else "",
    )


@dataclass(frozen=True)
class RecordKeys:
    """The keys of one record kind, all in the slot of ``{sha1(kind)}``, so
    every write is one script on one node:

    - ``values``: hash key -> record JSON;
    - ``order``: sorted set of every key, score 0 (so ordered by bytes, which
      is code-point order);
    - ``owners``: hash key -> the owner indexes the record is in, one per
      line (only owned records have an entry);
    - owner indexes, like ``order`` but holding only one owner's keys: per
      user_name, per sys_code and per both (names from their digests).
    """

    base: str

    @classmethod
    def of(cls, prefix: str, kind: str) -> RecordKeys:
        return cls(f"{prefix}:rec:{{{digest(kind)}}}")

    @property
    def values(self) -> str:
        return f"{self.base}:h"

    @property
    def order(self) -> str:
        return f"{self.base}:z"

    @property
    def owners(self) -> str:
        return f"{self.base}:o"

    def owner_indexes(self, user_name: str | None, sys_code: str | None) -> list[str]:
        """The owner indexes a record with this owner belongs to."""
        found = []
        if user_name is not None:
            found.append(f"{self.base}:u:{digest(user_name)}")
        if sys_code is not None:
            found.append(f"{self.base}:s:{digest(sys_code)}")
        if user_name is not None and sys_code is not None:
            found.append(f"{self.base}:us:{digest(user_name)}:{digest(sys_code)}")
        return found

    def listing(self, user_name: str | None, sys_code: str | None) -> str:
        """The one sorted set that answers a listing with these filters."""
        if user_name is None and sys_code is None:
            return self.order
        if user_name is not None and sys_code is not None:
            return f"{self.base}:us:{digest(user_name)}:{digest(sys_code)}"
        if user_name is not None:
            return f"{self.base}:u:{digest(user_name)}"
        return f"{self.base}:s:{digest(sys_code or '')}"
