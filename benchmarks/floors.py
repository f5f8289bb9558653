"""Floors: the least work a turn can cost on the same store, measured in the same run.

A floor turn appends the user message and a fixed reply and reads back the
newest ``tail`` messages (as many as the engine's window holds), with none
of convcore's work: no request parsing, no token counting, no window, no
idempotency record, no model call. Results are reported as ratios to it,
because absolute times vary from run to run on a shared machine.

- memory: a plain list append and slice;
- Redis: one redis-py pipeline (RPUSH two messages, LRANGE the tail);
- SQL: SQLAlchemy Core on the same database (INSERT two rows, SELECT the
  tail by index) in one transaction;
- HTTP: a minimal ASGI app that returns a fixed completion, served by
  uvicorn in its own process exactly as ``convcore serve`` is; asked to
  stream, it sends ``max_new_tokens`` one-token SSE chunks at a first-token
  delay and pace set in its environment (the load benchmark's floor).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

from .driver import Ack, ReadBack, reply_for
from .namespaces import Namespace, async_sql_url
from .timing import sleep_until

__all__ = ["HttpFloor", "MemoryFloor", "RedisFloor", "SQLFloor", "fixed_completion_app", "floor_for"]


def _msg(role: str, content: str) -> str:
    return json.dumps({"role": role, "content": content, "t": time.time()})


class MemoryFloor:
    """A dict of lists: append two, slice the tail."""

    name = "floor:memory list"

    def __init__(self, tail: int) -> None:
        self.tail = tail
        self._logs: dict[str, list[dict[str, Any]]] = {}

    async def __aenter__(self) -> MemoryFloor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._logs.clear()

    async def turn(self, conv_uid: str, text: str) -> Ack:
        log = self._logs.setdefault(conv_uid, [])
        log.append({"role": "user", "content": text})
        log.append({"role": "assistant", "content": reply_for(text)})
        _ = log[-self.tail :]
        return Ack(None, conv_uid)

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        log = self._logs.setdefault(conv_uid, [])
        log.extend({"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(count))
        return []

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        return None


class RedisFloor:
    """One pipeline per turn: RPUSH user+reply, LRANGE the newest ``tail``."""

    name = "floor:redis pipeline"

    def __init__(self, url: str, namespace: Namespace, tail: int, filler: str) -> None:
        self.url = url
        self.namespace = namespace
        self.tail = tail
        self.filler = filler
        self._client: Any = None

    def _key(self, conv_uid: str) -> str:
        # One hash tag per conversation, as a cluster-ready store would use.
        return f"{self.namespace.redis_prefix}:floor:{{{conv_uid}}}"

    async def __aenter__(self) -> RedisFloor:
        from .namespaces import redis_client

        self._client = redis_client(self.url)
        await self._client.ping()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def turn(self, conv_uid: str, text: str) -> Ack:
        key = self._key(conv_uid)
        pipe = self._client.pipeline(transaction=True)
        pipe.rpush(key, _msg("user", text), _msg("assistant", reply_for(text)))
        pipe.lrange(key, -self.tail, -1)
        _, tail = await pipe.execute()
        _ = [json.loads(m) for m in tail]
        return Ack(None, conv_uid)

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        key = self._key(conv_uid)
        for first in range(0, count, 1000):
            n = min(1000, count - first)
            roles = ("user" if (start + first + i) % 2 == 0 else "assistant" for i in range(n))
            await self._client.rpush(key, *(_msg(r, self.filler) for r in roles))
        return []

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        return None


class SQLFloor:
    """SQLAlchemy Core on the same database: INSERT two rows and SELECT the
    tail through an index, in one transaction. On SQLite one writer at a
    time (an asyncio lock), which is what SQLite allows anyway."""

    name = "floor:sql core"

    def __init__(self, url: str, namespace: Namespace, tail: int, filler: str) -> None:
        self.url = url
        self.namespace = namespace
        self.tail = tail
        self.filler = filler
        self._engine: Any = None
        self._table: Any = None
        self._lock: asyncio.Lock | None = None

    async def __aenter__(self) -> SQLFloor:
        from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text
        from sqlalchemy.ext.asyncio import create_async_engine

        url = async_sql_url(self.url)
        is_sqlite = url.startswith("sqlite")
        self._engine = (
            create_async_engine(url, pool_size=64, max_overflow=64)
            if not is_sqlite
            else (create_async_engine(url, connect_args={"timeout": 30}))
        )
        self._lock = asyncio.Lock() if is_sqlite else None
        meta = MetaData()
        name = f"{self.namespace.sql_prefix}floor"
        self._table = Table(
            name,
            meta,
            Column(
                "id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
            ),
            Column("conv", String(128), nullable=False),
            Column("role", String(16), nullable=False),
            Column("content", Text, nullable=False),
            Index(f"{name}_conv_id", "conv", "id"),
        )
        async with self._engine.begin() as conn:
            await conn.run_sync(meta.create_all)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._engine is not None:
            await self._engine.dispose()

    async def _turn(self, conv_uid: str, text: str) -> None:
        from sqlalchemy import insert, select

        t = self._table
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(t),
                [
                    {"conv": conv_uid, "role": "user", "content": text},
                    {"conv": conv_uid, "role": "assistant", "content": reply_for(text)},
                ],
            )
            rows = await conn.execute(
                select(t.c.id, t.c.role, t.c.content)
                .where(t.c.conv == conv_uid)
                .order_by(t.c.id.desc())
                .limit(self.tail)
            )
            _ = rows.all()

    async def turn(self, conv_uid: str, text: str) -> Ack:
        if self._lock is None:
            await self._turn(conv_uid, text)
        else:
            async with self._lock:
                await self._turn(conv_uid, text)
        return Ack(None, conv_uid)

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        from sqlalchemy import insert

        for first in range(0, count, 2000):
            n = min(2000, count - first)
            rows = [
                {
                    "conv": conv_uid,
                    "role": "user" if (start + first + i) % 2 == 0 else "assistant",
                    "content": self.filler,
                }
                for i in range(n)
            ]
            async with self._engine.begin() as conn:
                await conn.execute(insert(self._table), rows)
        return []

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        return None


# -- HTTP ---------------------------------------------------------------------

_FIXED = {
    "object": "chat.completion",
    "model": "convcore-local",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fixed"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


async def fixed_completion_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The minimal ASGI app: read the body, answer a fixed chat completion."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    request: dict[str, Any] = {}
    if body:
        try:
            request = json.loads(body)
        except ValueError:
            request = {}
    conv_uid = request.get("conv_uid")
    if request.get("stream"):
        await _stream_fixed(send, conv_uid, request)
        return
    payload = json.dumps(
        {**_FIXED, "id": uuid.uuid4().hex, "created": int(time.time()), "conv_uid": conv_uid}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# The streaming floor's pace, from its process environment (see benchmarks.load_targets).
FIRST_TOKEN_ENV, TOKENS_PER_S_ENV = "CCB_FLOOR_FIRST_TOKEN_S", "CCB_FLOOR_TOKENS_PER_S"


def _env_seconds(name: str) -> float:
    try:
        return max(float(os.environ.get(name, "0") or 0), 0.0)
    except ValueError:
        return 0.0


async def _stream_fixed(send: Any, conv_uid: str | None, request: dict[str, Any]) -> None:
    """SSE: ``max_new_tokens`` one-token chunks, the first after ``$CCB_FLOOR_FIRST_TOKEN_S``
    seconds, the rest paced at ``$CCB_FLOOR_TOKENS_PER_S`` (0: unpaced), then usage and [DONE]."""
    first, tps = _env_seconds(FIRST_TOKEN_ENV), _env_seconds(TOKENS_PER_S_ENV)
    try:
        tokens = max(1, min(int(request.get("max_new_tokens") or request.get("max_tokens") or 16), 100_000))
    except (TypeError, ValueError):
        tokens = 16
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )
    head = json.dumps({"id": uuid.uuid4().hex, "object": "chat.completion.chunk", "conv_uid": conv_uid})[:-1]
    token = (head + ',"choices":[{"index":0,"delta":{"content":" x"}}]}').encode()
    event = b"data: " + token + b"\n\n"
    if first > 0:  # exactly: the floor measures the harness, not asyncio's millisecond timer
        await sleep_until(time.perf_counter() + first, spin=0.0015)
    for i in range(tokens):
        if i and tps > 0:
            await asyncio.sleep(1 / tps)
        await send({"type": "http.response.body", "body": event, "more_body": True})
    usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
    tail = (
        head
        + f',"choices":[{{"index":0,"delta":{{}},"finish_reason":"length"}}],"usage":{json.dumps(usage)}}}'
    )
    await send({"type": "http.response.body", "body": b"data: " + tail.encode() + b"\n\ndata: [DONE]\n\n"})


class HttpFloor:
    """The HTTP client the service target uses, against :func:`fixed_completion_app`."""

    name = "floor:minimal ASGI app"

    def __init__(self, client: Any, server: Any = None) -> None:
        self.client = client  # a started benchmarks.targets.HttpClient
        self.server = server  # its benchmarks.targets.ServerProcess, for the CPU it used

    async def turn(self, conv_uid: str, text: str) -> Ack:
        await self.client.post_turn(conv_uid, text)
        return Ack(None, conv_uid)

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        return []

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        return None


def floor_for(store_url: str, namespace: Namespace, tail: int, filler: str) -> Any:
    """The store floor for ``store_url`` (an async context manager and a Driver)."""
    scheme = store_url.split("://", 1)[0].lower()
    if scheme == "memory":
        return MemoryFloor(tail)
    if scheme.startswith("redis"):
        return RedisFloor(store_url, namespace, tail, filler)
    return SQLFloor(store_url, namespace, tail, filler)
