"""Who a call acts for, and what it may reach.

Conversations and the chat modes' records (apps, datasources, knowledge
spaces and documents, flows) carry an owner: ``user_name`` and ``sys_code``.

- A *bound* caller (an API key bound to a user) reaches only what carries
  its ``user_name``, and its ``sys_code`` when it names one. Whatever has no
  owner is out of its reach: nobody vouched that it was meant to be shared.
- An unbound caller (an operator's key, or the library called directly)
  reaches everything; a ``user_name`` / ``sys_code`` it names only narrows
  its listings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["OPERATOR", "Caller"]


@dataclass(frozen=True)
class Caller:
    """The identity a call acts as. ``bound``: the caller cannot choose it."""

    user_name: str | None = None
    sys_code: str | None = None
    bound: bool = False

    def reaches(self, value: Mapping[str, Any]) -> bool:
        """Whether a record (or conversation fields) with this owner is within reach."""
        if not self.bound:
            return True
        if value.get("user_name") is None or value.get("user_name") != self.user_name:
            return False
        return self.sys_code is None or value.get("sys_code") == self.sys_code

    def stamp(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """``fields`` with this caller's owner written over the owner they name."""
        mine = {"user_name": self.user_name, "sys_code": self.sys_code}
        return {**fields, **{k: v for k, v in mine.items() if v is not None}}


OPERATOR = Caller()
