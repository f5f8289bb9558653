"""Each stage of preparing a turn, called on its own, and the one runner chat and streams share."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import convcore
from convcore import (
    ConflictError,
    ContextOverflowError,
    ConversationNotFoundError,
    Engine,
    LocalBackend,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    PermissionDeniedError,
    TurnRecord,
    UnknownModelError,
    UnsupportedChatModeError,
    get_tokenizer,
)
from convcore.compaction import Compactor
from convcore.models import TurnContext
from convcore.schema import parse_chat_request
from convcore.stages import (
    Drafts,
    Resolved,
    check_request,
    choose_window,
    context_budget,
    gather_history,
    make_drafts,
    read_context,
    resolve,
)
from convcore.testing import RecordingBackend
from convcore.tokens import REPLY_PRIMING_TOKENS, TiktokenTokenizer, count_message
from convcore.window import Budget, build_window
from tests.helpers import turn

pytestmark = pytest.mark.anyio


@dataclass
class Settings:
    keep_first_rounds: int = 0
    max_inline_bytes: int = 1024
    compaction: Compactor | None = None
    compact: bool = False


class NoIO(MemoryStore):
    """A store that fails any read: what a stage must not touch."""

    async def read_context(self, *args: Any, **kwargs: Any) -> TurnContext:
        raise AssertionError("the store was read")


class CountingStore(MemoryStore):
    """Counts the context reads (one per prepared turn)."""

    def __init__(self) -> None:
        super().__init__()
        self.context_reads = 0

    async def read_context(
        self, conv_uid: str, max_tokens: int, *, turn_id: str | None = None
    ) -> TurnContext:
        self.context_reads += 1
        return await super().read_context(conv_uid, max_tokens, turn_id=turn_id)


def registry(context_window: int = 8192, max_new_tokens: int = 256) -> ModelRegistry:
    spec = ModelSpec(
        name="m", backend=RecordingBackend(), context_window=context_window, max_new_tokens=max_new_tokens
    )
    return ModelRegistry([spec])


async def resolved(
    store: MemoryStore, request: dict[str, Any], models: ModelRegistry | None = None
) -> Resolved:
    engine = Engine(store, models or registry())
    req = parse_chat_request(request)
    spec = engine.check(req)
    guess = context_budget(req, spec)
    ctx = await read_context(store, req, req.conv_uid or "new", guess)
    r = await resolve(
        req, req.conv_uid or "new", ctx, scenes=engine.scenes, models=engine.models, guess=guess
    )
    assert isinstance(r, Resolved)
    return r


# -- check_request and read_context: refusals before any I/O -----------------


async def test_check_request_refuses_an_unknown_model_or_mode_without_io() -> None:
    engine = Engine(NoIO(), registry())
    with pytest.raises(UnknownModelError):
        check_request(
            parse_chat_request({"messages": "hi", "model": "nope"}), engine.scenes, engine.models, Settings()
        )
    with pytest.raises(UnsupportedChatModeError):
        check_request(
            parse_chat_request({"messages": "hi", "chat_mode": "chat_nope"}),
            engine.scenes,
            engine.models,
            Settings(),
        )
    spec = check_request(parse_chat_request({"messages": "hi"}), engine.scenes, engine.models, Settings())
    assert spec.name == "m"


async def test_read_context_skips_the_store_for_a_conversation_minted_now() -> None:
    req = parse_chat_request({"messages": "hi"})
    ctx = await read_context(NoIO(), req, "fresh", 100)
    assert ctx == TurnContext(conversation=None)


# -- resolve -----------------------------------------------------------------


async def test_resolve_keeps_the_conversations_mode_and_model() -> None:
    store = MemoryStore()
    await store.append_turn(turn("c", "t1"))
    r = await resolved(store, {"messages": "next", "conv_uid": "c"})
    assert r.conversation is not None and r.conversation.message_count == 2
    assert r.request.mode == "chat_normal" and r.spec.name == "m"
    assert r.store_tokenizer.name == "cl100k_base" and not r.recount
    assert [m.seq for m in r.tail] == [1, 2]


async def test_resolve_answers_a_retry_with_the_stored_turn_and_refuses_other_input() -> None:
    store = MemoryStore()
    await store.append_turn(turn("c", "r1", question="q"))
    engine = Engine(store, registry())
    for text, outcome in (("q", TurnRecord), ("other", ConflictError)):
        req = parse_chat_request({"messages": text, "conv_uid": "c", "request_id": "r1"})
        ctx = await read_context(store, req, "c", 100)
        if outcome is TurnRecord:
            record = await resolve(req, "c", ctx, scenes=engine.scenes, models=engine.models, guess=100)
            assert isinstance(record, TurnRecord) and record.turn_id == "r1"
        else:
            with pytest.raises(ConflictError):
                await resolve(req, "c", ctx, scenes=engine.scenes, models=engine.models, guess=100)


async def test_resolve_refuses_a_missing_or_foreign_conversation() -> None:
    store = MemoryStore()
    await store.append_turn(turn("c", "t1", user_name="alice"))
    engine = Engine(store, registry())
    cases = (
        ({"messages": "x", "conv_uid": "gone", "require_existing": True}, ConversationNotFoundError),
        ({"messages": "x", "conv_uid": "c", "user_name": "bob"}, PermissionDeniedError),
    )
    for request, error in cases:
        req = parse_chat_request(request)
        ctx = await read_context(store, req, req.conv_uid or "", 100)
        with pytest.raises(error):
            await resolve(req, req.conv_uid or "", ctx, scenes=engine.scenes, models=engine.models, guess=100)


# -- make_drafts -------------------------------------------------------------


async def test_make_drafts_counts_each_message_once_and_sets_the_system_prompt_apart() -> None:
    store = MemoryStore()
    r = await resolved(
        store,
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]},
    )
    d = await make_drafts(store, r)
    tok = get_tokenizer()
    assert [(m.role, m.content, m.starts_round) for m in d.inputs] == [("user", "hello there", True)]
    assert d.inputs[0].token_count == count_message(tok, "user", "hello there")
    assert d.system is not None and d.system[0].content == "be brief"
    assert d.system[0].token_count == count_message(tok, "system", "be brief")
    assert d.matched == 0


async def test_make_drafts_drops_the_part_of_a_resent_history_the_conversation_has() -> None:
    store = MemoryStore()
    await store.append_turn(turn("c", "t1", question="q", answer="a"))
    history = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "n"},
    ]
    d = await make_drafts(store, await resolved(store, {"messages": history, "conv_uid": "c"}))
    assert d.matched == 2
    assert [m.content for m in d.inputs] == ["n"]


# -- gather_history and choose_window ----------------------------------------


async def test_gather_history_reads_the_first_rounds_kept_and_leaves_the_rest_to_the_tail() -> None:
    store = MemoryStore()
    for i in range(4):
        await store.append_turn(turn("c", f"t{i}", question=f"q{i}", answer=f"a{i}"))
    r = await resolved(store, {"messages": "next", "conv_uid": "c"})
    d = await make_drafts(store, r)
    h = await gather_history(store, r, d, Settings(keep_first_rounds=1))
    assert [m.seq for m in h.head] == [1, 2]
    assert [m.seq for m in h.tail] == [3, 4, 5, 6, 7, 8]
    assert h.last_seen == 8
    # The frame holds what every prompt of the turn holds: the input and the priming.
    assert h.frame.required_input == d.inputs
    assert h.frame.room == r.spec.context_window - 256 - REPLY_PRIMING_TOKENS - d.inputs[0].token_count
    assert h.frame.history_room() == h.frame.room


async def test_gather_history_refuses_input_that_cannot_fit() -> None:
    store = MemoryStore()
    r = await resolved(store, {"messages": "word " * 200}, registry(context_window=300, max_new_tokens=100))
    d = await make_drafts(store, r)
    with pytest.raises(ContextOverflowError):
        await gather_history(store, r, d, Settings())


async def test_choose_window_builds_the_window_build_window_would_and_reports_it() -> None:
    store = MemoryStore()
    for i in range(30):
        await store.append_turn(turn("c", f"t{i}", question=f"q{i}", answer=f"a{i}", tokens=(20, 20)))
    models = registry(context_window=500, max_new_tokens=100)
    r = await resolved(store, {"messages": "next", "conv_uid": "c"}, models)
    d = await make_drafts(store, r)
    h = await gather_history(store, r, d, Settings())
    window, trim = await choose_window(store, r, d, h, Settings())
    budget = Budget(model="m", context_window=500, max_new_tokens=100)
    same = build_window(budget=budget, system=(), head=(), tail=r.tail, new_input=d.inputs)
    assert window.chosen == same.chosen and window.prompt_tokens == same.prompt_tokens
    assert window.prompt_tokens + 100 <= 500
    kept = [m.seq for m in window.chosen if hasattr(m, "seq")]
    assert kept == list(range(61 - len(kept), 61))  # the newest whole rounds
    assert trim.history_messages == 60
    assert trim.prompt_seqs == [(kept[0], 60)] and trim.dropped_seqs == [(1, kept[0] - 1)]


async def test_stages_carry_a_drafts_value_through_unchanged() -> None:
    store = MemoryStore()
    r = await resolved(store, {"messages": "hello"})
    d = await make_drafts(store, r)
    h = await gather_history(store, r, d, Settings())
    window, _ = await choose_window(store, r, Drafts(inputs=d.inputs, system=None), h, Settings())
    assert window.chosen[-1] is d.inputs[0]  # the same draft object, not a copy


# -- the runner --------------------------------------------------------------


async def test_a_serialised_stream_is_prepared_once() -> None:
    store = CountingStore()
    engine = Engine(store, registry(), serialize=True)
    first = await engine.chat({"messages": "start", "conv_uid": "c"})
    store.context_reads = 0
    stream = await engine.open_stream({"messages": "streamed", "conv_uid": first.conv_uid})
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert store.context_reads == 1
    assert stream.history_matched == 0 and stream.trim is not None and stream.model == "m"


async def test_an_unserialised_stream_is_prepared_when_opened() -> None:
    store = CountingStore()
    engine = Engine(store, registry())
    stream = await engine.open_stream({"messages": "hi", "conv_uid": "c"})
    assert store.context_reads == 1 and stream.trim is not None
    await stream.aclose()


async def test_each_text_of_a_turn_is_tokenized_once(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[str] = []
    encode, count = TiktokenTokenizer.encode, TiktokenTokenizer.count

    def encoding(self: TiktokenTokenizer, text: str) -> list[int]:
        encoded.append(text)
        return encode(self, text)

    def counting(self: TiktokenTokenizer, text: str) -> int:
        encoded.append(text)
        return count(self, text)

    monkeypatch.setattr(TiktokenTokenizer, "encode", encoding)
    monkeypatch.setattr(TiktokenTokenizer, "count", counting)
    spec = ModelSpec(name="m", backend=LocalBackend(), context_window=8192)
    engine = Engine(MemoryStore(), ModelRegistry([spec]))
    await engine.chat({"messages": "warm up", "conv_uid": "c"})  # role tokens are counted once per process
    encoded.clear()
    reply = await engine.chat({"messages": "count me once", "conv_uid": "c"})
    assert sorted(encoded) == sorted(["count me once", reply.content])
    stored = await engine.store.read_messages("c")
    assert stored[-1].token_count == count_message(get_tokenizer(), "assistant", reply.content)
    assert reply.usage.completion_tokens == get_tokenizer().count(reply.content)


def test_streaming_uses_the_public_runner_only() -> None:
    """TurnStream imports no engine and touches no private member of its runner."""
    source = Path(convcore.streaming.__file__).read_text()
    tree = ast.parse(source)
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    assert not any(name.endswith("engine") for name in imported)
    private = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "runner"
        and node.attr.startswith("_")
    }
    assert private == set()
