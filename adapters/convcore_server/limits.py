"""Read timeouts and a connection limit for ``convcore serve``.

uvicorn times out only the wait for the next request on a kept-alive
connection (``timeout_keep_alive``): that timer is cancelled by the first
byte received, and nothing is armed when a connection opens. A client that
connects and says nothing, or sends part of a request line and waits, holds
a file descriptor for ever; 2,000 of them cost the server 2,000 descriptors.
Its ``limit_concurrency`` answers 503 only once a request's headers have
arrived, so idle connections count against it without ever being closed.

:func:`guarded_h11` is uvicorn's own h11 protocol with three guards added,
passed to uvicorn as its ``http`` protocol class (so the rest of uvicorn is
unchanged):

- ``header_timeout``: the request line and headers must arrive within this
  many seconds of the connection opening (or of the first byte of a later
  request on it); otherwise 408 and close. It is a deadline, not an idle
  timer, so sending one byte at a time does not extend it.
- ``body_timeout``: while a request body is being read, the client may pause
  at most this long between pieces; otherwise the connection is closed (the
  route sees the client gone and stores nothing).
- ``max_connections``: a connection over this many open ones is answered 503
  and closed at once, before anything is read.

Another server (hypercorn, granian) was not chosen: these guards need only
uvicorn's public protocol-class option, keep the one server the package
already depends on, and are covered by tests against ``convcore serve``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .logs import current_request, request_of

__all__ = ["LIMITS_ENV", "ConnectionLimits", "GuardedH11Protocol", "RefusalLog", "guarded_h11"]

LIMITS_ENV = "CONVCORE_CONNECTION_LIMITS"

log = logging.getLogger("convcore_server")

_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 21\r\n"
    b"retry-after: 1\r\nconnection: close\r\n\r\ntoo many connections\n"
)


@dataclass(frozen=True)
class ConnectionLimits:
    """Seconds for a request's head, seconds between body pieces, open connections."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024


def _limits_from_env() -> ConnectionLimits:
    raw = os.environ.get(LIMITS_ENV)
    return ConnectionLimits(**json.loads(raw)) if raw else ConnectionLimits()


class RefusalLog:
    """At most one warning every ``every`` seconds about refused connections,
    with how many there were: a flood of connections must not flood the log."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._last: float | None = None
        self._unsaid = 0

    def refused(self, limit: int, now: float) -> None:
        self._unsaid += 1
        if self._last is None or now - self._last >= self.every:
            log.warning("refused %d connection(s): %d are open already", self._unsaid, limit)
            self._last, self._unsaid = now, 0


_refusals = RefusalLog()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with :attr:`limits` enforced; by default the
    limits in ``$CONVCORE_CONNECTION_LIMITS``, so spawned worker processes,
    which import this class by name, find the ones their parent set."""

    limits: ClassVar[ConnectionLimits] = _limits_from_env()
    _guard: asyncio.TimerHandle | None = None
    _waiting_for: str = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            _refusals.refused(self.limits.max_connections, self.loop.time())
            transport.write(_BUSY)
            transport.close()
            return
        self._arm("head", self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive wait for the next request
        self._disarm()

    def _follow(self) -> None:
        """Arm the guard for what the connection now waits for from the client."""
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._waiting_for != "head":  # a new request started: its head has a deadline
                self._arm("head", self.limits.header_timeout)
        elif state is h11.SEND_BODY:
            self._arm("body", self.limits.body_timeout)  # an idle timer: every piece resets it
        else:
            self._disarm()

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting_for = what
        self._guard = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard = None
        self._waiting_for = ""

    def _expired(self) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        if self._waiting_for == "body" and self.flow.read_paused:
            # The app has not read what was sent: the client is not the slow one.
            self._arm("body", self.limits.body_timeout)
            return
        if self._waiting_for == "head":
            self.transport.write(_TIMEOUT)
        # A body belongs to a request: its line carries that request's id.
        request = request_of(getattr(self, "scope", None)) if self._waiting_for == "body" else None
        token = current_request.set(request) if request is not None else None
        try:
            log.info("closed a connection: no request %s within the timeout", self._waiting_for)
        finally:
            if token is not None:
                current_request.reset(token)
        self._waiting_for = ""
        self.transport.close()


def guarded_h11(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with ``limits`` enforced."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
