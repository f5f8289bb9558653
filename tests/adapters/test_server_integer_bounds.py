"""Integers from the query string and the body, at and past every store's
range: a 400 saying which field, never a 5xx, on every store."""

from __future__ import annotations

import pytest

from convcore import ConversationStore, Engine, InvalidRequestError, default_registry
from convcore_server import create_app
from tests.adapters.server_support import AUTH, CHAT, assert_error_body, client_for

pytestmark = pytest.mark.anyio

HUGE = ["9223372036854775807", "9223372036854775808", "18446744073709551616", str(10**40)]


@pytest.mark.parametrize("value", HUGE)
async def test_paging_integers_past_every_store_range_are_400(store: ConversationStore, value: str) -> None:
    engine = Engine(store, default_registry())
    app = create_app(engine, api_keys=["key-one"])
    async with client_for(app) as client:
        r = await client.post(CHAT, json={"messages": "hi", "conv_uid": "bounds"}, headers=AUTH)
        assert r.status_code == 200
        for url, field in [
            (f"/api/v2/conversations?offset={value}", "offset"),
            (f"/api/v2/conversations?limit={value}", "limit"),
            (f"/api/v2/conversations/bounds?start_seq={value}", "start_seq"),
            (f"/api/v2/conversations/bounds?limit={value}", "limit"),
        ]:
            r = await client.get(url)
            assert r.status_code == 400, (url, r.status_code, r.text)
            assert_error_body(r.json(), "invalid_request")
            assert r.json()["error"]["param"] == field


async def test_the_largest_accepted_offset_and_start_seq_answer_empty_pages(store: ConversationStore) -> None:
    from convcore.engine import MAX_INDEX

    engine = Engine(store, default_registry())
    app = create_app(engine, api_keys=["key-one"])
    async with client_for(app) as client:
        await client.post(CHAT, json={"messages": "hi", "conv_uid": "edge"})
        r = await client.get(f"/api/v2/conversations?offset={MAX_INDEX}")
        assert r.status_code == 200 and r.json()["data"] == []
        r = await client.get(f"/api/v2/conversations/edge?start_seq={MAX_INDEX}")
        assert r.status_code == 200 and r.json()["data"]["messages"] == []


@pytest.mark.parametrize("field", ["max_new_tokens", "max_tokens", "keep_first_rounds"])
async def test_huge_integers_in_the_chat_body_are_never_5xx(store: ConversationStore, field: str) -> None:
    """A reply budget past the context is a 400; keeping more first rounds
    than a conversation has keeps them all."""
    engine = Engine(store, default_registry())
    app = create_app(engine, api_keys=["key-one"])
    async with client_for(app) as client:
        for i in range(3):
            await client.post(CHAT, json={"messages": f"q{i}", "conv_uid": "body-ints"})
        for value in (2**63, 10**40):
            r = await client.post(CHAT, json={"messages": "hi", "conv_uid": "body-ints", field: value})
            expected = 200 if field == "keep_first_rounds" else 400
            assert r.status_code == expected, (field, value, r.text)


async def test_the_library_refuses_paging_past_its_range() -> None:
    from convcore import MemoryStore
    from convcore.engine import MAX_INDEX

    engine = Engine(MemoryStore(), default_registry())
    with pytest.raises(InvalidRequestError, match="offset"):
        await engine.list_conversations(offset=MAX_INDEX + 1)
    with pytest.raises(InvalidRequestError, match="start_seq"):
        await engine.read_messages("c", start_seq=MAX_INDEX + 1)
