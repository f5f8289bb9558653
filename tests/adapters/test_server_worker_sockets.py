"""Each worker of ``convcore serve --workers N`` listens on a socket of its
own, so the kernel shares a burst of connections out between them."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from multiprocessing.reduction import ForkingPickler

import pytest

from convcore_server import listen
from convcore_server.listen import WorkerSocket, balances_connections, worker_socket

linux_only = pytest.mark.skipif(not balances_connections(), reason="SO_REUSEPORT balances only on Linux")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _handed_over(sock: socket.socket) -> socket.socket:
    """``sock`` as a spawned worker receives it (pickled as multiprocessing does)."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(sock)
    received: socket.socket = ForkingPickler.loads(buf.getvalue())
    return received


@contextmanager
def _connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in range(n)
        ]


def _accept_all(sock: socket.socket) -> int:
    sock.setblocking(False)
    taken = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return taken
        conn.close()
        taken += 1


@linux_only
def test_each_worker_gets_a_socket_of_its_own_on_the_same_address() -> None:
    port = _free_port()
    with worker_socket("127.0.0.1", port) as supervisor:
        assert isinstance(supervisor, WorkerSocket)
        with _handed_over(supervisor) as first, _handed_over(supervisor) as second:
            assert first.getsockname() == second.getsockname() == ("127.0.0.1", port)
            assert first.fileno() != second.fileno() != supervisor.fileno()
            for sock in (supervisor, first, second):
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert first.get_inheritable() and second.get_inheritable()
            # A worker's socket listens from the worker's start, before its app is ready;
            # the supervisor's only holds the port, so it is dealt no connections.
            assert first.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert second.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert supervisor.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0


@linux_only
def test_a_burst_of_connections_is_shared_between_the_workers_sockets() -> None:
    port = _free_port()
    with worker_socket("127.0.0.1", port) as supervisor:
        with _handed_over(supervisor) as first, _handed_over(supervisor) as second:
            with _connections(port, 64):
                # The handshakes are done by the kernel; each socket's queue holds its share.
                counts = [_accept_all(first), _accept_all(second)]
    assert sum(counts) == 64  # and none went to the supervisor's socket, which never listens
    # An even share is 32 each; a shared socket gave one process 47 to 58 of 64 in tries here.
    assert min(counts) >= 12, counts


def test_without_balancing_the_workers_share_the_supervisors_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listen, "balances_connections", lambda: False)
    port = _free_port()
    with worker_socket("127.0.0.1", port) as sock:
        assert type(sock) is socket.socket
        assert sock.getsockname() == ("127.0.0.1", port)
        assert sock.get_inheritable()
        if hasattr(socket, "SO_REUSEPORT"):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


def test_a_taken_port_is_an_os_error() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        with pytest.raises(OSError):
            worker_socket("127.0.0.1", other.getsockname()[1]).close()
