"""Bearer API keys, several at once, compared in constant time.

Clients send ``Authorization: Bearer <key>`` (curl, the OpenAI SDK and
DB-GPT's client all do). Every configured key is compared with
:func:`hmac.compare_digest`, all of them every time, so neither the answer
time nor the order of the keys tells which key came close.

A key may be bound to a user (``user_keys={key: user_name}``): requests
with it act as that user whatever ``user_name`` they send, so one tenant's
key cannot read or continue another tenant's conversations.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from starlette.requests import HTTPConnection

from .errors import AuthenticationError
from .headers import raw_header

__all__ = ["APIKeyAuth"]

_SCHEME = b"bearer"


class APIKeyAuth:
    """Checks requests against a set of API keys.

    With no keys, ``allow_anonymous=True`` must be said explicitly: then every
    request passes. With no keys and no such choice the constructor refuses.
    """

    def __init__(
        self,
        keys: Iterable[str] | None = None,
        *,
        user_keys: Mapping[str, str] | None = None,
        allow_anonymous: bool = False,
    ) -> None:
        entries: list[tuple[bytes, str | None]] = [(k.encode("utf-8"), None) for k in (keys or ()) if k]
        entries += [(k.encode("utf-8"), user) for k, user in (user_keys or {}).items() if k and user]
        self._entries = tuple(entries)
        self._keys = tuple(key for key, _ in entries)
        if not self._keys and not allow_anonymous:
            raise ValueError("no API keys given; pass api_keys=[...] or allow_anonymous=True explicitly")
        self.allow_anonymous = allow_anonymous and not self._keys
        # The last header matched and its answer: a chat turn asks three times
        # (the key check, the acting user, whether the key is bound).
        self._last: tuple[bytes | None, tuple[bool, str | None]] = (None, (False, None))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _match(self, conn: HTTPConnection) -> tuple[bool, str | None]:
        """(authorized, the user the key is bound to)."""
        if not self._keys:
            return True, None
        # The raw header bytes: a str compare_digest would raise on non-ASCII input.
        raw = raw_header(conn.scope, b"authorization")
        if raw is None:
            return False, None
        last = self._last
        if last[0] is raw:  # the same header object, so the same answer; identity takes no secret's time
            return last[1]
        scheme, _, token = raw.strip().partition(b" ")
        token = token.strip()
        matched = False
        user: str | None = None
        for key, bound in self._entries:
            hit = hmac.compare_digest(token, key)
            matched |= hit
            if hit:
                user = bound
        ok = matched and scheme.lower() == _SCHEME
        answer = (ok, user if ok else None)
        self._last = (raw, answer)
        return answer

    def is_authorized(self, conn: HTTPConnection) -> bool:
        """True if the request carries one of the keys (or auth is off)."""
        return self._match(conn)[0]

    def user_of(self, conn: HTTPConnection) -> str | None:
        """The user the request's key is bound to; None for an unbound key."""
        return self._match(conn)[1]

    def check(self, conn: HTTPConnection) -> None:
        """Raise :class:`AuthenticationError` unless the request is authorized."""
        if not self.is_authorized(conn):
            has_header = raw_header(conn.scope, b"authorization") is not None
            raise AuthenticationError(
                "invalid API key" if has_header else "missing API key: send 'Authorization: Bearer <key>'"
            )
