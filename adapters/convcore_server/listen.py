"""One listening socket per worker process, so the kernel spreads connections evenly.

Under uvicorn's supervisor every worker accepts on one shared socket, and
a worker that wakes up accepts every connection waiting (asyncio takes up
to its backlog per wake-up). Clients that open their keep-alive pool in a
burst, as load balancers and benchmark clients do, land mostly on one
worker: 64 connections to two workers split 58/6, 49/15 and 47/17 in three
tries here, so one process did most of the work while the other idled.

With ``SO_REUSEPORT`` each worker listens on a socket of its own bound to
the same address, from the moment it starts, and Linux hands each new
connection to one of them by a hash of its addresses: an even share
whatever the timing, even for a pool opened while a worker still loads its
app (those connections wait in its queue). The supervisor
keeps one socket bound (never listening, so it gets no connections) to
hold the port for workers it restarts. Elsewhere (``SO_REUSEPORT`` on the
BSDs and macOS gives every connection to the newest socket, and Windows has
none) the workers share the supervisor's socket as before.

One cost, as with any per-worker socket: connections still waiting in a
stopping worker's queue are reset rather than taken by another worker.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

__all__ = ["WorkerSocket", "balances_connections", "worker_socket"]


def balances_connections() -> bool:
    """Whether sockets sharing a port with ``SO_REUSEPORT`` share its connections here."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _bound(family: int, address: Any, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _rebind(family: int, address: Any, backlog: int) -> socket.socket:
    """In a worker, as it starts: a socket of its own on the supervisor's
    address, listening at once. Connections the kernel deals it while the
    worker is still loading its app wait in its queue; were it to listen
    only once ready (as uvicorn does), a client that opens its pool as soon
    as the first worker answers would put every connection on that one
    (64 of 64 in a try here) and keep them there."""
    sock = _bound(family, address, reuse_port=True)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class WorkerSocket(socket.socket):
    """The supervisor's socket, bound with ``SO_REUSEPORT``. Handed to a
    spawned worker (by pickling), it arrives as a new socket bound to the
    same address, which that worker alone listens on."""

    backlog = 2048

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return _rebind, (self.family, self.getsockname(), self.backlog)


def worker_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The socket a supervisor hands its workers: a :class:`WorkerSocket`
    where the kernel balances connections (each worker listening with
    ``backlog``), else a plain socket they share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not balances_connections():
        sock = _bound(family, (host, port), reuse_port=False)
    else:
        plain = _bound(family, (host, port), reuse_port=True)
        balanced = WorkerSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        balanced.backlog = backlog
        sock = balanced
    sock.set_inheritable(True)
    return sock
