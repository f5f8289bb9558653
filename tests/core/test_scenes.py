"""The scene hook: context within the budget, defaults, finishing, errors."""

from __future__ import annotations

import pytest

from convcore import (
    Engine,
    InvalidRequestError,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    UnsupportedChatModeError,
)
from convcore.scenes import ScenePlan, SceneRequest
from convcore.testing import RecordingBackend

pytestmark = pytest.mark.anyio


class BookScene:
    """Context blocks from chat_param; appends which blocks were used."""

    name = "chat_book"
    needs_param = True

    def __init__(self, blocks: list[str], *, reply: str | None = None) -> None:
        self.blocks = blocks
        self.reply = reply
        self.seen: list[SceneRequest] = []

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        self.seen.append(request)
        if request.param != "book":
            raise InvalidRequestError(f"no book {request.param!r}", field="chat_param")
        return ScenePlan(
            system_prompt="Answer from the book.",
            context=tuple(self.blocks),
            max_context_share=0.6,
            temperature=0.25,
            max_new_tokens=20,
            reply=self.reply,
        )

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        return f"{reply}\n[used {used_context} of {len(plan.context)}]"


def engine_with(scene: BookScene, window: int = 400) -> tuple[Engine, RecordingBackend, MemoryStore]:
    backend = RecordingBackend()
    store = MemoryStore()
    spec = ModelSpec(name="m", backend=backend, context_window=window, max_new_tokens=50)
    return Engine(store, ModelRegistry([spec]), scenes=[scene]), backend, store


async def test_context_fits_the_budget_as_a_prefix_of_whole_blocks() -> None:
    blocks = [f"fact {i}: " + "lorem ipsum " * 20 for i in range(30)]
    engine, backend, store = engine_with(BookScene(blocks))
    reply = await engine.chat({"messages": "q?", "chat_mode": "chat_book", "chat_param": "book"})
    sent = backend.requests[-1]
    assert sent.messages[0].content == "Answer from the book."
    used = [m.content for m in sent.messages if m.content.startswith("fact ")]
    assert used == blocks[: len(used)] and 0 < len(used) < len(blocks)
    assert reply.content.endswith(f"[used {len(used)} of 30]")
    assert reply.usage.prompt_tokens + 20 <= 400
    assert sent.temperature == 0.25 and sent.max_new_tokens == 20
    stored = await store.read_messages(reply.conv_uid)
    assert stored[-1].content == reply.content


async def test_request_values_win_over_scene_defaults() -> None:
    engine, backend, _ = engine_with(BookScene([]))
    await engine.chat(
        {
            "messages": "q",
            "chat_mode": "chat_book",
            "chat_param": "book",
            "temperature": 0.9,
            "max_new_tokens": 7,
        }
    )
    assert backend.requests[-1].temperature == 0.9 and backend.requests[-1].max_new_tokens == 7


async def test_scene_reply_skips_the_model_and_streams_with_the_addition() -> None:
    engine, backend, store = engine_with(BookScene(["a"], reply="42"))
    chunks = [
        c async for c in engine.chat_stream({"messages": "q", "chat_mode": "chat_book", "chat_param": "book"})
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "42\n[used 1 of 1]"
    assert backend.requests == []
    assert (await store.read_messages(chunks[0].conv_uid))[-1].content == text


async def test_mode_errors_are_typed_and_store_nothing() -> None:
    engine, _, store = engine_with(BookScene([]))
    with pytest.raises(InvalidRequestError) as info:
        await engine.chat({"messages": "q", "chat_mode": "chat_book"})
    assert info.value.field == "chat_param"
    with pytest.raises(InvalidRequestError, match="no book 'other'"):
        await engine.chat({"messages": "q", "chat_mode": "chat_book", "chat_param": "other"})
    with pytest.raises(UnsupportedChatModeError, match="chat_book, chat_normal"):
        await engine.chat({"messages": "q", "chat_mode": "chat_nope"})
    assert await store.list_conversations() == []
