"""Server-sent events, parsed from raw bytes.

Lines are split on CRLF, LF or CR only, as the SSE format defines them.
httpx's ``aiter_lines()`` follows ``str.splitlines()`` and also breaks on
U+2028, U+0085 and friends, which servers emit raw inside JSON strings, so
it would cut a data line in two; splitting bytes avoids that (none of the
three line-end bytes can occur inside a multi-byte UTF-8 sequence).

Beyond the format: a data line that follows a complete JSON document (or
``[DONE]``) without the blank line in between starts a new event, and what
is pending at the end of the body is delivered, because some servers are
sloppy about both.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

__all__ = ["ServerSentEvent", "iter_events", "iter_lines"]

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class ServerSentEvent:
    """One event: its type (``message`` unless an ``event:`` line named one) and data."""

    event: str
    data: str


async def iter_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The body's lines, without their line ends, however the bytes were split."""
    buffer = b""
    first = True
    async for chunk in chunks:
        buffer += chunk
        start = 0
        for match in _LINE_END.finditer(buffer):
            if match.group() == b"\r" and match.end() == len(buffer):
                break  # maybe the first half of a CRLF split across chunks
            line = buffer[start : match.start()].decode("utf-8", "replace")
            start = match.end()
            if first:
                line, first = line.removeprefix("\ufeff"), False
            yield line
        buffer = buffer[start:]
    if buffer:
        line = buffer.rstrip(b"\r").decode("utf-8", "replace")
        yield line.removeprefix("\ufeff") if first else line


def _complete(data: list[str]) -> bool:
    text = "\n".join(data)
    if text == "[DONE]":
        return True
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def iter_events(lines: AsyncIterable[str]) -> AsyncIterator[ServerSentEvent]:
    """Events from SSE lines; comments (``:`` lines) and ``id``/``retry`` fields are skipped."""
    data: list[str] = []
    event = ""
    async for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data))
            data, event = [], ""
            continue
        if line.startswith(":"):
            continue  # a comment, often a keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            if data and _complete(data):
                yield ServerSentEvent(event or "message", "\n".join(data))
                data, event = [], ""
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield ServerSentEvent(event or "message", "\n".join(data))
