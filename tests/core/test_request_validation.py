"""Request validation, idempotency keys, ownership, listing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from convcore import (
    ConvcoreError,
    Engine,
    InvalidRequestError,
    LocalBackend,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    PermissionDeniedError,
    get_tokenizer,
    open_engine,
)
from convcore.schema import parse_chat_request
from convcore.testing import RecordingBackend

pytestmark = pytest.mark.anyio


def make(
    backend: RecordingBackend | None = None, **options: object
) -> tuple[Engine, RecordingBackend, MemoryStore]:
    backend = backend or RecordingBackend()
    store = MemoryStore()
    reg = ModelRegistry([ModelSpec(name="m", backend=backend, context_window=8192, max_new_tokens=256)])
    return Engine(store, reg, **options), backend, store  # type: ignore[arg-type]


# -- validation ----------------------------------------------------------------

BAD = [
    ({"messages": "x", "temperature": float("nan")}, "temperature"),
    ({"messages": "x", "temperature": float("inf")}, "temperature"),
    ({"messages": "x", "temperature": -0.1}, "temperature"),
    ({"messages": "x", "temperature": True}, "temperature"),
    ({"messages": "x", "temperature": "0.5"}, "temperature"),
    ({"messages": "x", "max_new_tokens": True}, "max_new_tokens"),
    ({"messages": "x", "max_new_tokens": 1.5}, "max_new_tokens"),
    ({"messages": "x", "max_new_tokens": -5}, "max_new_tokens"),
    ({"messages": "x", "max_tokens": False}, "max_tokens"),
    ({"messages": "x", "keep_first_rounds": True}, "keep_first_rounds"),
    ({"messages": "x", "keep_first_rounds": -1}, "keep_first_rounds"),
    ({"messages": "x", "serialize": 1}, "serialize"),
    ({"messages": "x", "stream": 1}, "stream"),
    ({"messages": "x", "request_id": 123}, "request_id"),
    ({"messages": "x", "request_id": ""}, "request_id"),
    ({"messages": "x", "request_id": "a\tb"}, "request_id"),
    ({"messages": "x", "conv_uid": "x" * 1025}, "conv_uid"),
    ({"messages": "x", "user_name": "u" * 257}, "user_name"),
    ({"messages": "x", "user_name": ["ann"]}, "user_name"),
    ({"messages": "x", "sys_code": 7}, "sys_code"),
    ({"messages": "x", "model": ""}, "model"),
    ({"messages": "x", "chat_param": {"a": 1}}, "chat_param"),
    ({"messages": None}, "messages"),
    ({"messages": {"role": "user", "content": "x"}}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [1]}, "messages.0"),
    ({"messages": [[{"role": "user", "content": "x"}]]}, "messages.0"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages.0.content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content.0.image_url.url",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "developer", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "critic", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x", "name": 3}]}, "messages.0.name"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"messages": "x", "chat_param": "\ud800"}, "chat_param"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
async def test_bad_values_are_invalid_request_errors_naming_the_field(
    body: dict[str, object], field: str
) -> None:
    engine, backend, store = make()
    with pytest.raises(InvalidRequestError) as info:
        await engine.chat(body)
    assert info.value.field == field, str(info.value)
    with pytest.raises(InvalidRequestError):
        await engine.open_stream(body)
    assert await store.list_conversations() == []
    assert backend.requests == []


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"messages": []}, "messages: must not be empty"),
        ({"messages": ""}, "messages: must not be empty"),
        ({"messages": 3}, "messages: must be a string or a list, got int"),
        ({"messages": None}, "messages: must be a string or a list, got NoneType"),
        ({"messages": "x", "stop": []}, "stop: must not be empty"),
        ({"messages": "x", "stop": 5}, "stop: must be a string or a list, got int"),
        ({"messages": "x", "temperature": 3}, "temperature: Input should be less than or equal to 2"),
    ],
)
def test_a_union_field_says_what_is_wrong_with_the_value(body: dict[str, object], says: str) -> None:
    """An empty list is the right type, too short: not "must be a list, got list"."""
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body)
    assert str(info.value) == says


@pytest.mark.parametrize("body", [[], "x", 5, None, b"{}"])
def test_non_object_bodies_are_invalid(body: object) -> None:
    with pytest.raises(InvalidRequestError):
        parse_chat_request(body)


@pytest.mark.parametrize(
    "messages",
    [
        "\ud800 hi",
        [{"role": "user", "content": "\udcff"}],
        [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
    ],
)
def test_message_content_with_lone_surrogates_is_invalid(messages: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request({"messages": messages})
    assert info.value.field is not None and info.value.field.startswith("messages")


async def test_unencodable_content_is_refused_before_generation_on_sqlite(tmp_path: Path) -> None:
    async with open_engine(f"sqlite:///{tmp_path / 'c.db'}") as engine:
        with pytest.raises(ConvcoreError):
            await engine.chat({"messages": "\ud800 hi"})


@pytest.mark.parametrize("content", ["", "   "])
async def test_blank_list_content_is_refused_like_a_blank_string(content: str) -> None:
    engine, _backend, store = make()
    with pytest.raises(InvalidRequestError):
        await engine.chat({"messages": "   "})
    with pytest.raises(InvalidRequestError):
        await engine.chat({"messages": [{"role": "user", "content": content}]})
    assert await store.list_conversations() == []


async def test_control_characters_unicode_and_special_tokens_round_trip() -> None:
    engine, _backend, store = make()
    text = "nul\x00 bell\x07 <|endoftext|> <|im_start|>user 你好 🎉 \u202e rtl"
    reply = await engine.chat({"messages": [{"role": "user", "content": text, "name": "名前"}]})
    msgs = await store.read_messages(reply.conv_uid)
    assert msgs[0].content == text and msgs[0].name == "名前"
    tok = get_tokenizer()
    assert msgs[0].token_count == 3 + tok.count("user") + tok.count(text) + 1 + tok.count("名前")


async def test_name_is_passed_to_the_model_and_counted() -> None:
    engine, backend, _ = make()
    r = await engine.chat({"messages": [{"role": "user", "content": "hi", "name": "ada"}]})
    sent = backend.requests[-1].messages
    assert sent[-1].name == "ada"
    tok = get_tokenizer()
    assert r.usage.prompt_tokens == 3 + (3 + tok.count("user") + tok.count("hi") + 1 + tok.count("ada"))


# -- idempotency ---------------------------------------------------------------


async def test_same_request_id_from_two_users_starts_two_conversations() -> None:
    engine, _, _store = make()
    a = await engine.chat({"messages": "my secret is 42", "request_id": "req-1", "user_name": "ann"})
    b = await engine.chat({"messages": "hello", "request_id": "req-1", "user_name": "bob"})
    assert b.conv_uid != a.conv_uid and not b.duplicate


async def test_reused_request_id_without_conv_uid_does_not_reveal_another_conversation() -> None:
    engine, _, _ = make()
    a = await engine.chat({"messages": "my secret is 42", "request_id": "7", "user_name": "ann"})
    other = await engine.chat({"messages": "hello", "request_id": "7", "sys_code": "other-system"})
    assert "secret" not in other.content and other.conv_uid != a.conv_uid


async def test_request_id_reused_on_another_conversation_is_a_new_turn() -> None:
    engine, _backend, store = make()
    one = await engine.chat({"messages": "a"})
    two = await engine.chat({"messages": "b"})
    r1 = await engine.chat({"messages": "x", "conv_uid": one.conv_uid, "request_id": "k"})
    r2 = await engine.chat({"messages": "y", "conv_uid": two.conv_uid, "request_id": "k"})
    assert not r1.duplicate and not r2.duplicate
    assert (
        len(await store.read_messages(one.conv_uid)) == 4
        and len(await store.read_messages(two.conv_uid)) == 4
    )


@pytest.mark.parametrize("serialize", [False, True])
async def test_first_turn_retry_racing_itself_mixed_stream_and_chat(serialize: bool) -> None:
    backend = RecordingBackend(LocalBackend(latency=0.01))
    engine, _, store = make(backend, serialize=serialize)
    body = {"messages": "only once", "request_id": "first-turn"}

    async def streamed() -> str:
        chunks = [c async for c in engine.chat_stream(body)]
        assert chunks[-1].choices[0].finish_reason == "stop"
        return chunks[0].conv_uid

    async def whole() -> str:
        return (await engine.chat(body)).conv_uid

    uids = await asyncio.gather(*[streamed() if i % 2 else whole() for i in range(10)])
    assert len(set(uids)) == 1
    convs = await store.list_conversations()
    assert len(convs) == 1 and convs[0].message_count == 2
    again = await engine.chat(body)
    assert again.duplicate and again.conv_uid == uids[0]


async def test_retried_stream_turn_replays_through_chat_and_stream() -> None:
    engine, backend, _ = make()
    chunks = [c async for c in engine.chat_stream({"messages": "hi", "request_id": "s1"})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = len(backend.requests)
    again = await engine.chat({"messages": "hi", "request_id": "s1", "conv_uid": chunks[0].conv_uid})
    assert again.duplicate and again.content == text and again.id == "s1"
    replay = [c async for c in engine.chat_stream({"messages": "hi", "request_id": "s1"})]
    assert "".join(c.choices[0].delta.content or "" for c in replay) == text
    assert replay[-1].usage == chunks[-1].usage
    assert len(backend.requests) == calls


# -- ownership and listing -----------------------------------------------------


async def test_ownership_is_checked_on_every_path() -> None:
    engine, backend, store = make()
    mine = await engine.chat({"messages": "x", "user_name": "ann", "sys_code": "s1", "request_id": "r"})
    uid = mine.conv_uid
    bad = [{"user_name": "bob"}, {"sys_code": "s2"}, {"user_name": "ann", "sys_code": "s2"}]
    for owner in bad:
        with pytest.raises(PermissionDeniedError):
            await engine.chat({"messages": "y", "conv_uid": uid, **owner})
        with pytest.raises(PermissionDeniedError):
            await engine.open_stream({"messages": "y", "conv_uid": uid, **owner})
        with pytest.raises(PermissionDeniedError):  # a retry of ann's turn by bob
            await engine.chat({"messages": "x", "conv_uid": uid, "request_id": "r", **owner})
        with pytest.raises(PermissionDeniedError):
            await engine.get_conversation(uid, **owner)  # type: ignore[arg-type]
        with pytest.raises(PermissionDeniedError):
            await engine.read_messages(uid, **owner)  # type: ignore[arg-type]
        with pytest.raises(PermissionDeniedError):
            await engine.delete_conversation(uid, **owner)  # type: ignore[arg-type]
    assert len(await store.read_messages(uid)) == 2
    assert len(backend.requests) == 1
    assert [c.conv_uid for c in await engine.list_conversations(user_name="ann")] == [uid]
    assert await engine.list_conversations(user_name="bob") == []
    assert await engine.list_conversations(sys_code="s2") == []


async def test_list_paging_and_delete_semantics() -> None:
    ticks = iter(range(1, 1000))
    engine, _, store = make(clock=lambda: float(next(ticks)))
    uids = [(await engine.chat({"messages": f"m{i}", "user_name": "ann"})).conv_uid for i in range(5)]
    listed = [c.conv_uid for c in await engine.list_conversations(user_name="ann", limit=2, offset=1)]
    assert listed == [uids[3], uids[2]]  # newest first
    assert await engine.list_conversations(limit=0) == []
    assert await engine.delete_conversation(uids[0])
    assert not await engine.delete_conversation(uids[0])
    assert not await engine.delete_conversation("never-existed")
    assert await store.read_messages(uids[0]) == []
    # a deleted conversation can be started afresh under the same id
    again = await engine.chat({"messages": "new", "conv_uid": uids[0]})
    assert [m.seq for m in await store.read_messages(again.conv_uid)] == [1, 2]


async def test_negative_paging_is_refused() -> None:
    engine, _, _ = make()
    for i in range(4):
        await engine.chat({"messages": f"m{i}"})
    with pytest.raises(InvalidRequestError):
        await engine.list_conversations(limit=-1)
    with pytest.raises(InvalidRequestError):
        await engine.list_conversations(offset=-2)


def test_audit_sees_a_turn_stored_twice_back_to_back() -> None:
    from convcore.audit import audit_messages
    from convcore.models import Message

    def msg(seq: int, role: str, content: str) -> Message:
        return Message(role=role, content=content, token_count=5, seq=seq, turn_id="t1", created_at=1.0)  # type: ignore[arg-type]

    twice = [msg(1, "user", "q"), msg(2, "assistant", "a"), msg(3, "user", "q"), msg(4, "assistant", "a")]
    report = audit_messages(twice, expected_turns=["t1"])
    assert not report.ok and report.duplicated == 1


@pytest.mark.parametrize(
    "field", ["max_new_tokens", "max_tokens", "max_completion_tokens", "keep_first_rounds", "seed"]
)
def test_an_integral_number_is_the_integer_json_schema_says_it_is(field: str) -> None:
    # JSON has one number type, and JSON Schema's "integer" matches 2.0: so does the request.
    req = parse_chat_request({"messages": "x", field: 2.0})
    value = getattr(req, field)
    assert value == 2 and type(value) is int
    for bad in (2.5, "2", True):
        with pytest.raises(InvalidRequestError) as info:
            parse_chat_request({"messages": "x", field: bad})
        assert info.value.field == field
