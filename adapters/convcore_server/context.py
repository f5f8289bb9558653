"""What every route needs: the engine, the key check and the limits.

Routers are built by functions that take a :class:`ServerContext`, so they
close over it instead of reaching into ``app.state``; that keeps them usable
when included into another FastAPI app.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request

from convcore import Caller, Engine, PermissionDeniedError

from .auth import APIKeyAuth
from .openapi_doc import BEARER_SCHEME

__all__ = ["DEFAULT_MAX_MESSAGE_CHARS", "ServerContext", "conv_uid_header", "ok"]

DEFAULT_MAX_MESSAGE_CHARS = 200_000

# Declares the key in the OpenAPI document (components.securitySchemes and each
# keyed operation's security); the check itself is APIKeyAuth's.
_BEARER_DOC = HTTPBearer(
    auto_error=False,
    scheme_name=BEARER_SCHEME,
    description="An API key of the service, sent as `Authorization: Bearer <key>`",
)
_DECLARED_KEY = Security(_BEARER_DOC)


@dataclass(frozen=True)
class ServerContext:
    """The engine a service answers from, and how it guards the door."""

    engine: Engine
    auth: APIKeyAuth
    max_body_bytes: int
    max_message_chars: int
    started_at: int = field(default_factory=lambda: int(time.time()))

    async def require_api_key(
        self, request: Request, _declared: HTTPAuthorizationCredentials | None = _DECLARED_KEY
    ) -> None:
        """A FastAPI dependency: raises AuthenticationError (401) without a valid key."""
        self.auth.check(request)

    def acting_user(self, request: Request, given: str | None) -> str | None:
        """The user_name a request acts as: ``given``, unless its key is bound
        to a user; then that user, and another ``given`` is refused (403)."""
        bound = self.auth.user_of(request)
        if bound is None:
            return given
        if given is not None and given != bound:
            raise PermissionDeniedError(f"this API key acts for user {bound!r}, not {given!r}")
        return bound

    def is_bound(self, request: Request) -> bool:
        """Whether the request's key is bound to a user (it then reaches only that user's things)."""
        return self.auth.user_of(request) is not None

    def caller(self, request: Request, user_name: str | None = None, sys_code: str | None = None) -> Caller:
        """Who the request acts for (see :mod:`convcore.owners`); a bound key
        naming another ``user_name`` is refused (403)."""
        user = self.acting_user(request, user_name)
        return Caller(user, sys_code, bound=self.is_bound(request))


def ok(data: Any) -> dict[str, Any]:
    """DB-GPT's result envelope for a success: ``{success, err_code, err_msg, data}``."""
    return {"success": True, "err_code": None, "err_msg": None, "data": data}


def conv_uid_header(conv_uid: str) -> dict[str, str]:
    """The ``X-Conv-Uid`` header; percent-encoded (UTF-8) since a conv_uid may be any text."""
    return {"X-Conv-Uid": quote(conv_uid, safe="")}
