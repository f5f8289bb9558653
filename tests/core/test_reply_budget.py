"""The reply budget: counted exactly as the text arrives, held whatever the backend does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convcore import (
    BackendError,
    Engine,
    Generation,
    GenerationChunk,
    GenerationRequest,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    ScenePlan,
    SceneRequest,
    get_tokenizer,
)
from convcore.reply_budget import ReplyMeter

pytestmark = pytest.mark.anyio

ENCODINGS = ["cl100k_base", "o200k_base"]
# Letters of both cases, digits, every kind of whitespace the pre-tokenizers
# treat apart, contractions, marks, CJK and emoji: where piece boundaries move.
PIECES = st.text(
    alphabet=st.sampled_from(list("aZqé'sltvmrd0123456789 \n\r\t.,!?-/会话🙂\u0301\u00a0")), max_size=12
)


def fed(meter: ReplyMeter, parts: list[str]) -> str:
    return "".join(meter.feed(p) for p in parts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(PIECES, max_size=30),
    encoding=st.sampled_from(ENCODINGS),
    read_each=st.booleans(),
)
def test_the_running_count_is_the_exact_count_however_the_text_is_split(
    parts: list[str], encoding: str, read_each: bool
) -> None:
    tok = get_tokenizer(encoding)
    prefixes = ["".join(parts[:n]) for n in range(1, len(parts) + 1)]
    # The tightest budget nothing crosses: the meter has to count as it goes.
    meter = ReplyMeter(tok, max([tok.count(p) for p in prefixes], default=0) or 1)
    for part, prefix in zip(parts, prefixes, strict=True):
        assert meter.feed(part) == part
        if read_each:
            assert meter.tokens == tok.count(prefix)
    assert meter.text == "".join(parts) and not meter.cut
    assert meter.tokens == tok.count(meter.text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(PIECES, max_size=30), budget=st.integers(1, 40), encoding=st.sampled_from(ENCODINGS))
def test_what_the_meter_lets_through_is_a_prefix_within_the_budget(
    parts: list[str], budget: int, encoding: str
) -> None:
    tok = get_tokenizer(encoding)
    meter = ReplyMeter(tok, budget)
    out = fed(meter, parts)
    full = "".join(parts)
    assert out == meter.text and full.startswith(out)
    assert meter.tokens == tok.count(out) <= budget
    prefixes = ["".join(parts[:n]) for n in range(1, len(parts) + 1)]
    if all(tok.count(p) <= budget for p in prefixes):
        assert not meter.cut and out == full
    else:
        assert meter.cut


def test_a_cut_reply_holds_exactly_the_budget() -> None:
    tok = get_tokenizer("cl100k_base")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    tokens = tok.encode(text)
    by_token = ReplyMeter(tok, 25)
    out = fed(by_token, [tok.decode([t]) for t in tokens])
    assert by_token.cut and out == tok.decode(tokens[:25])
    assert by_token.feed("more") == "", "nothing is taken after the cut"
    # Fed a character at a time, text already let through stays (it has gone out).
    by_char = ReplyMeter(tok, 25)
    out = fed(by_char, list(text))
    assert by_char.cut and tok.count(out) == by_char.tokens == 25


def test_a_cut_never_splits_a_character() -> None:
    tok = get_tokenizer("cl100k_base")
    meter = ReplyMeter(tok, 4)
    out = meter.feed("🙂🙂🙂🙂🙂")
    assert meter.cut and "\ufffd" not in out and out and set(out) == {"🙂"}
    assert tok.count(out) <= 4


# -- through the engine ------------------------------------------------------------


class Runaway:
    """Ignores max_new_tokens, as some servers do; reports its own (too high) counts."""

    def __init__(self, text: str = "word " * 2000, report: int | None = 2000) -> None:
        self.text = text
        self.report = report
        self.sent = 0
        self.closed = False

    async def complete(self, request: GenerationRequest) -> Generation:
        return Generation(content=self.text, completion_tokens=self.report)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        try:
            for piece in self.text.split(" ")[:-1]:
                self.sent += 1
                yield GenerationChunk(content=piece + " ")
            yield GenerationChunk(finish_reason="stop", completion_tokens=self.report)
        finally:
            self.closed = True

    async def aclose(self) -> None:
        return None


class Appender:
    """A chat mode that adds a long table to whatever the model said."""

    name = "chat_table"
    needs_param = False

    def __init__(self, reply: str | None = None) -> None:
        self.reply = reply

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        return ScenePlan(reply=self.reply)

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        return reply + "\n\n| n |\n|---|\n" + "".join(f"| {n} |\n" for n in range(300))


def engine_with(backend: object, scene: Appender | None = None) -> tuple[Engine, MemoryStore]:
    store = MemoryStore()
    spec = ModelSpec(name="m", backend=backend, context_window=8192, max_new_tokens=30)  # type: ignore[arg-type]
    return Engine(store, ModelRegistry([spec]), scenes=[scene] if scene else None), store


async def reply_stored(store: MemoryStore) -> tuple[str, int, str]:
    (conv,) = await store.list_conversations()
    record = await store.get_turn(conv.conv_uid, (await store.read_messages(conv.conv_uid))[-1].turn_id or "")
    assert record is not None
    return record.reply.content, record.completion_tokens or 0, record.finish_reason


async def streamed(engine: Engine, request: dict[str, object]) -> tuple[str, str | None, int | None]:
    chunks = [c async for c in engine.chat_stream(request)]
    usage = chunks[-1].usage
    return (
        "".join(c.choices[0].delta.content or "" for c in chunks),
        chunks[-1].choices[0].finish_reason,
        usage.completion_tokens if usage else None,
    )


@pytest.mark.parametrize("budget", [1, 9, 30])
async def test_a_runaway_stream_is_closed_at_the_budget(budget: int) -> None:
    backend = Runaway()
    engine, store = engine_with(backend)
    text, finish, completion = await streamed(engine, {"messages": "hi", "max_new_tokens": budget})
    assert backend.closed and backend.sent <= budget + 1, "the backend was stopped, not drained"
    assert finish == "length" and completion == budget == get_tokenizer().count(text)
    assert await reply_stored(store) == (text, budget, "length")


async def test_a_runaway_whole_reply_is_cut_at_the_budget() -> None:
    engine, store = engine_with(Runaway())
    reply = await engine.chat({"messages": "hi"})  # the model's own budget: 30
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 30 == get_tokenizer().count(reply.content)
    assert await reply_stored(store) == (reply.content, 30, "length")


async def test_a_count_above_the_budget_is_not_reported_even_when_the_text_fits() -> None:
    engine, _ = engine_with(Runaway(text="short reply ", report=4000))
    reply = await engine.chat({"messages": "hi"})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == get_tokenizer().count("short reply ")
    _, finish, completion = await streamed(engine, {"messages": "hi"})
    assert finish == "stop" and completion == get_tokenizer().count("short reply ")


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
async def test_text_a_scene_adds_is_counted_in_the_reply_and_cut_at_the_budget(streaming: bool) -> None:
    engine, store = engine_with(Runaway(text="SELECT 1 ", report=None), Appender())
    request = {"messages": "hi", "chat_mode": "chat_table", "max_new_tokens": 40}
    if streaming:
        text, finish, completion = await streamed(engine, request)
    else:
        reply = await engine.chat(request)
        text, finish, completion = (
            reply.content,
            reply.choices[0].finish_reason,
            reply.usage.completion_tokens,
        )
    assert text.startswith("SELECT 1 \n\n| n |") and text.endswith("]") and "\n\n[truncated" in text
    assert finish == "length" and completion == get_tokenizer().count(text) <= 40
    assert await reply_stored(store) == (text, completion, "length")


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
async def test_a_scene_answering_itself_is_held_to_the_budget_too(streaming: bool) -> None:
    engine, store = engine_with(Runaway(), Appender(reply="all rows: " + "row " * 500))
    request = {"messages": "hi", "chat_mode": "chat_table", "max_new_tokens": 12}
    if streaming:
        text, finish, completion = await streamed(engine, request)
    else:
        reply = await engine.chat(request)
        text, finish, completion = (
            reply.content,
            reply.choices[0].finish_reason,
            reply.usage.completion_tokens,
        )
    assert text.startswith("all rows: row")
    assert finish == "length" and completion == 12 == get_tokenizer().count(text)
    assert (await reply_stored(store))[0] == text


async def test_the_role_chunk_waits_for_the_backends_first_piece() -> None:
    backend = Runaway()
    engine, _ = engine_with(backend)
    stream = await engine.open_stream({"messages": "hi"})
    first = await anext(stream)
    assert first.choices[0].delta.role == "assistant"
    assert backend.sent == 1, "the backend had answered before the stream said anything"
    await stream.aclose()
    assert backend.closed


class Refusing:
    """A backend whose ``stream`` fails when called, not when iterated."""

    async def complete(self, request: GenerationRequest) -> Generation:
        raise RuntimeError("refused")

    def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        raise RuntimeError("refused")

    async def aclose(self) -> None:
        return None


async def test_a_backend_failing_on_the_call_fails_the_first_step_as_a_backend_error() -> None:
    engine, store = engine_with(Refusing())
    stream = await engine.open_stream({"messages": "hi"})
    with pytest.raises(BackendError, match="refused"):
        await anext(stream)
    assert await store.list_conversations() == []


class Scripted:
    """Streams ``parts`` as they are and reports ``report`` completion tokens, ignoring the budget."""

    def __init__(self, parts: list[str], report: int | None) -> None:
        self.parts, self.report = parts, report

    async def complete(self, request: GenerationRequest) -> Generation:
        return Generation(content="".join(self.parts), completion_tokens=self.report)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        for part in self.parts:
            yield GenerationChunk(content=part)
        yield GenerationChunk(finish_reason="stop", completion_tokens=self.report)

    async def aclose(self) -> None:
        return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(PIECES.filter(bool), min_size=1, max_size=20),
    budget=st.integers(1, 30),
    report=st.none() | st.integers(0, 200),
)
def test_whatever_the_backend_sends_the_reply_and_its_usage_stay_within_the_budget(
    parts: list[str], budget: int, report: int | None
) -> None:
    async def run() -> None:
        tok = get_tokenizer()
        engine, store = engine_with(Scripted(parts, report))
        reply = await engine.chat({"messages": "hi", "max_new_tokens": budget})
        text, finish, completion = await streamed(engine, {"messages": "hi", "max_new_tokens": budget})
        for content, fin, used in [
            (reply.content, reply.choices[0].finish_reason, reply.usage.completion_tokens),
            (text, finish, completion),
        ]:
            assert "".join(parts).startswith(content)
            assert tok.count(content) <= budget and used is not None and used <= budget
            assert (fin == "length") == (content != "".join(parts))
        stored = [
            m.content
            for c in await store.list_conversations()
            for m in await store.read_messages(c.conv_uid)
            if m.role == "assistant"
        ]
        assert sorted(stored) == sorted([reply.content, text])

    asyncio.run(run())
