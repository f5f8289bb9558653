"""Builders for the scene tests (tests/adapters/test_scenes_*.py): the real
server app with the scene routers included, over one RecordStore."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from convcore import (
    Engine,
    LocalBackend,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    PromptMessage,
    RecordStore,
)
from convcore.testing import RecordingBackend
from convcore_scenes import SceneKit
from convcore_scenes.secret_box import SecretBox
from convcore_server import create_app

KEY = "scene-key"
CHAT = "/api/v2/chat/completions"


@dataclass
class Harness:
    app: FastAPI
    engine: Engine
    store: MemoryStore
    kit: SceneKit
    backend: RecordingBackend
    models: ModelRegistry


def scripted(reply: Callable[[tuple[PromptMessage, ...]], str]) -> RecordingBackend:
    """A recording backend whose replies come from ``reply(messages)``."""
    return RecordingBackend(LocalBackend(reply=reply))


def harness(
    backend: RecordingBackend | None = None,
    *,
    records: RecordStore | None = None,
    context_window: int = 8192,
    max_new_tokens: int = 256,
    more_models: list[ModelSpec] | None = None,
    user_keys: dict[str, str] | None = None,
    store_url: str | None = None,
    secrets: SecretBox | bool | None = True,
) -> Harness:
    """The app over a memory store; ``secrets=True`` seals passwords with a fresh key."""
    backend = backend or RecordingBackend()
    models = ModelRegistry(
        [
            ModelSpec("test-model", backend, context_window=context_window, max_new_tokens=max_new_tokens),
            *(more_models or []),
        ]
    )
    box = SecretBox([SecretBox.generate_key()]) if secrets is True else (secrets or None)
    store = MemoryStore()
    kit = SceneKit(records or store.records, secrets=box, store_url=store_url)
    engine = Engine(store, models, scenes=kit.scenes())
    kit.use_registry(engine.scenes)
    app = create_app(engine, api_keys=[KEY], user_keys=user_keys, extra_routers=kit.routers())
    return Harness(app, engine, store, kit, backend, models)


@asynccontextmanager
async def client(app: FastAPI, key: str | None = KEY) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://convcore.test", headers=headers
    ) as c:
        yield c


def stream_text(body: str) -> tuple[str, list[dict[str, Any]]]:
    """The streamed reply's text and its chunks (asserting the SSE framing)."""
    data = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data:")]
    assert data and data[-1] == "[DONE]", body
    chunks = [json.loads(d) for d in data[:-1]]
    assert not any("error" in c for c in chunks), chunks
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    return text, chunks


def assert_envelope_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert isinstance(body["err_code"], str) and isinstance(body["err_msg"], str) and body["err_msg"]
    assert body["data"] is None
    return body


def last_user(messages: tuple[PromptMessage, ...]) -> str:
    return next(m.content for m in reversed(messages) if m.role == "user")
