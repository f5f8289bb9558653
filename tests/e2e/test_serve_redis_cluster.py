"""``convcore serve --store redis+cluster://…`` as a real process, with the
scenes extra installed: it starts, and one storage on the cluster holds the
chat modes' records and the conversations, under the URL's prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from convcore import open_store
from tests.e2e.serve_support import KEYS, serve
from tests.stores.redis import cluster_factory

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


@pytest.fixture
async def cluster_url() -> AsyncIterator[str]:
    async with cluster_factory() as factory:
        try:
            assert factory.url is not None
            yield factory.url
        finally:
            await factory.cleanup()


async def test_serve_on_a_cluster_keeps_records_and_conversations(cluster_url: str, tmp_path: Path) -> None:
    with serve(tmp_path, store=cluster_url) as server:
        auth = {"Authorization": f"Bearer {KEYS[0]}"}
        async with httpx.AsyncClient(base_url=server.api, headers=auth, timeout=30) as c:
            created = await c.post("/serve/apps", json={"app_code": "helper", "app_name": "Helper"})
            assert created.status_code == 200, created.text
            listed = (await c.get("/serve/apps")).json()["data"]["app_list"]
            assert [a["app_code"] for a in listed] == ["helper"]
            chat = await c.post(
                "/chat/completions",
                json={"messages": "hello", "chat_mode": "chat_app", "chat_param": "helper"},
            )
            assert chat.status_code == 200, chat.text
            conv_uid = chat.json()["conv_uid"]
    store = open_store(cluster_url)
    try:
        app = await store.records.get("app", "helper")
        assert app is not None and app["app_name"] == "Helper"
        conv = await store.get_conversation(conv_uid)
        assert conv is not None and conv.chat_mode == "chat_app" and conv.message_count == 2
    finally:
        await store.aclose()
