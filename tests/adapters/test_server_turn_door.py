"""The chat route's own door answers exactly as the routed endpoint does.

Each request is sent twice: to the app as built (the door answers it) and
to the same app with a dependency override present, which sends every
request through FastAPI's router and dependency solver. Status, error body
and the headers a client reads must be the same either way.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from convcore import Engine, MemoryStore, default_registry
from convcore_server.app import create_app
from convcore_server.turn_door import TurnDoor

from .server_support import AUTH, CHAT, assert_valid_sse, make_app, stored

pytestmark = pytest.mark.anyio

_VOLATILE = {"x-request-id", "x-conv-uid", "content-length", "date"}


def _force_router(app: FastAPI) -> None:
    def unused() -> None:  # a dependency no route has: only makes the app route every request
        return None

    app.dependency_overrides[unused] = unused


def _shape(r: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in r.headers.items() if k not in _VOLATILE}
    try:
        body: Any = r.json()
    except json.JSONDecodeError:
        body = r.text
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "created", "conv_uid")}
        for choice in body.get("choices", []):
            choice.pop("message_id", None)
    return r.status_code, headers, body


async def _exchanges(app: FastAPI) -> list[tuple[int, dict[str, str], Any]]:
    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"messages": "'
        yield b"x" * 300
        yield b'"}'

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://convcore.test"
    ) as c:
        answers = [
            await c.post(CHAT, json={"messages": "hello"}, headers=AUTH),
            await c.post(CHAT, json={"messages": "hello"}),
            await c.post(CHAT, json={"messages": "hello"}, headers={"Authorization": "Bearer wrong"}),
            await c.post(CHAT, content=b"{not json", headers=AUTH),
            await c.post(CHAT, content=b"[1]", headers=AUTH),
            await c.post(CHAT, json={"messages": "y" * 201}, headers=AUTH),
            await c.post(CHAT, content=chunked(), headers=AUTH),
            await c.post(CHAT, json={"messages": "boom"}, headers=AUTH),
            await c.get(CHAT, headers=AUTH),
        ]
        stream = await c.post(CHAT, json={"messages": "streamed", "stream": True}, headers=AUTH)
    assert_valid_sse(stream.text)
    return [_shape(r) for r in answers] + [(stream.status_code, {}, None)]


def _app() -> FastAPI:
    app, engine, _ = make_app(max_body_bytes=250, max_message_chars=200)
    chat = engine.chat

    async def failing_on_boom(req: Any, **kw: Any) -> Any:
        if req.messages == "boom":
            raise RuntimeError("the model fell over")
        return await chat(req, **kw)

    engine.chat = failing_on_boom  # type: ignore[method-assign]
    return app


async def test_the_door_and_the_router_answer_alike() -> None:
    through_door = await _exchanges(_app())
    routed_app = _app()
    _force_router(routed_app)
    through_router = await _exchanges(routed_app)
    statuses = [status for status, _, _ in through_door]
    assert statuses == [200, 401, 401, 400, 400, 400, 413, 500, 405, 200]
    assert through_door == through_router


async def test_a_turn_through_the_door_is_stored_with_its_headers() -> None:
    app, _, store = make_app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://convcore.test", headers=AUTH
    ) as c:
        r = await c.post(CHAT, json={"messages": "hi", "conv_uid": "c-door"}, headers={"X-Request-Id": "rq-1"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "You said: hi"
    assert r.headers["x-conv-uid"] == "c-door" and r.headers["x-request-id"] == "rq-1"
    assert await stored(store) == (1, 2)


def _anonymous_ctx() -> Any:
    return create_app(Engine(MemoryStore(), default_registry()), allow_anonymous=True).state.convcore


class _Owner:
    def __init__(self, overrides: dict[Any, Any] | None = None) -> None:
        self.dependency_overrides = overrides or {}
        self.exception_handlers: dict[Any, Any] = {}


async def _call(door: TurnDoor, method: str, path: str, root_path: str = "") -> list[dict[str, Any]]:
    scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": []}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await door(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    ("method", "path", "root_path", "overrides", "answered"),
    [
        ("POST", CHAT, "", None, True),
        ("POST", "/mounted" + CHAT, "/mounted", None, True),
        ("GET", CHAT, "", None, False),
        ("POST", CHAT + "/", "", None, False),
        ("POST", "/api/v2/models", "", None, False),
        ("POST", CHAT, "", {"dep": "override"}, False),
    ],
)
async def test_the_door_takes_only_its_route(
    method: str, path: str, root_path: str, overrides: dict[str, str] | None, answered: bool
) -> None:
    from starlette.responses import PlainTextResponse

    ctx = _anonymous_ctx()
    routed: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        routed.append(scope["path"])
        await PlainTextResponse("routed")(scope, receive, send)

    async def answer(request: Any, _ctx: Any) -> PlainTextResponse:
        return PlainTextResponse("door")

    door = TurnDoor(app, owner=_Owner(overrides), ctx=ctx, path=CHAT, answer=answer)
    sent = await _call(door, method, path, root_path)
    body = sent[-1]["body"]
    if answered:
        assert routed == [] and body == b"door"
    else:
        assert routed == [path] and body == b"routed"


async def test_an_error_without_a_handler_goes_up_unanswered() -> None:
    ctx = _anonymous_ctx()

    async def answer(request: Any, _ctx: Any) -> Any:
        raise KeyError("unexpected")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not routed")

    door = TurnDoor(app, owner=_Owner(), ctx=ctx, path=CHAT, answer=answer)
    with pytest.raises(KeyError):
        await _call(door, "POST", CHAT)
