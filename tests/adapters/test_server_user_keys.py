"""Keys bound to a user: each tenant sees only its own conversations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from convcore import Engine, MemoryStore, default_registry
from convcore_server import create_app
from convcore_server.cli import UsageError, parse_args

pytestmark = pytest.mark.anyio

CHAT = "/api/v2/chat/completions"


@pytest.fixture
async def clients() -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    engine = Engine(MemoryStore(), default_registry())
    app = create_app(engine, api_keys=["admin-key"], user_keys={"alice-key": "alice", "bob-key": "bob"})
    transport = httpx.ASGITransport(app=app)
    made = {
        who: httpx.AsyncClient(
            transport=transport, base_url="http://t", headers={"Authorization": f"Bearer {who}-key"}
        )
        for who in ("alice", "bob", "admin")
    }
    try:
        yield made
    finally:
        for c in made.values():
            await c.aclose()


async def test_a_bound_key_acts_as_its_user(clients: dict[str, httpx.AsyncClient]) -> None:
    alice, bob = clients["alice"], clients["bob"]
    mine = (await alice.post(CHAT, json={"messages": "alice's secret"})).json()
    conv = mine["conv_uid"]
    path = f"/api/v2/conversations/{conv}"
    read = await alice.get(path)
    assert read.status_code == 200 and read.json()["data"]["conversation"]["user_name"] == "alice"
    # bob's key is refused on alice's conversation, whatever user_name it claims
    assert (await bob.get(path)).status_code == 403
    assert (await bob.get(path, params={"user_name": "alice"})).status_code == 403
    denied = await bob.post(CHAT, json={"messages": "let me in", "conv_uid": conv})
    assert denied.status_code == 403 and denied.json()["success"] is False
    assert (await bob.post(CHAT, json={"messages": "x", "user_name": "alice"})).status_code == 403
    assert (await bob.delete(path)).status_code == 403
    # listing is scoped too
    await bob.post(CHAT, json={"messages": "bob's own"})
    listed = (await bob.get("/api/v2/conversations")).json()["data"]
    assert [c["user_name"] for c in listed] == ["bob"]
    assert (await alice.get(path)).json()["data"]["conversation"]["message_count"] == 2


async def test_an_unbound_key_keeps_the_query_semantics(clients: dict[str, httpx.AsyncClient]) -> None:
    conv = (await clients["alice"].post(CHAT, json={"messages": "hi"})).json()["conv_uid"]
    admin = clients["admin"]
    assert (await admin.get(f"/api/v2/conversations/{conv}")).status_code == 200
    assert (await admin.get(f"/api/v2/conversations/{conv}", params={"user_name": "bob"})).status_code == 403


def test_cli_takes_user_keys_from_flags_and_env() -> None:
    opts = parse_args(["--user-key", "alice:k1"], {"CONVCORE_USER_KEYS": "bob:k2, carol:k3"})
    assert dict(opts.user_keys) == {"k1": "alice", "k2": "bob", "k3": "carol"}
    with pytest.raises(UsageError, match="USER:KEY"):
        parse_args(["--user-key", "nocolon"], {})
    with pytest.raises(UsageError, match="both"):
        parse_args(["--api-key", "k1", "--user-key", "alice:k1"], {})
