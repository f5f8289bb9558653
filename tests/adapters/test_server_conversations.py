"""The conversation API: list, read (paged), delete; any conv_uid; owners only."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from tests.adapters.server_support import CHAT, assert_error_body, client_for, make_app, stored

pytestmark = pytest.mark.anyio

CONV = "/api/v2/conversations"


def conv_path(conv_uid: str) -> str:
    """Percent-encoded, with "." and ".." spelled %2E so clients do not resolve them away."""
    encoded = quote(conv_uid, safe="")
    if encoded in {".", ".."}:
        encoded = encoded.replace(".", "%2E")
    return f"{CONV}/{encoded}"


async def chat(c: httpx.AsyncClient, text: str, **fields: object) -> str:
    r = await c.post(CHAT, json={"messages": text, **fields})
    assert r.status_code == 200, r.text
    conv_uid: str = r.json()["conv_uid"]
    return conv_uid


async def test_list_by_user_and_sys_code_paged_newest_first() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        ada = [await chat(c, f"ada {i}", user_name="ada", sys_code="s1") for i in range(3)]
        await chat(c, "bob", user_name="bob", sys_code="s1")
        r = await c.get(CONV, params={"user_name": "ada"})
        page = await c.get(CONV, params={"user_name": "ada", "limit": 2, "offset": 1})
        by_sys = await c.get(CONV, params={"sys_code": "s1", "limit": 10})
    body = r.json()
    assert body["success"] is True and body["err_code"] is None
    assert [x["conv_uid"] for x in body["data"]] == ada[::-1]
    assert [x["conv_uid"] for x in page.json()["data"]] == ada[::-1][1:3]
    assert len(by_sys.json()["data"]) == 4
    first = body["data"][0]
    assert first["user_name"] == "ada" and first["message_count"] == 2 and first["total_tokens"] > 0


async def test_read_messages_paged_newest_last() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        conv_uid = await chat(c, "one", user_name="ada")
        for text in ("two", "three"):
            await chat(c, text, conv_uid=conv_uid, user_name="ada")
        full = (await c.get(conv_path(conv_uid))).json()["data"]
        page1 = (await c.get(conv_path(conv_uid), params={"limit": 4})).json()["data"]
        page2 = await c.get(conv_path(conv_uid), params={"start_seq": page1["next_start_seq"], "limit": 4})
    assert full["conversation"]["message_count"] == 6
    assert [m["seq"] for m in full["messages"]] == [1, 2, 3, 4, 5, 6]
    assert [m["role"] for m in full["messages"]] == ["user", "assistant"] * 3
    assert full["messages"][-1]["content"].startswith("You said: three")
    assert full["next_start_seq"] is None
    assert page1["next_start_seq"] == 5
    assert [m["seq"] for m in page2.json()["data"]["messages"]] == [5, 6]
    assert page2.json()["data"]["next_start_seq"] is None


@pytest.mark.parametrize(
    "conv_uid",
    [
        "a{b}c",
        "with space",
        "a/b/c",
        "/leading",
        "ünïcødé-会话-🙂",
        "50%",
        "q?x=1#frag",
        "plus+and&amp;",
        "..",
        ".",
        "a%2Fb",
    ],
)
async def test_any_conv_uid_round_trips_through_the_path(conv_uid: str) -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        assert await chat(c, "hello", conv_uid=conv_uid) == conv_uid
        r = await c.get(conv_path(conv_uid))
        assert r.status_code == 200, r.text
        assert r.json()["data"]["conversation"]["conv_uid"] == conv_uid
        deleted = await c.delete(conv_path(conv_uid))
        assert deleted.json()["data"] == {"conv_uid": conv_uid, "deleted": True}
        again = await c.get(conv_path(conv_uid))
    assert again.status_code == 404
    assert_error_body(again.json(), "conversation_not_found")
    assert await stored(store) == (0, 0)


async def test_conv_uid_header_is_percent_encoded() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "x", "conv_uid": "会话 1/2"})
    assert r.headers["x-conv-uid"] == quote("会话 1/2", safe="")


async def test_another_users_conversation_is_refused() -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        conv_uid = await chat(c, "secret", user_name="ada", sys_code="s1")
        read = await c.get(conv_path(conv_uid), params={"user_name": "bob"})
        other_sys = await c.get(conv_path(conv_uid), params={"sys_code": "s2"})
        delete = await c.delete(conv_path(conv_uid), params={"user_name": "bob"})
        turn = await c.post(CHAT, json={"messages": "hijack", "conv_uid": conv_uid, "user_name": "bob"})
        own = await c.get(conv_path(conv_uid), params={"user_name": "ada"})
    for r in (read, other_sys, delete, turn):
        assert r.status_code == 403, r.text
        assert_error_body(r.json(), "permission_denied")
    assert own.status_code == 200
    assert await stored(store) == (1, 2)


async def test_missing_conversation_is_404() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        for r in (await c.get(conv_path("nope")), await c.delete(conv_path("nope")), await c.get(f"{CONV}/")):
            assert r.status_code == 404
            assert_error_body(r.json(), "conversation_not_found")
