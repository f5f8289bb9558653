"""Over HTTP: a stream racing a non-streamed request with the same
Idempotency-Key and other input gets 200 but ends with a conflict error
chunk, never a successful stop; only the original is stored."""

from __future__ import annotations

import asyncio
import json

import pytest

from convcore.testing import RecordingBackend
from tests.adapters.server_support import CHAT, assert_valid_sse, client_for, make_app, registry_with

pytestmark = pytest.mark.anyio


async def test_a_stream_that_loses_its_idempotency_key_to_another_input_ends_in_a_conflict_chunk() -> None:
    backend = RecordingBackend()
    backend.gate = asyncio.Event()  # streams wait after their first piece; complete() does not
    app, _, store = make_app(registry_with("m", backend))
    headers = {"Idempotency-Key": "same-key"}
    async with client_for(app) as c:
        streamed = asyncio.ensure_future(
            c.post(CHAT, json={"messages": "streamed", "conv_uid": "race", "stream": True}, headers=headers)
        )
        while not backend.requests:
            await asyncio.sleep(0.005)
        original = await c.post(CHAT, json={"messages": "original", "conv_uid": "race"}, headers=headers)
        backend.gate.set()
        stream = await asyncio.wait_for(streamed, 10)
    assert original.status_code == 200 and stream.status_code == 200
    chunks = assert_valid_sse(stream.text)
    last = chunks[-1]
    assert last["err_code"] == "conflict" and last["success"] is False, json.dumps(last)
    assert "choices" not in last  # the error is an event of its own, not a chunk
    assert not any(ch.get("choices", [{}])[0].get("finish_reason") == "stop" for ch in chunks[:-1])
    messages = await store.read_messages("race")
    assert messages[0].content == "original" and len(messages) == 2
