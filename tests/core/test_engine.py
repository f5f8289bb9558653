"""Engine behaviour on the memory store: turns, windows, idempotency, failures, streams."""

from __future__ import annotations

import asyncio

import pytest

from convcore import (
    BackendError,
    ContextOverflowError,
    Engine,
    InvalidRequestError,
    LocalBackend,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    PermissionDeniedError,
    UnknownModelError,
    UnsupportedChatModeError,
    get_tokenizer,
)
from convcore.generation import Generation, GenerationRequest
from convcore.testing import RecordingBackend
from convcore.tokens import REPLY_PRIMING_TOKENS, count_message

pytestmark = pytest.mark.anyio


def make_engine(
    backend: RecordingBackend | None = None,
    *,
    context_window: int = 8192,
    max_new_tokens: int = 256,
    model: str = "m",
    **options: object,
) -> tuple[Engine, RecordingBackend, MemoryStore]:
    backend = backend or RecordingBackend()
    store = MemoryStore()
    registry = ModelRegistry(
        [ModelSpec(name=model, backend=backend, context_window=context_window, max_new_tokens=max_new_tokens)]
    )
    return Engine(store, registry, **options), backend, store  # type: ignore[arg-type]


def prompt_tokens(messages: object) -> int:
    tok = get_tokenizer("cl100k_base")
    return REPLY_PRIMING_TOKENS + sum(
        count_message(tok, m.role, m.content, m.name)
        for m in messages  # type: ignore[attr-defined]
    )


async def test_new_conversation_then_continue_by_conv_uid() -> None:
    engine, backend, store = make_engine()
    first = await engine.chat({"messages": "Hello, I am Ada"})
    assert first.conv_uid and first.content == "You said: Hello, I am Ada"
    second = await engine.chat({"messages": "What is my name?", "conv_uid": first.conv_uid})
    assert second.conv_uid == first.conv_uid
    assert "earlier user messages: 1; first: 'Hello, I am Ada'" in second.content
    prompt = backend.requests[-1].messages
    assert [m.role for m in prompt] == ["user", "assistant", "user"]
    msgs = await store.read_messages(first.conv_uid)
    assert [m.seq for m in msgs] == [1, 2, 3, 4]


async def test_usage_counts_are_exact() -> None:
    engine, backend, _ = make_engine()
    reply = await engine.chat(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    )
    sent = backend.requests[-1].messages
    assert reply.usage.prompt_tokens == prompt_tokens(sent)
    assert reply.usage.completion_tokens == get_tokenizer().count(reply.content)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_whole_message_list_is_honoured() -> None:
    engine, backend, store = make_engine()
    reply = await engine.chat(
        {
            "messages": [
                {"role": "system", "content": "You translate."},
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "uno"},
                {"role": "user", "content": "two"},
            ]
        }
    )
    assert [m.content for m in backend.requests[-1].messages] == ["You translate.", "one", "uno", "two"]
    conv = await engine.get_conversation(reply.conv_uid)
    assert [m.content for m in conv.system] == ["You translate."]
    stored = await store.read_messages(reply.conv_uid)
    assert [(m.role, m.content, m.starts_round) for m in stored] == [
        ("user", "one", True),
        ("assistant", "uno", False),
        ("user", "two", True),
        ("assistant", reply.content, False),
    ]


