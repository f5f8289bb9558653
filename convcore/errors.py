"""The one exception tree of convcore.

Every error the library raises on purpose derives from :class:`ConvcoreError`,
so callers can catch one type; adapters map their drivers' errors onto these
at their edge and chain the original with ``from``::

    ConvcoreError
    ├── InvalidRequestError          bad input; names the field and the reason
    │   ├── UnknownModelError        model name not in the registry
    │   └── UnsupportedChatModeError chat_mode with no scene behind it
    ├── ContextOverflowError         the newest input cannot fit the budget
    ├── ConversationNotFoundError
    ├── PermissionDeniedError        the conversation belongs to another user
    ├── ConflictError                a serialised append lost its race too often
    │   └── HistoryConflictError     a resent history differs from the stored one
    ├── StorageError                 the store failed
    │   └── StorageUnavailableError  the store cannot be reached
    ├── BackendError                 the model backend failed
    │   ├── BackendUnavailableError  cannot connect, or retries ran out
    │   │   └── BackendRateLimitedError  the upstream kept answering 429
    │   └── BackendTimeoutError
    ├── TokenizerError               no encoding can be loaded offline
    └── MissingDependencyError       an optional extra is not installed

HTTP status codes for each live in the HTTP adapter, in one table.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendRateLimitedError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "ConflictError",
    "ContextOverflowError",
    "ConvcoreError",
    "ConversationNotFoundError",
    "ForkPointError",
    "HistoryConflictError",
    "InvalidRequestError",
    "MissingDependencyError",
    "PermissionDeniedError",
    "StorageError",
    "StorageUnavailableError",
    "TokenizerError",
    "UnknownModelError",
    "UnsupportedChatModeError",
    "shown",
]


def shown(value: str, limit: int = 120) -> str:
    """``value`` quoted for a message, its middle cut when long: errors are
    logged and sent back, and must not echo a 20,000-character input."""
    if len(value) <= limit:
        return repr(value)
    half = limit // 2
    return f"{value[:half]!r}…{value[-half:]!r} ({len(value):,} characters)"


class ConvcoreError(Exception):
    """Root of every error convcore raises on purpose."""


class InvalidRequestError(ConvcoreError):
    """The input is malformed; ``field`` names where, the message says why."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class UnknownModelError(InvalidRequestError):
    """The requested model is not registered."""

    def __init__(self, model: str, known: list[str]) -> None:
        self.model = model
        self.known = known
        super().__init__(
            f"unknown model {shown(model)}; registered models: {', '.join(sorted(known)) or 'none'}",
            field="model",
        )


class UnsupportedChatModeError(InvalidRequestError):
    """The chat_mode has no scene registered for it."""

    def __init__(self, chat_mode: str, known: list[str]) -> None:
        self.chat_mode = chat_mode
        super().__init__(
            f"chat_mode {shown(chat_mode)} is not available; available: {', '.join(sorted(known))}",
            field="chat_mode",
        )


class ContextOverflowError(ConvcoreError):
    """Even the newest input, with the reply reserved, exceeds the context window."""

    def __init__(
        self,
        *,
        model: str,
        context_window: int,
        max_new_tokens: int,
        required_tokens: int,
    ) -> None:
        self.model = model
        self.context_window = context_window
        self.max_new_tokens = max_new_tokens
        self.required_tokens = required_tokens
        super().__init__(
            f"the prompt needs at least {required_tokens} tokens (system messages and the "
            f"newest input) and max_new_tokens reserves {max_new_tokens}, "
            f"{required_tokens + max_new_tokens} in all, but model {shown(model)} has a "
            f"context window of {context_window}; shorten the input or lower max_new_tokens"
        )


class ConversationNotFoundError(ConvcoreError):
    """No conversation has this conv_uid."""

    def __init__(self, conv_uid: str) -> None:
        self.conv_uid = conv_uid
        super().__init__(f"conversation {shown(conv_uid)} does not exist")


class PermissionDeniedError(ConvcoreError):
    """The conversation exists but belongs to another user_name or sys_code."""


class ConflictError(ConvcoreError):
    """A conditional append found the conversation moved on (serialised turns)."""


class HistoryConflictError(ConflictError):
    """A request resent a conversation's history that is not the stored one:
    ``field`` names the request's first differing message (``messages.<i>``)
    and ``seq`` the stored message it differs from (or, when the request
    holds nothing new, the first stored message it lacks)."""

    def __init__(self, message: str, *, field: str, seq: int) -> None:
        self.field = field
        self.seq = seq
        super().__init__(f"{field}: {message}")


class ForkPointError(ConflictError):
    """``up_to_seq`` is well formed but the conversation as stored has no
    such fork point (past its last message, or between tool results)."""

    def __init__(self, message: str) -> None:
        self.field = "up_to_seq"
        super().__init__(message)


class StorageError(ConvcoreError):
    """The store failed; the turn in flight was not stored."""


class StorageUnavailableError(StorageError):
    """The store cannot be reached (connection refused, reset, timed out)."""


class BackendError(ConvcoreError):
    """The model backend failed; nothing of the turn was stored."""


class BackendUnavailableError(BackendError):
    """The backend cannot be reached, or answered errors until retries ran out."""


class BackendRateLimitedError(BackendUnavailableError):
    """The upstream answered 429 (rate limited) until retries ran out.

    Told to clients as a rate limit, not a server fault, so they back off;
    ``retry_after`` is the upstream's ``Retry-After`` in seconds, if it sent one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class BackendTimeoutError(BackendError):
    """The backend did not answer in time."""


class TokenizerError(ConvcoreError):
    """An encoding cannot be loaded without the network."""


class MissingDependencyError(ConvcoreError, ImportError):
    """An optional extra is needed; the message names the pip command."""

    def __init__(self, what: str, extra: str) -> None:
        self.extra = extra
        super().__init__(f'{what} needs the {extra!r} extra: pip install "convcore[{extra}]"')
