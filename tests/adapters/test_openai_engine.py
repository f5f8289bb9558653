"""The engine over the OpenAI-compatible backend, pointed at the fake upstream on loopback."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from convcore import BackendError, BackendUnavailableError, Engine, MemoryStore, ModelRegistry, ModelSpec
from convcore_openai import OpenAIBackend
from tests.backends.fake_upstream import FakeUpstream, get_upstream

pytestmark = pytest.mark.anyio


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, FakeUpstream]]:
    upstream = get_upstream()
    backend = OpenAIBackend(upstream.base_url, api_key="sk-engine", backoff=0.01, max_retries=2)
    registry = ModelRegistry(
        [
            ModelSpec(name="remote", backend=backend, context_window=4096, upstream="echo"),
            ModelSpec(
                name="broken",
                backend=backend,
                context_window=4096,
                upstream=f"echo;fail=500;id={uuid.uuid4().hex}",
            ),
        ]
    )
    async with Engine(MemoryStore(), registry, owned=True) as eng:
        yield eng, upstream


async def chat(eng: Engine, text: str, conv_uid: str | None, streaming: bool) -> tuple[str, str | None, str]:
    """(reply, finish_reason, conv_uid) of one turn."""
    body = {"model": "remote", "messages": text, "conv_uid": conv_uid}
    if not streaming:
        done = await eng.chat(body)
        return done.choices[0].message.content, done.choices[0].finish_reason, done.conv_uid or ""
    parts: list[str] = []
    finish, uid = "", ""
    async for chunk in eng.chat_stream(body):
        uid = chunk.conv_uid or uid
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish, uid


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_three_turn_conversation_through_the_upstream(
    engine: tuple[Engine, FakeUpstream], streaming: bool
) -> None:
    eng, upstream = engine
    first, finish, conv_uid = await chat(eng, "my name is Ada", None, streaming)
    assert (first, finish) == ("You said: my name is Ada", "stop")
    second, _, _ = await chat(eng, "what is my name?", conv_uid, streaming)
    assert second == "You said: what is my name? (earlier user messages: 1; first: 'my name is Ada')"
    third, _, _ = await chat(eng, "and again?", conv_uid, streaming)
    assert third == "You said: and again? (earlier user messages: 2; first: 'my name is Ada')"

    messages = await eng.read_messages(conv_uid)
    assert [m.content for m in messages if m.role == "assistant"] == [first, second, third]
    last = upstream.history[-1]
    assert last.headers["authorization"] == "Bearer sk-engine"
    assert last.body["model"] == "echo", "the registry's upstream name is what the server is asked for"
    assert [m["role"] for m in last.body["messages"]] == ["user", "assistant"] * 2 + ["user"]


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_upstream_failure_leaves_the_history_unchanged(
    engine: tuple[Engine, FakeUpstream], streaming: bool
) -> None:
    eng, upstream = engine
    _, _, conv_uid = await chat(eng, "keep me", None, streaming)
    before = await eng.read_messages(conv_uid)
    body = {"model": "broken", "messages": "this fails", "conv_uid": conv_uid}
    with pytest.raises(BackendUnavailableError, match="500"):
        if streaming:
            async for _ in eng.chat_stream(body):
                pass
        else:
            await eng.chat(body)
    assert await eng.read_messages(conv_uid) == before
    assert upstream.attempts_for(eng.models.get("broken").upstream) == 3, "every retry was made"
    # The conversation goes on where it was.
    reply, _, _ = await chat(eng, "still here?", conv_uid, streaming)
    assert "earlier user messages: 1; first: 'keep me'" in reply
    assert issubclass(BackendUnavailableError, BackendError)