async def test_resent_system_prompt_replaces_instead_of_piling_up() -> None:
    engine, backend, _ = make_engine()
    sys_msg = {"role": "system", "content": "Be kind."}
    first = await engine.chat({"messages": [sys_msg, {"role": "user", "content": "a"}]})
    await engine.chat({"messages": [sys_msg, {"role": "user", "content": "b"}], "conv_uid": first.conv_uid})
    roles = [m.role for m in backend.requests[-1].messages]
    assert roles == ["system", "user", "assistant", "user"]
    await engine.chat({"messages": "c", "conv_uid": first.conv_uid})
    assert backend.requests[-1].messages[0].content == "Be kind.", "the stored system prompt is kept"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": ""}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
        ({"messages": [{"role": "system", "content": "only"}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": "x", "temperature": 3}, "temperature"),
        ({"messages": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"messages": "x", "max_tokens": "9"}, "max_tokens"),
        ({"messages": "x", "stream": "yes"}, "stream"),
        ({"messages": "x", "conv_uid": ""}, "conv_uid"),
        ({"messages": "x", "conv_uid": "a\nb"}, "conv_uid"),
        ({"model": "m"}, "messages"),
    ],
)
async def test_invalid_requests_name_the_field_and_store_nothing(body: dict[str, object], field: str) -> None:
    engine, backend, store = make_engine()
    with pytest.raises(InvalidRequestError) as info:
        await engine.chat(body)
    assert info.value.field == field, str(info.value)
    assert await store.list_conversations() == []
    assert backend.requests == []


async def test_nulls_and_extra_fields_from_dbgpt_client_are_accepted() -> None:
    engine, _, _ = make_engine()
    reply = await engine.chat(
        {
            "messages": "hello",
            "model": None,
            "chat_mode": None,
            "chat_param": None,
            "temperature": None,
            "max_new_tokens": None,
            "max_tokens": None,
            "conv_uid": None,
            "span_id": None,
            "sys_code": None,
            "user_name": None,
            "stream": False,
            "top_k": -1,
            "n": 1,
            "incremental": True,
            "enable_vis": True,
        }
    )
    assert reply.content == "You said: hello"


async def test_unknown_model_and_chat_mode_are_typed_errors() -> None:
    engine, _, store = make_engine()
    with pytest.raises(UnknownModelError, match="'nope'"):
        await engine.chat({"messages": "x", "model": "nope"})
    with pytest.raises(UnsupportedChatModeError, match="chat_wizard"):
        await engine.chat({"messages": "x", "chat_mode": "chat_wizard"})
    assert await store.list_conversations() == []


async def test_max_new_tokens_wins_over_max_tokens_and_cuts_with_length() -> None:
    engine, backend, _ = make_engine()
    reply = await engine.chat(
        {"messages": "a long enough question here", "max_tokens": 50, "max_new_tokens": 3}
    )
    assert backend.requests[-1].max_new_tokens == 3
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    await engine.chat({"messages": "x", "max_tokens": 7})
    assert backend.requests[-1].max_new_tokens == 7


async def test_context_overflow_names_the_numbers_and_stores_nothing() -> None:
    engine, backend, store = make_engine(context_window=64, max_new_tokens=16)
    with pytest.raises(ContextOverflowError) as info:
        await engine.chat({"messages": "word " * 100})
    err = info.value
    assert (err.context_window, err.max_new_tokens) == (64, 16)
    assert err.required_tokens > 48
    assert "64" in str(err) and "16" in str(err) and str(err.required_tokens) in str(err)
    assert backend.requests == [] and await store.list_conversations() == []


async def test_window_drops_oldest_whole_rounds_and_keeps_system() -> None:
    engine, backend, _ = make_engine(context_window=200, max_new_tokens=40)
    conv = None
    for i in range(30):
        msgs: object = f"message number {i}"
        if i == 0:
            msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "message number 0"}]
        reply = await engine.chat({"messages": msgs, "conv_uid": conv})
        conv = reply.conv_uid
        sent = backend.requests[-1].messages
        assert sent[0].content == "SYS"
        assert sent[1].role == "user", "a window never starts mid-round"
        assert reply.usage.prompt_tokens + 40 <= 200
        assert reply.usage.prompt_tokens == prompt_tokens(sent)
    assert len(backend.requests[-1].messages) < 60


async def test_keep_first_rounds() -> None:
    engine, backend, _ = make_engine(context_window=220, max_new_tokens=40, keep_first_rounds=1)
    conv = None
    for i in range(25):
        reply = await engine.chat({"messages": f"question {i}", "conv_uid": conv})
        conv = reply.conv_uid
    sent = backend.requests[-1].messages
    assert sent[0].content == "question 0" and sent[1].role == "assistant"
    assert sent[2].content != "question 1", "the middle was dropped"
    assert sent[-1].content == "question 24"


async def test_retry_with_request_id_returns_stored_reply_without_generating() -> None:
    engine, backend, store = make_engine()
    first = await engine.chat({"messages": "hi", "request_id": "req-1"})
    again = await engine.chat({"messages": "hi", "request_id": "req-1"})
    assert again.duplicate and not first.duplicate
    assert again.conv_uid == first.conv_uid, "a retried first turn lands in the same conversation"
    assert again.content == first.content and again.usage == first.usage and again.id == first.id
    assert len(backend.requests) == 1
    later = await engine.chat({"messages": "next", "conv_uid": first.conv_uid, "request_id": "req-2"})
    retry = await engine.chat({"messages": "next", "conv_uid": first.conv_uid, "request_id": "req-2"})
    assert retry.content == later.content and retry.duplicate
    assert len(await store.read_messages(first.conv_uid)) == 4


async def test_concurrent_retries_of_one_request_store_one_turn() -> None:
    engine, _, store = make_engine()
    first = await engine.chat({"messages": "start"})
    body = {"messages": "again", "conv_uid": first.conv_uid, "request_id": "same"}
    replies = await asyncio.gather(*(engine.chat(body) for _ in range(10)))
    assert len({r.content for r in replies}) == 1
    assert sum(not r.duplicate for r in replies) == 1
    assert len(await store.read_messages(first.conv_uid)) == 4


