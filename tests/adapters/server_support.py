"""Shared builders for the HTTP adapter's tests (tests/adapters/test_server_*.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI

from convcore import (
    Engine,
    Generation,
    GenerationChunk,
    GenerationRequest,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    default_registry,
)
from convcore_server import create_app

KEYS = ("key-one", "key-two")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
CHAT = "/api/v2/chat/completions"


def make_app(models: ModelRegistry | None = None, **options: Any) -> tuple[FastAPI, Engine, MemoryStore]:
    store = MemoryStore()
    engine = Engine(store, models or default_registry())
    options.setdefault("api_keys", KEYS)
    return create_app(engine, **options), engine, store


@asynccontextmanager
async def client_for(app: FastAPI, key: str | None = KEYS[0]) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://convcore.test", headers=headers
    ) as client:
        yield client


async def stored(store: MemoryStore) -> tuple[int, int]:
    """(conversations, messages) in the store."""
    convs = await store.list_conversations(limit=10**9)
    return len(convs), sum(c.message_count for c in convs)


def sse_data(text: str) -> list[str]:
    """The payloads of the ``data:`` lines, split the way strict clients split lines."""
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data:")]


def assert_valid_sse(text: str) -> list[dict[str, Any]]:
    """Every data line is JSON but the last, which is exactly ``[DONE]``; returns the chunks."""
    data = sse_data(text)
    assert data, text
    assert data[-1] == "[DONE]"
    assert data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:
        assert isinstance(chunk, dict)
        assert "usage" not in chunk or isinstance(chunk["usage"], dict)
    assert '"usage":null' not in text.replace(" ", "")
    return chunks


def assert_error_body(body: Any, code: str | None = None) -> None:
    assert body["success"] is False
    assert isinstance(body["err_code"], str)
    assert isinstance(body["err_msg"], str) and body["err_msg"]
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] == body["err_msg"]
    if code is not None:
        assert body["err_code"] == code == err["code"]


class GateBackend:
    """Streams one piece, then waits until cancelled; records that it was closed."""

    def __init__(self) -> None:
        self.closed = False
        self.started = anyio.Event()

    async def complete(self, request: GenerationRequest) -> Generation:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        try:
            self.started.set()
            yield GenerationChunk(content="Hello")
            await anyio.sleep_forever()
        finally:
            self.closed = True

    async def aclose(self) -> None:
        return None


class FailingBackend:
    """Streams one piece, then fails; ``complete`` fails at once."""

    async def complete(self, request: GenerationRequest) -> Generation:
        raise RuntimeError("upstream exploded")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk(content="Hello")
        raise RuntimeError("upstream exploded")

    async def aclose(self) -> None:
        return None


def registry_with(
    name: str, backend: Any, context_window: int = 4096, max_new_tokens: int = 64
) -> ModelRegistry:
    return ModelRegistry(
        [ModelSpec(name=name, backend=backend, context_window=context_window, max_new_tokens=max_new_tokens)]
    )
