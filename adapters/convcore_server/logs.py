"""Log lines that say which request they belong to, as text or JSON.

Every line logged while a request runs (ours, uvicorn's access line, a
driver's warning) carries that request's ``request_id`` (the client's
``X-Request-Id``, or one minted here, sent back in the response) and the
``span_id`` the chat request named, through :class:`RequestContextFilter`.
``convcore serve --log-format json`` writes one JSON object a line.

Secrets do not reach the access log: query parameters that look like keys
(``api_key``, ``key``, ``token``, ...) are replaced by ``***`` there.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from convcore.ids import random_id

__all__ = [
    "SCOPE_KEY",
    "JSONFormatter",
    "RedactQueryFilter",
    "RequestContext",
    "RequestContextFilter",
    "current_request",
    "current_request_id",
    "log_config",
    "request_id_from",
    "request_of",
]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Anywhere in the name, any case (apikey, apiKey, access_token, X-Auth...): a
# harmless parameter masked by mistake costs less than a key in the log.
_SECRET_PARAM = re.compile(r"(?i)key|token|secret|passw|pwd|auth|signature|bearer|session|credential|cookie")
# What users write, which some clients send as query parameters (DB-GPT's
# sends a document's text so): it is theirs, not the operator's log's.
_TEXT_PARAM = re.compile(r"(?i)^(content|text|doc_content|question|prompt|messages|user_input)$")
_LOGGED_VALUE = 100  # characters of any other value kept in the access log


@dataclass
class RequestContext:
    """What the log lines and spans of one request share."""

    request_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def span_id(self) -> str | None:
        value = self.attributes.get("span_id")
        return value if isinstance(value, str) else None


current_request: ContextVar[RequestContext | None] = ContextVar("convcore_request", default=None)

# The request's context in its ASGI scope too, for what runs outside the
# request's task but logs about it (the connection guards' timers).
SCOPE_KEY = "convcore.request"


def request_of(scope: dict[str, Any] | None) -> RequestContext | None:
    found = (scope or {}).get(SCOPE_KEY)
    return found if isinstance(found, RequestContext) else None


def request_id_from(header: str | None) -> str:
    """The client's request id if it is a sane token, else a new one
    (:func:`convcore.ids.random_id`, as ``uuid4().hex`` writes it)."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header
    return random_id()


def current_request_id() -> str:
    """The id of the request being answered, the one its log lines and its
    ``X-Request-Id`` response header carry; a new one outside a request, so
    read it once per request and keep it."""
    ctx = current_request.get()
    return ctx.request_id if ctx is not None else random_id()


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``span_id`` (``-`` outside a request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_request.get()
        record.request_id = ctx.request_id if ctx is not None else "-"
        record.span_id = (ctx.span_id if ctx is not None else None) or "-"
        return True


class RedactQueryFilter(logging.Filter):
    """Hides key-like and user-text query parameters in uvicorn's access
    log line, and cuts long values: the line stays short and holds no
    secret and nothing a user wrote."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_query(path: str) -> str:
    base, _, query = path.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    shown = [(k, _shown_value(k, v)) for k, v in pairs]
    if shown == pairs:
        return path
    return base + "?" + urlencode(shown, safe="*")


def _shown_value(name: str, value: str) -> str:
    if _SECRET_PARAM.search(name) or _TEXT_PARAM.match(name):
        return "***"
    if len(value) > _LOGGED_VALUE:
        return f"{value[:_LOGGED_VALUE]}***"
    return value


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, span_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "span_id": getattr(record, "span_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


JSONFormatter.converter = time.gmtime


def log_config(fmt: str = "text", level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``convcore serve`` (uvicorn's ``log_config``)."""
    text = "%(asctime)s %(levelname)s %(name)s [request_id=%(request_id)s span_id=%(span_id)s] %(message)s"
    formatter: dict[str, Any] = {"()": f"{__name__}.JSONFormatter"} if fmt == "json" else {"format": text}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "main",
        "filters": ["context"],
        "stream": "ext://sys.stderr",
    }
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": f"{__name__}.RequestContextFilter"},
            "redact": {"()": f"{__name__}.RedactQueryFilter"},
        },
        "formatters": {"main": formatter},
        "handlers": {
            "main": handler,
            "access": {**handler, "filters": ["context", "redact"]},
        },
        "loggers": {
            "uvicorn": {"handlers": ["main"], "level": upper, "propagate": False},
            "uvicorn.error": {"level": upper},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["main"], "level": upper},
    }