async def test_failed_generation_leaves_history_unchanged() -> None:
    backend = RecordingBackend(fail=lambda r: r.messages[-1].content == "boom")
    engine, _, store = make_engine(backend)
    first = await engine.chat({"messages": "fine"})
    before = await store.read_messages(first.conv_uid)
    conv_before = await store.get_conversation(first.conv_uid)
    with pytest.raises(BackendError):
        await engine.chat({"messages": "boom", "conv_uid": first.conv_uid})
    with pytest.raises(BackendError):
        async for _ in engine.chat_stream({"messages": "boom", "conv_uid": first.conv_uid}):
            pass
    assert await store.read_messages(first.conv_uid) == before
    assert await store.get_conversation(first.conv_uid) == conv_before


async def test_unexpected_backend_exception_becomes_backend_error() -> None:
    class Broken(LocalBackend):
        async def complete(self, request):  # type: ignore[no-untyped-def]
            raise RuntimeError("socket exploded")

    engine, _, store = make_engine(RecordingBackend(Broken()))
    with pytest.raises(BackendError, match="socket exploded") as info:
        await engine.chat({"messages": "x"})
    assert isinstance(info.value.__cause__, RuntimeError)
    assert await store.list_conversations() == []


async def test_other_users_conversation_is_refused() -> None:
    engine, _, store = make_engine()
    mine = await engine.chat({"messages": "x", "user_name": "ann"})
    with pytest.raises(PermissionDeniedError):
        await engine.chat({"messages": "y", "conv_uid": mine.conv_uid, "user_name": "bob"})
    with pytest.raises(PermissionDeniedError):
        await engine.read_messages(mine.conv_uid, user_name="bob")
    with pytest.raises(PermissionDeniedError):
        await engine.delete_conversation(mine.conv_uid, user_name="bob")
    assert len(await store.read_messages(mine.conv_uid)) == 2
    assert await engine.delete_conversation(mine.conv_uid, user_name="ann")
    assert not await engine.delete_conversation(mine.conv_uid, user_name="ann")


class _MeetingBackend(RecordingBackend):
    """Generates only once ``count`` requests are waiting: every turn has
    read the conversation before any stores."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.all_here = asyncio.Event()

    async def complete(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        if len(self.requests) >= self.count:
            self.all_here.set()
        await self.all_here.wait()
        return await self.inner.complete(request)


async def test_users_racing_to_start_a_conversation_never_share_it() -> None:
    """Both turns read "no such conversation" and pass the owner check;
    the store's own check refuses the one that comes second."""
    backend = _MeetingBackend(2)
    engine, _, store = make_engine(backend)
    turns = [
        {"messages": f"{user}'s secret", "conv_uid": "shared", "user_name": user} for user in ("ann", "bob")
    ]
    outcomes = await asyncio.gather(*(engine.chat(t, owned_only=True) for t in turns), return_exceptions=True)
    assert sum(isinstance(o, PermissionDeniedError) for o in outcomes) == 1, outcomes
    conv = await store.get_conversation("shared")
    assert conv is not None
    messages = await store.read_messages("shared")
    assert messages[0].content == f"{conv.user_name}'s secret"
    assert len(messages) == 2, "nothing of the refused turn is stored"


async def test_streams_racing_to_start_a_conversation_never_share_it() -> None:
    engine, backend, store = make_engine()
    backend.gate = asyncio.Event()  # both streams have read and begun before either stores

    async def stream(user: str) -> list[str]:
        turn = {"messages": f"{user}'s secret", "conv_uid": "shared", "user_name": user}
        return [c.choices[0].delta.content or "" async for c in engine.chat_stream(turn, owned_only=True)]

    racing = [asyncio.ensure_future(stream(user)) for user in ("ann", "bob")]
    while len(backend.requests) < 2:
        await asyncio.sleep(0)
    backend.gate.set()
    outcomes = await asyncio.gather(*racing, return_exceptions=True)
    assert sum(isinstance(o, PermissionDeniedError) for o in outcomes) == 1, outcomes
    conv = await store.get_conversation("shared")
    assert conv is not None
    assert (await store.read_messages("shared"))[0].content == f"{conv.user_name}'s secret"
    assert conv.message_count == 2


# -- streams ---------------------------------------------------------------


async def test_stream_yields_tokens_then_stores_then_final_chunk() -> None:
    engine, _, store = make_engine()
    chunks = [c async for c in engine.chat_stream({"messages": "stream me"})]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.conv_uid == chunks[0].conv_uid and c.id == chunks[0].id for c in chunks)
    final = chunks[-1]
    assert final.choices[0].finish_reason == "stop" and final.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "You said: stream me"
    assert len(chunks) > 4, "token by token"
    stored = await store.read_messages(final.conv_uid)
    assert stored[-1].content == text
    assert final.usage.completion_tokens == get_tokenizer().count(text)


