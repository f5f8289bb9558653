"""Errors to HTTP: the one status table and the JSON error body.

Every error the service answers with is JSON carrying both dialects a client
may read: DB-GPT's ``success`` / ``err_code`` / ``err_msg`` and OpenAI's
``error`` object (``message``, ``type``, ``param``, ``code``)::

    {"success": false, "err_code": "model_not_found", "err_msg": "model: unknown model 'x'; ...",
     "error": {"message": "...", "type": "invalid_request_error", "param": "model",
               "code": "model_not_found"}}

The table is ordered most specific first; the first ``isinstance`` match wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convcore.errors import (
    BackendError,
    BackendRateLimitedError,
    BackendTimeoutError,
    ConflictError,
    ContextOverflowError,
    ConvcoreError,
    ConversationNotFoundError,
    InvalidRequestError,
    MissingDependencyError,
    PermissionDeniedError,
    StorageError,
    StorageUnavailableError,
    TokenizerError,
    UnknownModelError,
    UnsupportedChatModeError,
)
from convcore.observe import annotate

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "ERROR_TABLE",
    "AuthenticationError",
    "ErrorKind",
    "MessageTooLongError",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "RouteNotFoundError",
    "classify",
    "error_body",
]

# What nginx logs for a client that left before the answer; nobody reads it.
CLIENT_CLOSED_REQUEST = 499


class AuthenticationError(ConvcoreError):
    """No API key, or not one of the configured keys."""


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the service accepts."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        self.limit = limit
        got = f"is {size} bytes" if size is not None else "exceeds the limit"
        super().__init__(f"the request body {got}; the limit is {limit} bytes")


class MessageTooLongError(InvalidRequestError):
    """One message's content is longer than the service accepts."""

    def __init__(self, field: str, length: int, limit: int) -> None:
        super().__init__(f"is {length} characters long; the limit is {limit}", field=field)


class ModelNotFoundError(UnknownModelError):
    """A model asked for by name (``GET /models/{model}``) that is not registered: 404, as OpenAI answers."""


class RouteNotFoundError(ConvcoreError):
    """Starlette's 404/405 (no such path or method) in our error shape."""

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class ErrorKind:
    """How one class of error is answered."""

    status: int
    code: str  # err_code (DB-GPT) and error.code (OpenAI)
    type: str  # error.type (OpenAI)


# The one table. Most specific first.
ERROR_TABLE: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (AuthenticationError, ErrorKind(401, "invalid_api_key", "authentication_error")),
    (PayloadTooLargeError, ErrorKind(413, "payload_too_large", "invalid_request_error")),
    (MessageTooLongError, ErrorKind(400, "message_too_long", "invalid_request_error")),
    (ModelNotFoundError, ErrorKind(404, "model_not_found", "not_found_error")),
    (UnknownModelError, ErrorKind(400, "model_not_found", "invalid_request_error")),
    (UnsupportedChatModeError, ErrorKind(400, "unsupported_chat_mode", "invalid_request_error")),
    (InvalidRequestError, ErrorKind(400, "invalid_request", "invalid_request_error")),
    (ContextOverflowError, ErrorKind(400, "context_length_exceeded", "invalid_request_error")),
    (PermissionDeniedError, ErrorKind(403, "permission_denied", "permission_error")),
    (ConversationNotFoundError, ErrorKind(404, "conversation_not_found", "not_found_error")),
    (ConflictError, ErrorKind(409, "conflict", "conflict_error")),
    (StorageUnavailableError, ErrorKind(503, "storage_unavailable", "server_error")),
    (StorageError, ErrorKind(500, "storage_error", "server_error")),
    (BackendRateLimitedError, ErrorKind(429, "rate_limit_exceeded", "rate_limit_error")),
    (BackendTimeoutError, ErrorKind(504, "backend_timeout", "server_error")),
    (BackendError, ErrorKind(502, "backend_error", "server_error")),
    (TokenizerError, ErrorKind(500, "tokenizer_error", "server_error")),
    (MissingDependencyError, ErrorKind(500, "missing_dependency", "server_error")),
    (ConvcoreError, ErrorKind(500, "internal_error", "server_error")),
)

_ROUTE_KINDS = {
    404: ErrorKind(404, "not_found", "not_found_error"),
    405: ErrorKind(405, "method_not_allowed", "invalid_request_error"),
}
_INTERNAL = ErrorKind(500, "internal_error", "server_error")


def classify(exc: BaseException) -> ErrorKind:
    """The row of the table that answers ``exc``; 500 for anything unexpected."""
    if isinstance(exc, RouteNotFoundError):
        return _ROUTE_KINDS.get(exc.status, ErrorKind(exc.status, "http_error", "invalid_request_error"))
    for cls, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            return kind
    return _INTERNAL


def error_body(exc: BaseException, kind: ErrorKind | None = None) -> dict[str, Any]:
    """The JSON body for ``exc`` in both dialects."""
    kind = kind or classify(exc)
    annotate(error_code=kind.code)  # the request's metrics and span say how it failed
    message = str(exc) if isinstance(exc, ConvcoreError) else "internal server error"
    param = getattr(exc, "field", None)
    return {
        "success": False,
        "err_code": kind.code,
        "err_msg": message,
        "data": None,
        "error": {"message": message, "type": kind.type, "param": param, "code": kind.code},
    }
