"""Input at the edges the service refuses, and errors that do not echo a
huge input back."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.adapters.server_support import CHAT, assert_error_body, client_for, make_app, stored

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "42", "tool_call_id": "call-1"}],
        [{"role": "system", "content": "be brief"}, {"role": "tool", "content": "42"}],
    ],
)
async def test_a_turn_of_only_tool_results_is_refused(messages: list[dict[str, str]]) -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": messages})
    assert r.status_code == 400 and "tool" in r.json()["err_msg"]
    assert_error_body(r.json(), "invalid_request")
    assert await stored(store) == (0, 0)


async def test_a_tool_result_answering_no_call_is_refused() -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(
            CHAT,
            json={
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "tool", "content": "42", "tool_call_id": "call-1"},
                ]
            },
        )
    assert r.status_code == 400 and "call-1" in r.json()["err_msg"], r.json()
    assert await stored(store) == (0, 0)


@pytest.mark.parametrize("mode", ["", "   "])
async def test_a_blank_chat_mode_is_refused_not_taken_as_chat_normal(mode: str) -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "x", "chat_mode": mode})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_mode"
    assert await stored(store) == (0, 0)


@pytest.mark.parametrize("char", ["\x7f", "\x85", "\x9f", "\u2028", "\u2029", "\n"])
@pytest.mark.parametrize("field", ["conv_uid", "request_id"])
async def test_ids_with_control_characters_or_line_breaks_are_refused(char: str, field: str) -> None:
    app, _, store = make_app()
    async with client_for(app) as c:
        r = await c.post(CHAT, json={"messages": "x", field: f"a{char}b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert await stored(store) == (0, 0)


async def test_errors_do_not_echo_a_huge_conv_uid_or_model_name() -> None:
    app, _, _ = make_app()
    async with client_for(app) as c:
        conv = await c.get(f"/api/v2/conversations/{quote('c' * 10_000, safe='')}")
        model = await c.get(f"/api/v2/models/{'m' * 20_000}")
    assert conv.status_code == 404 and model.status_code == 404
    for r, n in ((conv, 10_000), (model, 20_000)):
        assert len(r.content) < 1_000, len(r.content)
        assert f"({n:,} characters)" in r.json()["err_msg"]