async def test_abandoned_stream_stores_nothing_and_closes_the_backend() -> None:
    engine, backend, store = make_engine()
    first = await engine.chat({"messages": "keep"})
    stream = await engine.open_stream({"messages": "abandon me please", "conv_uid": first.conv_uid})
    got = [await stream.__anext__() for _ in range(3)]
    assert got[2].choices[0].delta.content
    await stream.aclose()
    assert backend.closed_streams == 1
    assert len(await store.read_messages(first.conv_uid)) == 2


async def test_cancelled_stream_consumer_before_finish_stores_nothing() -> None:
    backend = RecordingBackend()
    backend.gate = asyncio.Event()  # the backend stalls after its first chunk
    engine, _, store = make_engine(backend)
    seen = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.chat_stream({"messages": "cancel me", "conv_uid": "c1"}):
            seen.set()

    task = asyncio.create_task(consume())
    await seen.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.closed_streams == 1
    assert await store.get_conversation("c1") is None


async def test_stream_is_stored_once_generation_finished_even_if_consumer_leaves() -> None:
    engine, _, store = make_engine()
    stream = await engine.open_stream({"messages": "finish", "conv_uid": "c2"})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
    assert len(await store.read_messages("c2")) == 2


async def test_bad_stream_request_fails_before_the_first_chunk() -> None:
    engine, backend, _ = make_engine(context_window=40, max_new_tokens=30)
    with pytest.raises(ContextOverflowError):
        await engine.open_stream({"messages": "a question that is far too long " * 5})
    assert backend.requests == []


async def test_retried_stream_replays_the_stored_reply() -> None:
    engine, backend, _ = make_engine()
    body = {"messages": "hi", "conv_uid": "c3", "request_id": "r"}
    first = [c async for c in engine.chat_stream(body)]
    again = [c async for c in engine.chat_stream(body)]
    text = lambda cs: "".join(c.choices[0].delta.content or "" for c in cs)  # noqa: E731
    assert text(first) == text(again)
    assert again[-1].usage == first[-1].usage
    assert len(backend.requests) == 1


# -- concurrency and serialisation -------------------------------------------


async def test_concurrent_turns_keep_pairs_adjacent() -> None:
    engine, _, store = make_engine()
    await engine.chat({"messages": "start", "conv_uid": "race"})
    await asyncio.gather(*(engine.chat({"messages": f"q{i}", "conv_uid": "race"}) for i in range(100)))
    msgs = await store.read_messages("race")
    assert [m.seq for m in msgs] == list(range(1, 203))
    for user, reply in zip(msgs[::2], msgs[1::2], strict=True):
        assert user.role == "user" and reply.role == "assistant" and reply.turn_id == user.turn_id
        assert reply.content.startswith(f"You said: {user.content}")


async def test_serialized_turns_each_see_the_previous_reply() -> None:
    engine, _, store = make_engine(RecordingBackend(LocalBackend(latency=0.001)), serialize=True)
    await asyncio.gather(*(engine.chat({"messages": f"q{i}", "conv_uid": "s"}) for i in range(20)))
    msgs = await store.read_messages("s")
    for k, user in enumerate(msgs[::2]):
        # The k-th stored turn's prompt held all k earlier rounds.
        assert f"earlier user messages: {k};" in msgs[2 * k + 1].content or k == 0, (k, user.content)
    assert len(engine._locks) == 0, "per-conversation locks are released"


async def test_serialized_turns_across_engines_retry_on_conflict() -> None:
    """Two engines (as two processes would) share a store but not a lock."""
    store = MemoryStore()
    engines = [
        Engine(
            store,
            ModelRegistry([ModelSpec(name="m", backend=LocalBackend(latency=0.002), context_window=8192)]),
            serialize=True,
            conflict_retries=50,
        )
        for _ in range(2)
    ]
    await asyncio.gather(*(engines[i % 2].chat({"messages": f"q{i}", "conv_uid": "x"}) for i in range(12)))
    msgs = await store.read_messages("x")
    assert len(msgs) == 24
    for k in range(1, 12):
        assert f"earlier user messages: {k};" in msgs[2 * k + 1].content


async def test_a_request_id_reused_for_other_input_is_a_conflict() -> None:
    from convcore import ConflictError

    engine, backend, store = make_engine()
    first = await engine.chat({"messages": "hello", "request_id": "r1"})
    with pytest.raises(ConflictError, match="different request"):
        await engine.chat({"messages": "something else", "conv_uid": first.conv_uid, "request_id": "r1"})
    with pytest.raises(ConflictError):
        [
            c
            async for c in engine.chat_stream(
                {"messages": "else", "conv_uid": first.conv_uid, "request_id": "r1"}
            )
        ]
    same = await engine.chat({"messages": "hello", "conv_uid": first.conv_uid, "request_id": "r1"})
    assert same.duplicate and same.content == first.content
    assert len(backend.requests) == 1 and len(await store.read_messages(first.conv_uid)) == 2
