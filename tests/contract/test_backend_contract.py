"""The model backend contract: every ModelBackend passes these, unchanged.

Written against the protocol only; the ``backend`` fixture is parametrized
over every backend (tests/backends/), the HTTP ones against a real server on
loopback.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import aclosing

import pytest

from convcore import (
    BackendError,
    BackendRateLimitedError,
    Engine,
    GenerationChunk,
    GenerationRequest,
    MemoryStore,
    ModelBackend,
    ModelRegistry,
    ModelSpec,
    PromptMessage,
    get_tokenizer,
)
from convcore.content import ImagePart, ImageURL, TextPart
from convcore.params import PASS_THROUGH
from tests.backends import BackendFactory, Misbehaviour

pytestmark = pytest.mark.anyio

LONG = "Tell me about " + " ".join(f"item{n}" for n in range(60)) + " and ünïcødé 会话 🙂."


def request(
    model: str, text: str = "hello there", *, max_new_tokens: int = 256, request_id: str | None = None
) -> GenerationRequest:
    return GenerationRequest(
        model=model,
        messages=(
            PromptMessage(role="system", content="be brief"),
            PromptMessage(role="user", content="first question"),
            PromptMessage(role="assistant", content="first answer"),
            PromptMessage(role="user", content=text),
        ),
        max_new_tokens=max_new_tokens,
        request_id=request_id or uuid.uuid4().hex,
    )


async def collect(backend: ModelBackend, req: GenerationRequest) -> list[GenerationChunk]:
    async with aclosing(backend.stream(req)) as chunks:
        return [c async for c in chunks]


async def test_backend_satisfies_the_protocol(backend: ModelBackend) -> None:
    assert isinstance(backend, ModelBackend)


async def test_backend_declares_the_parameters_it_honours(backend: ModelBackend) -> None:
    declared = backend.supported_params
    assert isinstance(declared, frozenset) and declared
    assert {name.partition(":")[0] for name in declared} <= set(PASS_THROUGH)


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_declared_parameter_shapes_the_reply(
    backend: ModelBackend, backend_factory: BackendFactory, streaming: bool
) -> None:
    """Every backend here declares ``stop`` and ``response_format`` json_object, and honours them."""
    base = request(backend_factory.model, "hello there")
    stop = base.model_copy(update={"params": {"stop": ["there"]}})
    as_json = base.model_copy(update={"params": {"response_format": {"type": "json_object"}}})

    async def reply(req: GenerationRequest) -> str:
        if streaming:
            return "".join(c.content for c in await collect(backend, req))
        return (await backend.complete(req)).content

    plain = await reply(base)
    assert await reply(stop) == plain[: plain.index("there")]
    assert json.loads(await reply(as_json)) == {"reply": plain}


async def test_content_parts_reach_the_model(backend: ModelBackend, backend_factory: BackendFactory) -> None:
    part = ImagePart(type="image_url", image_url=ImageURL(url="https://example.com/a.png", detail="low"))
    text = TextPart(type="text", text="look")
    req = GenerationRequest(
        model=backend_factory.model,
        messages=(PromptMessage(role="user", content="look", parts=(text, part)),),
        max_new_tokens=64,
    )
    assert (await backend.complete(req)).content == "You said: look [image_url]"


async def test_complete_returns_content_and_finish_reason(
    backend: ModelBackend, backend_factory: BackendFactory
) -> None:
    gen = await backend.complete(request(backend_factory.model, "hello there"))
    assert gen.finish_reason == "stop"
    assert "hello there" in gen.content
    assert "first question" in gen.content, "the reply shows the whole prompt reached the model"


async def test_complete_is_deterministic(backend: ModelBackend, backend_factory: BackendFactory) -> None:
    a = await backend.complete(request(backend_factory.model, LONG))
    b = await backend.complete(request(backend_factory.model, LONG))
    assert a.content == b.content


async def test_stream_concatenates_to_the_complete_reply(
    backend: ModelBackend, backend_factory: BackendFactory
) -> None:
    req = request(backend_factory.model, LONG)
    whole = await backend.complete(req)
    chunks = await collect(backend, req)
    assert "".join(c.content for c in chunks) == whole.content
    assert len(chunks) > 2, "the reply arrives in pieces"


async def test_exactly_the_last_chunk_has_finish_reason(
    backend: ModelBackend, backend_factory: BackendFactory
) -> None:
    chunks = await collect(backend, request(backend_factory.model, LONG))
    finished = [i for i, c in enumerate(chunks) if c.finish_reason is not None]
    assert finished == [len(chunks) - 1]
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_small_max_new_tokens_cuts_the_reply_with_length(
    backend: ModelBackend, backend_factory: BackendFactory, streaming: bool
) -> None:
    full = await backend.complete(request(backend_factory.model, LONG))
    req = request(backend_factory.model, LONG, max_new_tokens=3)
    if streaming:
        chunks = await collect(backend, req)
        content, finish = "".join(c.content for c in chunks), chunks[-1].finish_reason
    else:
        gen = await backend.complete(req)
        content, finish = gen.content, gen.finish_reason
    assert finish == "length"
    assert content and len(content) < len(full.content)
    assert full.content.startswith(content)


async def test_closing_the_stream_early_stops_generation(
    backend: ModelBackend, backend_factory: BackendFactory
) -> None:
    req = request(backend_factory.slow_model, LONG)
    stream = backend.stream(req)
    first = await anext(stream)
    assert first.finish_reason is None and first.content
    await stream.aclose()
    await backend_factory.assert_stopped_early(req.request_id or "")
    # The backend still works, and closes cleanly afterwards.
    gen = await backend.complete(request(backend_factory.model))
    assert gen.finish_reason == "stop"
    await backend.aclose()


async def test_cancelling_the_consumer_stops_generation(
    backend: ModelBackend, backend_factory: BackendFactory
) -> None:
    req = request(backend_factory.slow_model, LONG)
    got_one = asyncio.Event()

    async def consume() -> None:
        async with aclosing(backend.stream(req)) as chunks:
            async for _ in chunks:
                got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await backend_factory.assert_stopped_early(req.request_id or "")


async def test_unknown_upstream_model_is_a_backend_error(
    backend: ModelBackend, backend_factory: BackendFactory
) -> None:
    if backend_factory.unknown_model is None:
        pytest.skip(f"the {backend_factory.name} backend answers any model name")
    with pytest.raises(BackendError):
        await backend.complete(request(backend_factory.unknown_model))
    with pytest.raises(BackendError):
        await collect(backend, request(backend_factory.unknown_model))


async def test_fifty_concurrent_completes_all_succeed(
    backend: ModelBackend, backend_factory: BackendFactory
) -> None:
    reqs = [request(backend_factory.model, f"question {n}") for n in range(50)]
    gens = await asyncio.wait_for(asyncio.gather(*(backend.complete(r) for r in reqs)), 20)
    for n, gen in enumerate(gens):
        assert f"question {n}" in gen.content
        assert gen.finish_reason == "stop"


async def test_aclose_twice_is_harmless(backend: ModelBackend) -> None:
    await backend.aclose()
    await backend.aclose()


# -- misbehaving backends: the engine holds the line -------------------------------
#
# Each backend is made to misbehave the way real servers do (the HTTP one by a
# loopback upstream that does it); whatever it does, a turn through the engine
# keeps the reply budget and tells a failure before the first token as an error.

BUDGET = 7


def engine_over(backend: ModelBackend, factory: BackendFactory) -> tuple[Engine, MemoryStore]:
    store = MemoryStore()
    spec = ModelSpec(name="m", backend=backend, upstream=factory.model, context_window=8192)
    return Engine(store, ModelRegistry([spec])), store


def turn(text: str = LONG, **extra: object) -> dict[str, object]:
    return {"messages": text, "model": "m", "request_id": uuid.uuid4().hex, **extra}


async def stored_replies(store: MemoryStore) -> list[str]:
    convs = await store.list_conversations(limit=100)
    return [m.content for c in convs for m in await store.read_messages(c.conv_uid) if m.role == "assistant"]


async def test_engine_cuts_a_whole_reply_that_ignores_the_budget(backend_factory: BackendFactory) -> None:
    backend = backend_factory.misbehaving(Misbehaviour(ignore_budget=True))
    alone = await backend.complete(request(backend_factory.model, LONG, max_new_tokens=BUDGET))
    assert get_tokenizer().count(alone.content) > 5 * BUDGET, "the backend really ignores the budget"
    engine, store = engine_over(backend, backend_factory)
    async with engine:
        reply = await engine.chat(turn(max_new_tokens=BUDGET))
    await backend.aclose()
    assert get_tokenizer().count(reply.content) == BUDGET
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == BUDGET
    assert reply.content.startswith("You said: Tell me about")
    assert await stored_replies(store) == [reply.content]


async def test_engine_stops_a_stream_that_ignores_the_budget(backend_factory: BackendFactory) -> None:
    backend = backend_factory.misbehaving(Misbehaviour(ignore_budget=True))
    engine, store = engine_over(backend, backend_factory)
    req = turn(max_new_tokens=BUDGET)
    async with engine:
        chunks = [c async for c in engine.chat_stream(req)]
    await backend_factory.assert_stopped_early(str(req["request_id"]))
    await backend.aclose()
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert get_tokenizer().count(text) == BUDGET
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == BUDGET
    assert await stored_replies(store) == [text]


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_failure_before_the_first_token_is_an_error_before_any_chunk(
    backend_factory: BackendFactory, streaming: bool
) -> None:
    backend = backend_factory.misbehaving(Misbehaviour(fail_before_first_token=True))
    engine, store = engine_over(backend, backend_factory)
    async with engine:
        if streaming:
            stream = await engine.open_stream(turn())
            with pytest.raises(BackendRateLimitedError, match="429"):
                await anext(stream)  # not even the role chunk went out
            await stream.aclose()
        else:
            with pytest.raises(BackendRateLimitedError, match="429"):
                await engine.chat(turn())
    await backend.aclose()
    assert await stored_replies(store) == []


async def test_a_failure_after_some_tokens_ends_the_stream_unless_the_budget_came_first(
    backend_factory: BackendFactory,
) -> None:
    backend = backend_factory.misbehaving(Misbehaviour(ignore_budget=True, fail_after_tokens=20))
    engine, store = engine_over(backend, backend_factory)
    got: list[str] = []
    async with engine:
        # The failure comes within the budget: the pieces before it went out, nothing is kept.
        with pytest.raises(BackendError):
            async for chunk in engine.chat_stream(turn(max_new_tokens=500)):
                got.append(chunk.choices[0].delta.content or "")
        with pytest.raises(BackendError):
            await engine.chat(turn(max_new_tokens=500))
        assert 0 < get_tokenizer().count("".join(got)) <= 20, got
        assert await stored_replies(store) == []
        # The budget comes first: the stream is closed there, before the failure.
        chunks = [c async for c in engine.chat_stream(turn(max_new_tokens=BUDGET))]
    await backend.aclose()
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert get_tokenizer().count(text) == BUDGET
    assert await stored_replies(store) == [text]
