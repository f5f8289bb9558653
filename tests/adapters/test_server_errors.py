"""Every rejected request: a precise 4xx JSON in both dialects, and nothing stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
from fastapi import APIRouter

from convcore import (
    ConversationNotFoundError,
    LocalBackend,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    StorageUnavailableError,
)
from convcore_server import ERROR_TABLE, classify
from tests.adapters.server_support import (
    CHAT,
    KEYS,
    assert_error_body,
    client_for,
    make_app,
    stored,
)

pytestmark = pytest.mark.anyio

BAD_BODIES: list[tuple[bytes, str, str]] = [
    (b"", "invalid_request", "empty"),
    (b"{", "invalid_request", "not valid JSON"),
    (b'{"messages": "x",}', "invalid_request", "not valid JSON"),
    (b"\xff\xfe{}", "invalid_request", "UTF-8"),
    (b'{"messages": NaN}', "invalid_request", "NaN"),
    (b"[]", "invalid_request", "must be a JSON object, got an array"),
    (b'"hello"', "invalid_request", "got a string"),
    (b"null", "invalid_request", "got null"),
    (b"{}", "invalid_request", "messages: is required"),
    (b'{"messages": 3}', "invalid_request", "messages: must be a string or a list, got int"),
    (b'{"messages": ""}', "invalid_request", "messages: must not be empty"),
    (b'{"messages": []}', "invalid_request", "messages: must not be empty"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "invalid_request", "role"),
    (b'{"messages": [{"role": "user"}]}', "invalid_request", "content"),
    (
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        "invalid_request",
        "assistant",
    ),
    (b'{"messages": "x", "temperature": "hot"}', "invalid_request", "temperature"),
    (b'{"messages": "x", "temperature": 7}', "invalid_request", "temperature"),
    (b'{"messages": "x", "stream": "yes"}', "invalid_request", "stream"),
    (b'{"messages": "x", "max_new_tokens": 0}', "invalid_request", "max_new_tokens"),
    (b'{"messages": "x", "max_tokens": 1.5}', "invalid_request", "max_tokens"),
    (b'{"messages": "x", "conv_uid": 12}', "invalid_request", "conv_uid"),
    (b'{"messages": "x", "conv_uid": "a\\u0000b"}', "invalid_request", "conv_uid"),
    (b'{"messages": "\\ud800"}', "invalid_request", "surrogate"),
    (b'{"messages": "x", "model": "gpt-nope"}', "model_not_found", "unknown model 'gpt-nope'"),
    (b'{"messages": "x", "chat_mode": "chat_app"}', "unsupported_chat_mode", "chat_app"),
    (b'{"messages": "x", "max_new_tokens": 100000}', "context_length_exceeded", "context window of 8192"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_request", "nested too deeply"),
    (b'{"messages": "x", "max_new_tokens": 1' + b"0" * 5000 + b"}", "invalid_request", "not valid JSON"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("body", "code", "says"), BAD_BODIES, ids=range(len(BAD_BODIES)))
async def test_bad_requests_are_precise_4xx_json_and_store_nothing(
    body: bytes, code: str, says: str, stream: bool
) -> None:
    app, _, store = make_app()
    if stream and body.startswith(b'{"messages": "x"'):
        body = body.replace(b'{"messages": "x"', b'{"stream": true, "messages": "x"', 1)
    async with client_for(app) as c:
        r = await c.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert_error_body(r.json(), code)
    assert says in r.json()["err_msg"]
    assert await stored(store) == (0, 0)


async def test_context_overflow_names_the_numbers() -> None:
    models = ModelRegistry(
        [ModelSpec(name="tiny", backend=LocalBackend(), context_window=64, max_new_tokens=16)]
    )
    app, _, store = make_app(models)
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "word " * 200})
    assert r.status_code == 400
    body = r.json()
    assert_error_body(body, "context_length_exceeded")
    assert "context window of 64" in body["err_msg"] and "16" in body["err_msg"]
    assert await stored(store) == (0, 0)


async def test_oversize_body_is_413_declared_or_streamed() -> None:
    app, _, store = make_app(max_body_bytes=1000)
    big = b'{"messages": "' + b"x" * 2000 + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    async with client_for(app) as c:
        declared = await c.post(CHAT, content=big)
        streamed = await c.post(CHAT, content=chunked())
    for r in (declared, streamed):
        assert r.status_code == 413, r.text
        assert_error_body(r.json(), "payload_too_large")
        assert "1000 bytes" in r.json()["err_msg"]
    assert await stored(store) == (0, 0)


async def test_oversize_message_is_400_naming_the_message() -> None:
    app, _, store = make_app(max_message_chars=50)
    async with client_for(app) as c:
        one = await c.post(CHAT, json={"messages": "y" * 51})
        listed = await c.post(
            CHAT,
            json={"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "z" * 60}]},
        )
    assert_error_body(one.json(), "message_too_long")
    assert one.json()["err_msg"] == "messages: is 51 characters long; the limit is 50"
    assert listed.json()["error"]["param"] == "messages.1.content"
    assert await stored(store) == (0, 0)


async def test_unknown_paths_and_methods_answer_json() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        missing = await c.get("/api/v2/nothing")
        wrong_method = await c.get(CHAT)
        bad_query = await c.get("/api/v2/conversations", params={"limit": "many"})
    assert missing.status_code == 404
    assert_error_body(missing.json(), "not_found")
    assert wrong_method.status_code == 405
    assert_error_body(wrong_method.json(), "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]
    assert bad_query.status_code == 400
    assert_error_body(bad_query.json(), "invalid_request")
    assert bad_query.json()["error"]["param"] == "limit"


class DownStore(MemoryStore):
    """A store whose server is gone: every call fails."""

    async def get_conversation(self, conv_uid: str) -> Any:
        raise StorageUnavailableError("connection refused")

    async def read_context(self, conv_uid: str, max_tokens: int, *, turn_id: str | None = None) -> Any:
        raise StorageUnavailableError("connection refused")

    async def append_turn(self, turn: Any) -> Any:
        raise StorageUnavailableError("connection refused")


async def test_store_down_is_503_and_readiness_says_so() -> None:
    app, _, _ = make_app()
    app.state.convcore.engine.store = DownStore()
    async with client_for(app) as c:
        chat = await c.post(CHAT, json={"messages": "x"})
        ready = await c.get("/readyz")
        alive = await c.get("/healthz")
    assert chat.status_code == ready.status_code == 503
    assert_error_body(chat.json(), "storage_unavailable")
    assert ready.json()["status"] == "unavailable"
    assert ready.json()["checks"]["store"] == {"ok": False, "seconds": ANY, "error": "connection refused"}
    assert alive.status_code == 200  # the process itself answers


async def test_extra_routers_are_keyed_and_answered_by_the_table() -> None:
    router = APIRouter(prefix="/api/v2/serve")

    @router.get("/things/{uid}")
    async def thing(uid: str) -> dict[str, str]:
        raise ConversationNotFoundError(uid)

    app, _, _ = make_app(extra_routers=[router])
    async with client_for(app) as c:
        r = await c.get("/api/v2/serve/things/t1")
    async with client_for(app, key=None) as anon:
        locked = await anon.get("/api/v2/serve/things/t1")
    assert r.status_code == 404
    assert_error_body(r.json(), "conversation_not_found")
    assert locked.status_code == 401


async def test_mounted_app_works_and_its_lifespan_leaves_the_engine_open() -> None:
    from fastapi import FastAPI

    closed: list[bool] = []
    app, engine, _ = make_app()

    async def record_close() -> None:
        closed.append(True)

    engine.aclose = record_close  # type: ignore[method-assign]
    host = FastAPI()
    host.mount("/convcore", app)
    async with app.router.lifespan_context(app):
        pass
    assert closed == []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(host),
        base_url="http://host.test",
        headers={"Authorization": f"Bearer {KEYS[0]}"},
    ) as c:
        r = await c.post("/convcore/api/v2/chat/completions", json={"messages": "mounted"})
    assert r.json()["choices"][0]["message"]["content"] == "You said: mounted"


def test_the_table_maps_every_core_error_and_orders_subclasses_first() -> None:
    classes = [cls for cls, _ in ERROR_TABLE]
    for i, cls in enumerate(classes):
        for later in classes[i + 1 :]:
            assert not issubclass(later, cls) or later is cls, f"{later} is shadowed by {cls}"
    assert classify(RuntimeError("x")).status == 500


async def test_a_method_not_allowed_names_every_method_the_path_serves() -> None:
    # GET and DELETE are two routes on one path: Allow names both, not the first that matched.
    app, _, _ = make_app()
    async with client_for(app) as c:
        conversation = await c.options("/api/v2/conversations/x")
        fork = await c.put("/api/v2/conversations/x/fork")
        chat = await c.get(CHAT)
    assert conversation.status_code == 405 and conversation.headers["allow"] == "GET, DELETE"
    # A conv_uid may hold slashes: ".../x/fork" is also conversation "x/fork".
    assert fork.status_code == 405 and fork.headers["allow"] == "GET, POST, DELETE"
    assert chat.headers["allow"] == "POST"
    assert_error_body(conversation.json(), "method_not_allowed")


async def test_one_byte_order_mark_is_read_past_and_a_second_is_refused_as_json_says() -> None:
    app, _, store = make_app()
    body = b'{"messages": "x", "conv_uid": "bom"}'
    json_type = {"Content-Type": "application/json"}
    async with client_for(app) as c:
        once = await c.post(CHAT, content=b"\xef\xbb\xbf" + body, headers=json_type)
        twice = await c.post(CHAT, content=b"\xef\xbb\xbf" * 2 + body, headers=json_type)
    assert once.status_code == 200, once.text
    assert twice.status_code == 400
    assert_error_body(twice.json(), "invalid_request")
    assert twice.json()["err_msg"] == (
        "the request body is not valid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (line 1, column 1)"
    )
    assert await stored(store) == (1, 2)
