"""A lean HTTP/1.1 client for the load generator, and an SSE event splitter.

The harness must cost far less per request than the service it measures.
A general client (httpx) spends about a millisecond of CPU on a streamed
request; this one writes a prebuilt request to a keep-alive connection and
reads the status line, headers and (chunked or sized) body straight off an
``asyncio.StreamReader``, so each HTTP chunk is handed over as it arrives,
with nothing buffered in between. It speaks only what a chat endpoint
needs: POST/GET/DELETE with a JSON body, ``http://`` and ``https://``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["HttpPool", "ProtocolError", "Response", "SseSplitter"]


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this client can read."""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class Response:
    """Status and headers; the body is read with :meth:`chunks` or :meth:`read`, once."""

    status: int
    headers: dict[str, str]
    _conn: _Conn
    _pool: HttpPool
    _done: bool = field(default=False)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: one item per HTTP chunk (or read, when sized)."""
        reader = self._conn.reader
        te = self.headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            async for data in self._dechunk(reader):
                yield data
        elif "content-length" in self.headers:
            remaining = int(self.headers["content-length"])
            while remaining > 0:
                data = await reader.read(min(remaining, 65536))
                if not data:
                    raise ProtocolError("connection closed inside the body")
                remaining -= len(data)
                yield data
        else:
            while data := await reader.read(65536):
                yield data
            self.headers["connection"] = "close"
        self._done = True

    @staticmethod
    async def _dechunk(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """Chunked transfer decoding, one read at a time: every chunk that arrived
        in a read is handed over together (they arrived together), so a busy
        stream costs one await per read, not two per chunk."""
        buffer = b""
        while True:
            parts = []
            while (eol := buffer.find(b"\r\n")) >= 0:
                try:
                    size = int(buffer[:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line {buffer[:40]!r}") from None
                if size == 0:
                    if buffer.find(b"\r\n\r\n", eol) < 0:
                        break  # the trailers' end has not arrived yet
                    if parts:
                        yield b"".join(parts)
                    return
                end = eol + 2 + size
                if len(buffer) < end + 2:
                    break
                parts.append(buffer[eol + 2 : end])
                buffer = buffer[end + 2 :]
            if parts:
                yield b"".join(parts)
            data = await reader.read(65536)
            if not data:
                raise ProtocolError("connection closed inside a chunked body")
            buffer += data

    async def read(self) -> bytes:
        return b"".join([part async for part in self.chunks()])

    @property
    def reusable(self) -> bool:
        return self._done and self.headers.get("connection", "").lower() != "close"


class HttpPool:
    """Keep-alive connections to one origin, at most ``limit`` at a time.

    A request waits for a free connection when ``limit`` are busy; that wait
    is part of its latency, as it would be for any real client."""

    def __init__(self, url: str, *, limit: int = 256, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = (parts.scheme == "https" and self.port == 443) or self.port == 80
        host_header = self.host if default_port else f"{self.host}:{self.port}"
        base = {"Host": host_header, "User-Agent": "convcore-bench", "Accept": "*/*", **(headers or {})}
        self._base_headers = "".join(f"{k}: {v}\r\n" for k, v in base.items()).encode("latin-1")
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(limit)

    def _request_bytes(self, method: str, path: str, body: bytes | None, content_type: str) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self._base_headers
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode("latin-1")
        return head + b"\r\n" + (body or b"")

    async def _connect(self) -> tuple[_Conn, bool]:
        """A connection, and whether it is a reused one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn, True
            conn.writer.close()
        return await self._connect_new()

    async def _send(self, conn: _Conn, request: bytes, on_send: Callable[[], None] | None) -> Response:
        if on_send is not None:
            on_send()
        conn.writer.write(request)
        status_line = await conn.reader.readuntil(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
        headers: dict[str, str] = {}
        while (line := await conn.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return Response(int(parts[1]), headers, conn, self)

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        on_send: Callable[[], None] | None = None,
    ) -> AsyncIterator[Response]:
        """Send one request and yield its :class:`Response` (status and headers read).

        ``on_send`` is called as the request is written, after any wait for
        a connection. A kept-alive connection the server closed while idle
        fails before any answer; the request is then sent once more on a new
        connection (nothing reached the server). The connection goes back to
        the pool only if the body was read to its end."""
        request = self._request_bytes(method, path, body, content_type)
        async with self._slots:
            conn, reused = await self._connect()
            response: Response | None = None
            try:
                try:
                    response = await self._send(conn, request, on_send)
                except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
                    if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                        raise
                    conn.writer.close()
                    conn, _ = await self._connect_new()
                    response = await self._send(conn, request, on_send)
                yield response
            finally:
                if response is not None and response.reusable:
                    self._idle.append(conn)
                else:
                    conn.writer.close()

    async def _connect_new(self) -> tuple[_Conn, bool]:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=1 << 20)
        return _Conn(reader, writer), False

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.writer.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
        self._idle.clear()


class SseSplitter:
    """Bytes of a ``text/event-stream`` in, the ``data:`` payloads of whole events out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, self._buffer = buffer.split(b"\n\n")
        out = []
        for event in events:
            lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(lines))
        return out
