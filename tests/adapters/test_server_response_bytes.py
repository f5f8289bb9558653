"""The chat route's non-streaming body is encoded once, by pydantic: the
same bytes the dict-then-json path gives, for any text."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from convcore import ChatCompletion, Engine, default_registry
from convcore.memory import MemoryStore
from convcore_server.routes_chat import completion_json, completion_json_bytes


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1, max_size=60).filter(str.strip), repeat=st.booleans())
def test_the_fast_body_is_the_json_body(text: str, repeat: bool) -> None:
    async def run() -> None:
        engine = Engine(MemoryStore(), default_registry())
        request = {"messages": text, "conv_uid": "c", "request_id": "t1"}
        completion = await engine.chat(request)
        if repeat:  # a duplicate shows its flag
            completion = await engine.chat(request)
            assert completion.duplicate
        assert completion_json_bytes(completion) == JSONResponse(completion_json(completion)).body

    asyncio.run(run())


def test_every_combination_of_quiet_fields_encodes_as_the_json_body() -> None:
    import itertools

    async def turn() -> ChatCompletion:
        engine = Engine(MemoryStore(), default_registry())
        return await engine.chat({"messages": "hi", "conv_uid": "c"})

    completion = asyncio.run(turn())
    assert completion.trim is not None
    for no_trim, duplicate, created, matched in itertools.product([False, True], repeat=4):
        variant = completion.model_copy(
            update={
                "trim": None if no_trim else completion.trim,
                "duplicate": duplicate,
                "conversation_created": created,
                "history_matched": 3 if matched else 0,
            }
        )
        body = completion_json_bytes(variant)
        assert body == JSONResponse(completion_json(variant)).body
        assert (b'"trim"' in body) is not no_trim and (b'"duplicate"' in body) is duplicate
        assert (b'"conversation_created"' in body) is created and (b'"history_matched"' in body) is matched
