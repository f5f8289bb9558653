"""Request headers read straight off the ASGI scope.

Starlette's ``request.headers.get`` builds a mapping and, for a header that
is not there, raises and catches ``KeyError`` inside: several times the cost
of this scan, on every chat turn. ASGI servers give header names in lower
case, which is what Starlette compares with too.
"""

from __future__ import annotations

from starlette.types import Scope

__all__ = ["raw_header"]


def raw_header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) as sent, or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value  # type: ignore[no-any-return]
    return None
