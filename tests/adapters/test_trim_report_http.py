"""The trim report over HTTP: the ``trim`` field and the ``X-Convcore-Trim`` header."""

from __future__ import annotations

import json

import pytest

from tests.adapters.server_support import CHAT, client_for, make_app
from tests.core.test_trim_report import seed

pytestmark = pytest.mark.anyio


async def test_the_report_is_a_field_and_a_header_streamed_or_not() -> None:
    app, _, app_store = make_app()
    await seed(app_store, "h", 3)
    async with client_for(app) as client:
        r = await client.post(CHAT, json={"messages": "hi", "conv_uid": "h"})
        body = r.json()
        assert body["trim"]["prompt_seqs"] == [[1, 6]] and body["trim"]["dropped_seqs"] == []
        assert r.headers["x-convcore-trim"].startswith(
            "messages=6; prompt=1-6; dropped=none; summarized=none;"
        )
        s = await client.post(CHAT, json={"messages": "again", "conv_uid": "h", "stream": True})
        assert s.headers["x-convcore-trim"].startswith("messages=8; prompt=1-8;")
        last = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")][-1]
        assert last["trim"]["history_messages"] == 8
