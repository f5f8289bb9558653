"""Resent histories, forks and mistyped conv_uids over HTTP, with the OpenAI SDK
sending the whole message list every turn as its users do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from tests.adapters.server_support import CHAT, KEYS, client_for, make_app, stored

pytestmark = pytest.mark.anyio

MODEL = "convcore-echo"


@pytest.fixture
async def sdk() -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient, Any]]:
    app, _, store = make_app()
    client = openai.AsyncOpenAI(
        base_url="http://convcore.test/api/v2",
        api_key=KEYS[0],
        # openai 3.x is typed for httpx2 clients but takes httpx ones too.
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app)),  # type: ignore[arg-type]
    )
    async with client, client_for(app) as http:
        yield client, http, store


async def test_sdk_resending_the_full_history_stores_nothing_twice(
    sdk: tuple[openai.AsyncOpenAI, httpx.AsyncClient, Any],
) -> None:
    client, http, store = sdk
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
    conv_uid = None
    for i, text in enumerate(["I'm Ada", "What's my name?", "Thanks"]):
        messages.append({"role": "user", "content": text})
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,
            extra_body={"conv_uid": conv_uid} if conv_uid else {},  # type: ignore[arg-type]
        )
        done = raw.parse()
        extra = done.model_extra or {}
        conv_uid = extra["conv_uid"]
        assert extra.get("history_matched", 0) == 2 * i
        assert raw.headers["x-history-matched"] == str(2 * i)
        assert raw.headers["x-conversation-created"] == ("true" if i == 0 else "false")
        messages.append(done.choices[0].message.model_dump(include={"role", "content"}))
    assert await stored(store) == (1, 6)
    page = (await http.get(f"/api/v2/conversations/{quote(conv_uid or '', safe='')}")).json()["data"]
    assert [m["content"] for m in page["messages"] if m["role"] == "user"] == [
        "I'm Ada",
        "What's my name?",
        "Thanks",
    ]


async def test_sdk_edited_history_gets_409_and_a_fork_takes_the_edit(
    sdk: tuple[openai.AsyncOpenAI, httpx.AsyncClient, Any],
) -> None:
    client, http, store = sdk
    first = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "I'm Ada"}]
    )
    conv_uid = (first.model_extra or {})["conv_uid"]
    reply = {"role": "assistant", "content": first.choices[0].message.content}
    second = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "I'm Ada"}, reply, {"role": "user", "content": "Hi"}],  # type: ignore[list-item]
        extra_body={"conv_uid": conv_uid},
    )
    assert (second.model_extra or {})["history_matched"] == 2

    edited = [{"role": "user", "content": "I'm Grace"}, reply, {"role": "user", "content": "Hi"}]
    with pytest.raises(openai.ConflictError) as err:
        await client.chat.completions.create(model=MODEL, messages=edited, extra_body={"conv_uid": conv_uid})  # type: ignore[arg-type]
    error = err.value.body
    assert isinstance(error, dict) and error["param"] == "messages.0"
    assert "seq 1" in error["message"] and "fork" in error["message"]
    assert await stored(store) == (1, 4), "the refused turn stored nothing"

    # Edit the second user message instead: fork before it (up to seq 2), resend with the edit.
    forked = await http.post(
        f"/api/v2/conversations/{quote(conv_uid, safe='')}/fork",
        json={"up_to_seq": 2, "new_conv_uid": "ada-2"},
    )
    assert forked.status_code == 200, forked.text
    assert forked.json()["data"]["conversation"]["message_count"] == 2
    again = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "I'm Ada"}, reply, {"role": "user", "content": "Hello!"}],  # type: ignore[list-item]
        extra_body={"conv_uid": "ada-2"},
    )
    assert (again.model_extra or {})["history_matched"] == 2
    assert (
        again.choices[0].message.content == 'You said: Hello! (earlier user messages: 1; first: "I\'m Ada")'
    )
    assert await stored(store) == (2, 8)


async def test_fork_route_errors(sdk: tuple[openai.AsyncOpenAI, httpx.AsyncClient, Any]) -> None:
    _, http, _ = sdk
    r = await http.post(CHAT, json={"messages": "hi", "conv_uid": "a/b", "user_name": "ann"})
    assert r.status_code == 200
    fork = "/api/v2/conversations/a/b/fork"
    cases = [
        (fork, {"up_to_seq": 9}, 409, "up_to_seq"),
        (fork, {"up_to_seq": "1"}, 400, "up_to_seq"),
        (fork, {"up_to_seq": 1, "surprise": 1}, 400, "surprise"),
        (fork, {"up_to_seq": 1, "user_name": "bob"}, 403, None),
        ("/api/v2/conversations/nope/fork", {"up_to_seq": 1}, 404, None),
        (fork, {"up_to_seq": 1, "new_conv_uid": "a/b"}, 409, None),
    ]
    for path, body, status, param in cases:
        r = await http.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        if param:
            assert r.json()["error"]["param"] == param
    ok = await http.post(fork, json={"up_to_seq": 2, "user_name": "ann"})
    assert ok.json()["data"]["conversation"]["user_name"] == "ann"


async def test_require_existing_is_a_404_over_http(
    sdk: tuple[openai.AsyncOpenAI, httpx.AsyncClient, Any],
) -> None:
    client, _, store = sdk
    with pytest.raises(openai.NotFoundError, match="mistyped"):
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"conv_uid": "mistyped", "require_existing": True},
        )
    assert await stored(store) == (0, 0)
