"""``convcore serve`` closes connections that send their request too slowly,
and refuses connections over its limit before reading anything."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.serve_process import ServeProcess

HEADER_TIMEOUT = 0.6
BODY_TIMEOUT = 0.6
MAX_CONNECTIONS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    with ServeProcess(
        f"sqlite:///{tmp / 'limits.db'}",
        tmp,
        (
            "--header-timeout", str(HEADER_TIMEOUT),
            "--body-timeout", str(BODY_TIMEOUT),
            "--max-connections", str(MAX_CONNECTIONS),
            "--local-latency", str(HEADER_TIMEOUT * 2),
        ),
    ) as proc:  # fmt: skip
        yield proc


def connect(server: ServeProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while True:
        try:
            piece = sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"the server kept the connection open for {limit} s: {data!r}")
        except ConnectionResetError:
            break
        if not piece:
            break
        data += piece
    return data, time.monotonic() - started


def test_a_partial_request_line_is_answered_408_and_closed(server: ServeProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /api/v2/mod")
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert took < HEADER_TIMEOUT + 2


def test_a_silent_connection_is_closed(server: ServeProcess) -> None:
    with connect(server) as sock:
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and took < HEADER_TIMEOUT + 2


def test_dripping_headers_does_not_extend_the_deadline(server: ServeProcess) -> None:
    request = b"GET /api/v2/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with connect(server) as sock:
        started = time.monotonic()
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # closed on us: that is the point
            if time.monotonic() - started > HEADER_TIMEOUT + 3:
                pytest.fail("the server still accepts header bytes long past its deadline")
            time.sleep(HEADER_TIMEOUT / 20)
        data, _ = read_until_closed(sock)
    assert time.monotonic() - started < HEADER_TIMEOUT + 3
    assert data.startswith(b"HTTP/1.1 408"), data


def test_a_body_that_stops_coming_closes_the_connection_and_stores_nothing(server: ServeProcess) -> None:
    body = b'{"messages": "never finished", "conv_uid": "stalled-body"}'
    head = (
        b"POST /api/v2/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {server.headers['Authorization'].split()[1]}\r\n".encode()
        + b"X-Request-Id: stalled-body-request\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    with connect(server) as sock:
        sock.sendall(head + body[:10])
        _, took = read_until_closed(sock)
    assert took < BODY_TIMEOUT + 2
    r = httpx.get(f"{server.base}/api/v2/conversations/stalled-body", headers=server.headers, timeout=10)
    assert r.status_code == 404
    # The line that says why the connection was closed names the request.
    closed = [line for line in server.log().splitlines() if "no request body within the timeout" in line]
    assert closed and all("request_id=stalled-body-request" in line for line in closed), closed


def test_slow_replies_are_not_cut_by_the_read_timeouts(server: ServeProcess) -> None:
    """The local model waits twice the header timeout before answering."""
    with httpx.Client(base_url=server.base, headers=server.headers, timeout=30) as client:
        r = client.post("/api/v2/chat/completions", json={"messages": "slow"})
        assert r.status_code == 200, r.text
        # kept alive past the header timeout, the next request on it still works
        time.sleep(HEADER_TIMEOUT * 1.5)
        with client.stream("POST", "/api/v2/chat/completions", json={"messages": "slow", "stream": True}) as s:
            assert s.status_code == 200
            assert "[DONE]" in s.read().decode()


def test_connections_over_the_limit_are_refused_at_once_and_served_again_after(server: ServeProcess) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(connect(server))
        time.sleep(0.1)  # let the server accept them all
        with connect(server) as extra:
            data, took = read_until_closed(extra)
        assert data.startswith(b"HTTP/1.1 503"), data
        assert took < 3.0  # and 503, not the 408 of a timed-out connection
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            r = httpx.get(f"{server.base}/api/v2/models", headers=server.headers, timeout=5)
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 200:
            break
        assert time.monotonic() < deadline, "the server did not serve again after the connections closed"
        time.sleep(0.05)


def test_the_server_log_says_why_connections_were_closed(server: ServeProcess, tmp_path: Path) -> None:
    with connect(server) as sock:
        read_until_closed(sock)
    assert "within the timeout" in server.log()
