"""A streamed turn whose request id is stored by a racing request, on every
store: the stream ends well only if what it showed is what was stored."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from convcore import ConflictError, ConversationStore, Engine, LocalBackend, ModelRegistry, ModelSpec
from convcore.generation import Generation, GenerationChunk, GenerationRequest

pytestmark = pytest.mark.anyio


class CountingBackend(LocalBackend):
    """The local echo, numbered per call, so two generations of one input differ."""

    calls = 0

    def _number(self, text: str) -> str:
        self.calls += 1
        return f"{text} #{self.calls}"

    async def complete(self, request: GenerationRequest) -> Generation:
        gen = await super().complete(request)
        return Generation(content=self._number(gen.content), finish_reason=gen.finish_reason)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        gen = await super().complete(request)
        yield GenerationChunk(content=self._number(gen.content))
        yield GenerationChunk(content="", finish_reason="stop")


def engine_on(store: ConversationStore, backend: LocalBackend | None = None) -> Engine:
    return Engine(
        store, ModelRegistry([ModelSpec(name="m", backend=backend or LocalBackend(), context_window=8192)])
    )


async def drain(stream: object) -> list[object]:
    return [chunk async for chunk in stream]  # type: ignore[attr-defined]


async def test_a_stream_whose_request_id_was_stored_with_other_input_ends_in_conflict(
    store: ConversationStore,
) -> None:
    engine = engine_on(store)
    stream = await engine.open_stream({"messages": "streamed", "conv_uid": "race", "request_id": "r1"})
    await engine.chat({"messages": "original", "conv_uid": "race", "request_id": "r1"})
    with pytest.raises(ConflictError):
        await drain(stream)
    contents = [m.content for m in await store.read_messages("race")]
    assert contents[0] == "original" and "streamed" not in contents


async def test_a_same_input_stream_that_lost_the_race_ends_in_conflict_when_its_text_differs(
    store: ConversationStore,
) -> None:
    engine = engine_on(store, CountingBackend())
    stream = await engine.open_stream({"messages": "same", "conv_uid": "race2", "request_id": "r1"})
    stored = await engine.chat({"messages": "same", "conv_uid": "race2", "request_id": "r1"})
    with pytest.raises(ConflictError, match="another reply"):
        await drain(stream)
    messages = await store.read_messages("race2")
    assert [m.content for m in messages] == ["same", stored.choices[0].message.content]


async def test_a_same_input_stream_that_lost_the_race_with_the_same_text_finishes(
    store: ConversationStore,
) -> None:
    engine = engine_on(store)
    stream = await engine.open_stream({"messages": "same", "conv_uid": "race3", "request_id": "r1"})
    stored = await engine.chat({"messages": "same", "conv_uid": "race3", "request_id": "r1"})
    chunks = await drain(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)  # type: ignore[attr-defined]
    assert text == stored.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"  # type: ignore[attr-defined]
    assert len(await store.read_messages("race3")) == 2
