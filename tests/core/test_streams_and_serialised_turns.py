"""Streams abandoned at every point, serialised turns, the keyed locks.

README: "if the consumer stops before the model has finished, the model's
stream is closed and nothing is stored. Once the model has finished, the turn
is stored even if the consumer is gone, and only then is the final chunk sent."
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convcore import (
    BackendError,
    Engine,
    LocalBackend,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    get_tokenizer,
)
from convcore.generation import Generation, GenerationChunk, GenerationRequest, PromptMessage
from convcore.locks import KeyedLocks
from convcore.models import AppendResult, TurnWrite
from convcore.scenes import ScenePlan, SceneRequest
from convcore.testing import RecordingBackend

pytestmark = pytest.mark.anyio


def make(
    backend: object = None, store: MemoryStore | None = None, **options: object
) -> tuple[Engine, MemoryStore]:
    store = store or MemoryStore()
    reg = ModelRegistry([ModelSpec(name="m", backend=backend or RecordingBackend(), context_window=8192)])  # type: ignore[arg-type]
    return Engine(store, reg, **options), store  # type: ignore[arg-type]


async def stored_count(store: MemoryStore) -> int:
    return sum(c.message_count for c in await store.list_conversations(limit=1000))


# -- abandoned at every point ----------------------------------------------


async def test_abandoning_after_each_chunk_matches_the_documented_outcome() -> None:
    """Close after k chunks, for every k: nothing stored until the backend has
    finished; the final chunk (finish_reason + usage) only after it is stored."""
    engine, _ = make()
    full = [c async for c in engine.chat_stream({"messages": "tell me something longer please"})]
    n = len(full)
    assert full[-1].choices[0].finish_reason == "stop" and full[-1].usage is not None
    for k in range(n + 1):
        backend = RecordingBackend()
        engine, store = make(backend)
        stream = await engine.open_stream({"messages": "tell me something longer please"})
        got = []
        while len(got) < k:
            got.append(await stream.__anext__())
        await stream.aclose()
        count = await stored_count(store)
        if k == n:
            assert count == 2
        else:
            # the backend's finish chunk has no content, so it is only read
            # after the last content chunk was delivered: stopping before the
            # final chunk means the model had not finished. The role chunk
            # waits for the backend's first piece, so the backend is open from k=1.
            assert count == 0, f"stopped after {k}/{n} chunks, yet stored"
            assert backend.closed_streams == (1 if k >= 1 else 0)


async def test_cancelling_the_consumer_task_at_each_chunk() -> None:
    for k in range(1, 8):
        backend = RecordingBackend(LocalBackend(tokens_per_second=2000))
        engine, store = make(backend)
        got: list[object] = []

        async def consume(engine: Engine = engine, got: list[object] = got, k: int = k) -> None:
            async for chunk in engine.chat_stream({"messages": "one two three four five"}):
                got.append(chunk)
                if len(got) == k:
                    await asyncio.sleep(10)

        task = asyncio.create_task(consume())
        for _ in range(200):
            await asyncio.sleep(0.001)
            if len(got) >= k or task.done():
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        finished = got and got[-1].choices[0].finish_reason is not None  # type: ignore[attr-defined]
        assert await stored_count(store) == (2 if finished else 0)


async def test_final_backend_chunk_with_content_is_stored_even_if_consumer_leaves_on_it() -> None:
    class OneShot:
        async def complete(self, request: GenerationRequest) -> Generation:
            return Generation(content="hello there")

        async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
            # OpenAI-compatible servers commonly put the last text and
            # finish_reason in one chunk.
            yield GenerationChunk(content="hello there", finish_reason="stop")

        async def aclose(self) -> None:
            return None

    engine, store = make(OneShot())
    stream = await engine.open_stream({"messages": "hi"})
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            break  # the consumer has the whole reply and leaves
    await stream.aclose()
    assert await stored_count(store) == 2


class SourcesScene:
    name = "chat_src"
    needs_param = False

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        return ScenePlan()

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        return reply + "\n[sources: doc1]"


async def test_scene_addition_chunk_does_not_lose_a_finished_turn() -> None:
    engine, store = make(scenes=[SourcesScene()])
    stream = await engine.open_stream({"messages": "hi", "chat_mode": "chat_src"})
    async for chunk in stream:
        if "sources" in (chunk.choices[0].delta.content or ""):
            break
    await stream.aclose()
    assert await stored_count(store) == 2


async def test_scene_addition_is_streamed_and_stored_when_consumed_fully() -> None:
    engine, store = make(scenes=[SourcesScene()])
    chunks = [c async for c in engine.chat_stream({"messages": "hi", "chat_mode": "chat_src"})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    msgs = await store.read_messages(chunks[0].conv_uid)
    assert msgs[-1].content == text and text.endswith("[sources: doc1]")


async def test_scene_finish_failure_stores_nothing_in_chat_and_stream() -> None:
    class Broken:
        name = "chat_broken"
        needs_param = False

        async def prepare(self, request: SceneRequest) -> ScenePlan:
            return ScenePlan()

        async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
            raise RuntimeError("scene bug")

    engine, store = make(scenes=[Broken()])
    with pytest.raises(RuntimeError):
        await engine.chat({"messages": "hi", "chat_mode": "chat_broken"})
    with pytest.raises(RuntimeError):
        async for _ in engine.chat_stream({"messages": "hi", "chat_mode": "chat_broken"}):
            pass
    assert await stored_count(store) == 0


class SlowAppendStore(MemoryStore):
    """Appends take a while; ``appending`` is set once one has started."""

    def __init__(self) -> None:
        super().__init__()
        self.appending = asyncio.Event()

    async def append_turn(self, turn: TurnWrite) -> AppendResult:
        self.appending.set()
        await asyncio.sleep(0.05)
        return await super().append_turn(turn)


async def test_cancelled_during_the_append_is_still_stored() -> None:
    store = SlowAppendStore()
    engine, _ = make(store=store)

    async def consume() -> None:
        async for _ in engine.chat_stream({"messages": "hi", "conv_uid": "c1"}):
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(store.appending.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert [m.role for m in await store.read_messages("c1")] == ["user", "assistant"]


async def test_serialized_stream_after_a_cancel_during_append_sees_the_previous_reply() -> None:
    store = SlowAppendStore()
    engine, _ = make(store=store, serialize=True)
    first = await engine.chat({"messages": "start"})

    async def consume(text: str) -> None:
        async for _ in engine.chat_stream({"messages": text, "conv_uid": first.conv_uid}):
            pass

    store.appending.clear()
    task = asyncio.create_task(consume("A"))
    await asyncio.wait_for(store.appending.wait(), 5)  # A's model has finished; its append is in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await consume("B")  # in-process serialise: must wait for A's turn, then see it
    msgs = await store.read_messages(first.conv_uid)
    assert [m.content for m in msgs if m.role == "user"] == ["start", "A", "B"]


async def test_serialized_stream_that_loses_the_race_across_engines_ends_in_conflict() -> None:
    """A stream cannot be generated again once its text went out: when another
    process appended first, it ends with ConflictError and stores nothing (the
    documented outcome; chat() regenerates instead)."""
    from convcore import ConflictError

    store = MemoryStore()
    b1 = RecordingBackend()
    e1, _ = make(b1, store=store, serialize=True)
    e2, _ = make(RecordingBackend(), store=store, serialize=True)  # another process
    first = await e1.chat({"messages": "start"})
    b1.gate = asyncio.Event()
    chunks: list[object] = []

    async def consume() -> None:
        async for c in e1.chat_stream({"messages": "streamed", "conv_uid": first.conv_uid}):
            chunks.append(c)

    task = asyncio.create_task(consume())
    while len(b1.requests) < 2:  # the stream's model call has started (under the lock)
        await asyncio.sleep(0.001)
    await e2.chat({"messages": "other", "conv_uid": first.conv_uid})
    b1.gate.set()
    with pytest.raises(ConflictError):
        await task
    msgs = await store.read_messages(first.conv_uid)
    assert [m.content for m in msgs if m.role == "user"] == ["start", "other"]


async def test_chat_conflict_retries_then_raises_conflict_error() -> None:
    from convcore import ConflictError

    class AlwaysMoving(MemoryStore):
        async def append_turn(self, turn: TurnWrite) -> AppendResult:
            if turn.expect_last_seq is not None:
                raise ConflictError("moved")
            return await super().append_turn(turn)

    backend = RecordingBackend()
    engine, store = make(backend, store=AlwaysMoving(), serialize=True, conflict_retries=2)
    with pytest.raises(ConflictError):
        await engine.chat({"messages": "x"})
    assert len(backend.requests) == 3
    assert await store.list_conversations() == []


async def test_serialized_cancel_while_waiting_for_the_lock_frees_it() -> None:
    backend = RecordingBackend()
    engine, store = make(backend, serialize=True)
    first = await engine.chat({"messages": "start"})
    backend.gate = asyncio.Event()

    async def consume(text: str) -> None:
        async for _ in engine.chat_stream({"messages": text, "conv_uid": first.conv_uid}):
            pass

    holder = asyncio.create_task(consume("holder"))
    while len(backend.requests) < 2:  # the holder has the lock and is generating
        await asyncio.sleep(0.001)
    waiters = [
        asyncio.create_task(engine.chat({"messages": f"w{i}", "conv_uid": first.conv_uid})) for i in range(5)
    ]
    stream_waiter = asyncio.create_task(consume("sw"))
    await asyncio.sleep(0.01)
    for t in [*waiters[:3], stream_waiter]:
        t.cancel()
    backend.gate.set()
    await holder
    await asyncio.gather(*waiters[3:])
    for t in [*waiters[:3], stream_waiter]:
        with pytest.raises(asyncio.CancelledError):
            await t
    assert len(engine._locks) == 0
    users = [m.content for m in await store.read_messages(first.conv_uid) if m.role == "user"]
    assert users == ["start", "holder", "w3", "w4"]


async def test_keyed_locks_cleanup_under_cancellation() -> None:
    locks = KeyedLocks()
    order: list[int] = []

    async def worker(i: int) -> None:
        async with locks.hold("k"):
            order.append(i)
            await asyncio.sleep(0.001)

    tasks = [asyncio.create_task(worker(i)) for i in range(30)]
    await asyncio.sleep(0)
    for t in tasks[5::3]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(locks) == 0
    assert len(order) == len(set(order))


async def test_backend_ending_without_finish_reason_is_a_backend_error_and_stores_nothing() -> None:
    class NoFinish:
        async def complete(self, request: GenerationRequest) -> Generation:
            return Generation(content="x")

        async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
            yield GenerationChunk(content="partial")

        async def aclose(self) -> None:
            return None

    engine, store = make(NoFinish())
    with pytest.raises(BackendError):
        async for _ in engine.chat_stream({"messages": "hi"}):
            pass
    assert await stored_count(store) == 0


# -- streamed text equals stored text ------------------------------------------

multibyte = st.text(alphabet="你好世界🎉👨‍👩‍👧é한국어ðŸ\ufffd ab", min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(multibyte, st.integers(min_value=1, max_value=40), st.sampled_from(["cl100k_base", "o200k_base"]))
def test_streamed_text_equals_stored_text_for_multibyte_replies(
    reply: str, max_new: int, encoding: str
) -> None:
    async def go() -> None:
        tok = get_tokenizer(encoding)

        def fixed(_: tuple[PromptMessage, ...]) -> str:
            return reply

        store = MemoryStore()
        reg = ModelRegistry(
            [
                ModelSpec(
                    name="m",
                    backend=LocalBackend(reply=fixed, tokenizer=tok),
                    context_window=8192,
                    encoding=encoding,
                )
            ]
        )
        engine = Engine(store, reg)
        chunks = [c async for c in engine.chat_stream({"messages": "q", "max_new_tokens": max_new})]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        msgs = await store.read_messages(chunks[0].conv_uid)
        assert msgs[-1].content == streamed
        whole = await engine.chat({"messages": "q", "max_new_tokens": max_new})
        assert whole.content == streamed

    asyncio.run(go())


async def test_cancel_during_scene_finish_still_stores_the_finished_turn() -> None:
    class SlowFinish:
        name = "chat_slow"
        needs_param = False

        async def prepare(self, request: SceneRequest) -> ScenePlan:
            return ScenePlan()

        async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
            finishing.set()
            await asyncio.sleep(0.05)
            return reply

    finishing = asyncio.Event()
    engine, store = make(scenes=[SlowFinish()])

    async def consume() -> None:
        async for _ in engine.chat_stream({"messages": "hi", "chat_mode": "chat_slow"}):
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(finishing.wait(), 5)  # the model has finished; the scene is finishing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert await stored_count(store) == 2
