"""Property-based fuzzing of the chat endpoints: never a 5xx, and a rejected
request stores nothing.

Bodies are built field by field from plausible and arbitrary JSON values,
with random extra fields, plus raw junk. Each example runs on its own event
loop (``anyio.run``), against one app and one memory store for the module.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convcore import Engine, MemoryStore, default_registry
from convcore_server import create_app
from tests.adapters.server_support import CHAT, KEYS, assert_error_body, assert_valid_sse, stored

STORE = MemoryStore()
APP = create_app(
    Engine(STORE, default_registry()), api_keys=KEYS, max_body_bytes=64_000, max_message_chars=2_000
)
KB = "/api/knowledge/chat/completions"

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "wizard", ""])
message = st.fixed_dictionaries(
    {"role": roles | json_values, "content": st.text(max_size=40) | json_values},
    optional={"name": st.text(max_size=10) | json_values, "tool_call_id": json_values},
)
short_ids = st.none() | st.text(max_size=12) | st.sampled_from(["conv-a", "conv-b", " ", "\x00"])
fields: dict[str, st.SearchStrategy[Any]] = {
    "messages": st.text(max_size=60) | st.lists(message, max_size=4) | json_values,
    "model": st.none() | st.just("convcore-local") | st.text(max_size=10) | json_values,
    "chat_mode": st.sampled_from([None, "chat_normal", "chat_app", "chat_data", ""]) | json_values,
    "chat_param": st.none() | st.text(max_size=10) | json_values,
    "max_new_tokens": st.none() | st.integers(min_value=-3, max_value=20_000) | json_values,
    "max_tokens": st.none() | st.integers(min_value=-3, max_value=20_000) | json_values,
    "temperature": st.none() | st.floats(min_value=-1, max_value=3) | json_values,
    "stream": st.none() | st.booleans() | json_values,
    "conv_uid": short_ids | json_values,
    "request_id": short_ids | json_values,
    "user_name": st.none() | st.sampled_from(["ada", "bob"]) | json_values,
    "sys_code": st.none() | st.sampled_from(["s1", "s2"]) | json_values,
    "span_id": st.none() | json_values,
    "keep_first_rounds": st.none() | st.integers(min_value=-2, max_value=5) | json_values,
    "serialize": st.none() | st.booleans() | json_values,
    "top_k": st.just(-1) | json_values,
    "n": st.just(1) | json_values,
    "incremental": st.just(True) | json_values,
    "enable_vis": st.just(True) | json_values,
}
bodies = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries({}, optional=fields),
    st.dictionaries(st.text(max_size=12), json_values, max_size=3),
).map(lambda body: json.dumps(body).encode())
junk = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())


async def _post(path: str, body: bytes) -> tuple[httpx.Response, tuple[int, int], tuple[int, int]]:
    before = await stored(STORE)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(APP),
        base_url="http://convcore.test",
        headers={"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"},
    ) as client:
        response = await client.post(path, content=body)
    return response, before, await stored(STORE)


def _check_chat(body: bytes) -> None:
    r, before, after = anyio.run(_post, CHAT, body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_error_body(r.json())
        assert after == before
    elif r.headers["content-type"].startswith("text/event-stream"):
        chunks = assert_valid_sse(r.text)
        if "error" in chunks[-1]:
            assert after == before
    else:
        reply = r.json()
        assert isinstance(reply["usage"], dict)
        assert reply["choices"][0]["finish_reason"] in {"stop", "length"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_fuzzed_chat_bodies_never_5xx_and_rejects_store_nothing(body: bytes) -> None:
    _check_chat(body)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk)
def test_junk_bodies_are_4xx_json(body: bytes) -> None:
    r, before, after = anyio.run(_post, CHAT, body)
    assert 400 <= r.status_code < 500, r.text
    assert_error_body(r.json())
    assert after == before


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies | junk)
def test_fuzzed_knowledge_bodies_answer_envelopes(body: bytes) -> None:
    r, before, after = anyio.run(_post, KB, body)
    assert r.status_code < 500, r.text
    if r.headers["content-type"].startswith("application/json"):
        envelope = r.json()
        assert {"code", "message", "request_id"} <= set(envelope)
        assert (envelope["code"] == 0) == (r.status_code == 200)
        if r.status_code >= 400:
            assert envelope["code"] in {1000002, 1000003, r.status_code}
            assert after == before
