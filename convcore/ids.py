"""Fresh random ids: the conv_uids and turn ids the engine mints, and the
service's request ids."""

from __future__ import annotations

import os

__all__ = ["random_id"]

# uuid4's version (4) and variant (RFC 4122) bits, over 128 random bits.
_CLEAR = ~(0xF000 << 64 | 0xC000 << 48)
_SET = 4 << 76 | 0x8000 << 48


def random_id() -> str:
    """``uuid.uuid4().hex``: the same bits and format, without building a
    UUID object, which costs twice as much (one or two are made every turn)."""
    return f"{int.from_bytes(os.urandom(16)) & _CLEAR | _SET:032x}"
