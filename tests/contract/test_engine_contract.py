"""The engine's promises, checked on every store: concurrent turns from tasks
and threads, serialised turns, idempotent retries, all-or-nothing failures."""

from __future__ import annotations

import asyncio
import threading

import pytest

from convcore import (
    BackendError,
    ConflictError,
    ConversationStore,
    Engine,
    HistoryConflictError,
    LocalBackend,
    ModelRegistry,
    ModelSpec,
    SyncEngine,
)
from convcore.audit import audit_messages
from convcore.testing import RecordingBackend
from tests.stores import StoreFactory

pytestmark = pytest.mark.anyio


def registry(backend: object | None = None) -> ModelRegistry:
    return ModelRegistry([ModelSpec(name="m", backend=backend or LocalBackend(), context_window=8192)])  # type: ignore[arg-type]


async def test_100_concurrent_turns_from_tasks(store: ConversationStore) -> None:
    engine = Engine(store, registry())
    ids = [f"r{i}" for i in range(100)]
    await asyncio.gather(
        *(engine.chat({"messages": f"q-{r}", "conv_uid": "c", "request_id": r}) for r in ids)
    )
    msgs = await store.read_messages("c")
    report = audit_messages(msgs, expected_turns=ids, unique_inputs=True)
    assert report.ok, report.problems[:5]
    assert len(msgs) == 200
    for user, reply in zip(msgs[::2], msgs[1::2], strict=True):
        assert reply.content.startswith(f"You said: {user.content}")


async def test_100_concurrent_turns_from_threads(store_factory: StoreFactory) -> None:
    """Four threads, each with its own loop, engine and store object, plus
    the calls within each thread racing too."""
    ids = [f"r{i}" for i in range(100)]
    errors: list[BaseException] = []

    def worker(chunk: list[str]) -> None:
        try:
            with SyncEngine(lambda: Engine(store_factory.make(), registry(), owned=True)) as engine:
                inner = [
                    threading.Thread(
                        target=engine.chat, args=({"messages": f"q-{r}", "conv_uid": "t", "request_id": r},)
                    )
                    for r in chunk
                ]
                for t in inner:
                    t.start()
                for t in inner:
                    t.join()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(ids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    reader = store_factory.make()
    try:
        report = audit_messages(await reader.read_messages("t"), expected_turns=ids, unique_inputs=True)
    finally:
        await reader.aclose()
    assert report.ok, report.problems[:5]
    assert report.turns == 100


async def test_serialized_turns_see_the_previous_reply(store_factory: StoreFactory) -> None:
    """Two engines (no shared lock, as in two processes) in serialize mode:
    every turn's prompt holds every earlier turn."""
    engines = [
        Engine(
            store_factory.make(), registry(LocalBackend(latency=0.001)), serialize=True, conflict_retries=60
        )
        for _ in range(2)
    ]
    try:
        await asyncio.gather(
            *(engines[i % 2].chat({"messages": f"q{i}", "conv_uid": "s"}) for i in range(10))
        )
        msgs = await engines[0].store.read_messages("s")
    finally:
        for e in engines:
            await e.store.aclose()
    assert len(msgs) == 20
    for k in range(1, 10):
        assert f"earlier user messages: {k};" in msgs[2 * k + 1].content


async def test_retries_of_one_request_store_one_turn(store: ConversationStore) -> None:
    engine = Engine(store, registry())
    await engine.chat({"messages": "start", "conv_uid": "c"})
    body = {"messages": "again", "conv_uid": "c", "request_id": "same"}
    replies = await asyncio.gather(*(engine.chat(body) for _ in range(8)))
    assert len({r.content for r in replies}) == 1
    assert len(await store.read_messages("c")) == 4


async def test_failed_turns_leave_no_trace(store: ConversationStore) -> None:
    backend = RecordingBackend(fail=lambda r: "boom" in r.messages[-1].content)
    engine = Engine(store, registry(backend))
    await engine.chat({"messages": "ok", "conv_uid": "c"})
    before = await store.get_conversation("c")
    with pytest.raises(BackendError):
        await engine.chat({"messages": "boom", "conv_uid": "c"})
    stream = await engine.open_stream({"messages": "abandoned", "conv_uid": "c"})
    await stream.__anext__()
    await stream.__anext__()
    await stream.aclose()
    assert await store.get_conversation("c") == before
    assert len(await store.read_messages("c")) == 2


async def test_resent_histories_racing_store_the_new_message_once(store: ConversationStore) -> None:
    """Clients resending the whole history at once: each new message is
    stored once, after the history it was sent with, or refused (409)."""
    engine = Engine(store, registry())
    first = await engine.chat({"messages": "one", "conv_uid": "h"})
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": first.content}]
    sends = [
        engine.chat({"messages": [*history, {"role": "user", "content": f"next-{i}"}], "conv_uid": "h"})
        for i in range(6)
    ]
    outcomes = await asyncio.gather(*sends, return_exceptions=True)
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    assert all(isinstance(o, HistoryConflictError) for o in outcomes if isinstance(o, BaseException))
    assert len(won) == 1 and won[0].history_matched == 2
    msgs = await store.read_messages("h")
    assert [m.content for m in msgs[:2]] == ["one", first.content]
    assert len(msgs) == 4, "one resend won; the others found the conversation moved on"


async def test_fork_copies_the_prefix_and_leaves_the_original(store: ConversationStore) -> None:
    engine = Engine(store, registry())
    uid = "f"
    for text in ("a", "b", "c"):
        await engine.chat({"messages": text, "conv_uid": uid, "user_name": "ann"})
    original = await store.read_messages(uid)
    fork = await engine.fork(uid, 2, new_conv_uid="f2", user_name="ann")
    assert (fork.conv_uid, fork.message_count, fork.user_name) == ("f2", 2, "ann")
    copied = await store.read_messages("f2")
    assert [(m.role, m.content, m.token_count, m.starts_round) for m in copied] == [
        (m.role, m.content, m.token_count, m.starts_round) for m in original[:2]
    ]
    assert fork.total_tokens == sum(m.token_count for m in copied)
    edited = await engine.chat({"messages": "B!", "conv_uid": "f2"})
    assert edited.content == "You said: B! (earlier user messages: 1; first: 'a')"
    assert await store.read_messages(uid) == original
    with pytest.raises(ConflictError, match="already exists"):
        await engine.fork(uid, 2, new_conv_uid="f2")
