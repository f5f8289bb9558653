"""Resent histories, forks and mistyped conv_uids, through the engine."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from convcore import (
    ConflictError,
    ConversationNotFoundError,
    Engine,
    ForkPointError,
    HistoryConflictError,
    InvalidRequestError,
    LocalBackend,
    MemoryStore,
    ModelRegistry,
    ModelSpec,
    PermissionDeniedError,
)
from convcore.testing import ScriptedBackend

pytestmark = pytest.mark.anyio


def make(backend: Any = None) -> tuple[Engine, MemoryStore]:
    store = MemoryStore()
    spec = ModelSpec(name="m", backend=backend or LocalBackend(), context_window=8192)
    return Engine(store, ModelRegistry([spec])), store


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


async def test_a_resent_history_stores_only_the_new_message() -> None:
    engine, store = make()
    first = await engine.chat({"messages": "hi, I'm Ada"})
    assert (first.conversation_created, first.history_matched) == (True, 0)
    history = [{"role": "system", "content": "be kind"}, user("hi, I'm Ada"), assistant(first.content)]
    second = await engine.chat({"messages": [*history, user("my name?")], "conv_uid": first.conv_uid})
    assert (second.conversation_created, second.history_matched) == (False, 2)
    assert second.content == 'You said: my name? (earlier user messages: 1; first: "hi, I\'m Ada")'
    third = await engine.chat(
        {
            "messages": [*history, user("my name?"), assistant(second.content), user("again")],
            "conv_uid": first.conv_uid,
        }
    )
    assert third.history_matched == 4
    stored = await store.read_messages(first.conv_uid)
    assert [m.content for m in stored if m.role == "user"] == ["hi, I'm Ada", "my name?", "again"]
    conv = await store.get_conversation(first.conv_uid)
    assert conv is not None and [m.content for m in conv.system] == ["be kind"]


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_the_last_chunk_and_the_completion_say_what_matched(streaming: bool) -> None:
    engine, _ = make()
    first = await engine.chat({"messages": "one"})
    body = {"messages": [user("one"), assistant(first.content), user("two")], "conv_uid": first.conv_uid}
    if not streaming:
        done = await engine.chat(body)
        assert (done.history_matched, done.conversation_created) == (2, False)
        return
    stream = await engine.open_stream(body)
    assert (stream.history_matched, stream.conversation_created) == (2, False)
    chunks = [c async for c in stream]
    assert (chunks[-1].history_matched, chunks[-1].conversation_created) == (2, False)
    assert all(c.history_matched is None for c in chunks[:-1])


async def test_a_history_with_tool_calls_is_matched_whole() -> None:
    backend = ScriptedBackend([[("f", '{"x": 1}')], "done", "and more"])
    engine, store = make(backend)
    first = await engine.chat({"messages": "go"})
    calls = [c.model_dump() for c in first.choices[0].message.tool_calls or ()]
    history = [user("go"), {"role": "assistant", "content": None, "tool_calls": calls}]
    results = [{"role": "tool", "tool_call_id": "call_1", "content": "r"}]
    second = await engine.chat({"messages": [*history, *results], "conv_uid": first.conv_uid})
    assert (second.content, second.history_matched) == ("done", 2)
    third = await engine.chat(
        {"messages": [*history, *results, assistant("done"), user("more")], "conv_uid": first.conv_uid}
    )
    assert (third.content, third.history_matched) == ("and more", 4)
    assert len(await store.read_messages(first.conv_uid)) == 6


class _Meeting(LocalBackend):
    """Answers only once ``count`` requests are waiting: every turn has read
    the conversation before any stores."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.waiting = 0
        self.count = count
        self.all_here = asyncio.Event()

    async def complete(self, request: Any) -> Any:
        self.waiting += 1
        if self.waiting >= self.count:
            self.all_here.set()
        await self.all_here.wait()
        return await super().complete(request)


async def test_two_first_turns_with_the_same_history_store_it_once() -> None:
    """Both find no conversation; the second to store is refused instead of
    storing the history again after the first."""
    engine, store = make(_Meeting(2))
    history = [user("u1"), assistant("a1"), user("u2")]
    outcomes = await asyncio.gather(
        *(engine.chat({"conv_uid": "c", "messages": history, "request_id": f"r{i}"}) for i in range(2)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, ConflictError) for o in outcomes) == 1, outcomes
    stored = [m.content for m in await store.read_messages("c")]
    assert stored[:3] == ["u1", "a1", "u2"] and len(stored) == 4
    # The conversation goes on by resending, as the winner's client does.
    more = [*history, assistant((await store.read_messages("c"))[-1].content), user("u3")]
    assert (await engine.chat({"conv_uid": "c", "messages": more})).history_matched == 4


@pytest.mark.parametrize(
    ("sent", "field", "seq", "says"),
    [
        (
            [user("hello?"), assistant("X"), user("new")],
            "messages.0",
            1,
            "differs from the stored message at seq 1",
        ),
        ([user("hello"), assistant("edited"), user("new")], "messages.1", 2, "seq 2 (assistant)"),
        (
            [{"role": "system", "content": "s"}, user("hello"), assistant("edited"), user("new")],
            "messages.2",
            2,
            "seq 2",
        ),
        (
            [user("hello"), assistant("R"), user("again")],
            "messages.2",
            3,
            "differs from the stored message at seq 3",
        ),
        ([user("hello"), assistant("R")], None, None, None),  # ends with an assistant: a 400 first
    ],
    ids=["edited-first", "edited-reply", "with-system", "edited-later", "no-input"],
)
async def test_a_diverging_history_is_a_conflict_naming_the_position(
    sent: list[dict[str, Any]], field: str | None, seq: int | None, says: str | None
) -> None:
    backend = ScriptedBackend(["R", "R2"])
    engine, store = make(backend)
    first = await engine.chat({"messages": "hello"})
    await engine.chat({"messages": [user("hello"), assistant("R"), user("more")], "conv_uid": first.conv_uid})
    before = await store.read_messages(first.conv_uid)
    if field is None:
        with pytest.raises(InvalidRequestError):
            await engine.chat({"messages": sent, "conv_uid": first.conv_uid})
        return
    with pytest.raises(HistoryConflictError, match=re.escape(says or "")) as err:
        await engine.chat({"messages": sent, "conv_uid": first.conv_uid})
    assert (err.value.field, err.value.seq) == (field, seq)
    assert "fork" in str(err.value)
    assert await store.read_messages(first.conv_uid) == before
    assert len(backend.requests) == 2, "the model was not asked"


async def test_a_resent_history_with_nothing_new_is_a_conflict() -> None:
    engine, _ = make(ScriptedBackend(["R", "R2"]))
    first = await engine.chat({"messages": "hello"})
    second = await engine.chat(
        {"messages": [user("hello"), assistant("R"), user("more")], "conv_uid": first.conv_uid}
    )
    assert second.history_matched == 2
    with pytest.raises(HistoryConflictError, match="nothing in the request is new") as err:
        await engine.chat(
            {"messages": [user("hello"), assistant("R"), user("more")], "conv_uid": first.conv_uid}
        )
    assert (err.value.field, err.value.seq) == ("messages.2", 4)


async def test_only_new_messages_are_still_just_new() -> None:
    """One message, or several without an assistant's, is new input even if
    it repeats the first stored message."""
    engine, store = make()
    first = await engine.chat({"messages": "yes"})
    again = await engine.chat({"messages": "yes", "conv_uid": first.conv_uid})
    both = await engine.chat({"messages": [user("yes"), user("and no")], "conv_uid": first.conv_uid})
    assert again.history_matched == both.history_matched == 0
    assert [m.content for m in await store.read_messages(first.conv_uid) if m.role == "user"] == [
        "yes",
        "yes",
        "yes",
        "and no",
    ]


async def test_a_retried_resend_is_answered_from_the_store() -> None:
    engine, store = make()
    first = await engine.chat({"messages": "one"})
    body = {
        "messages": [user("one"), assistant(first.content), user("two")],
        "conv_uid": first.conv_uid,
        "request_id": "r-2",
    }
    done = await engine.chat(body)
    again = await engine.chat(body)
    assert again.duplicate and again.content == done.content
    assert len(await store.read_messages(first.conv_uid)) == 4


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_retry_that_edits_the_history_before_its_turn_is_refused(streaming: bool) -> None:
    engine, store = make()
    first = await engine.chat({"messages": "one"})
    history = [user("one"), assistant(first.content), user("two")]
    await engine.chat({"messages": history, "conv_uid": first.conv_uid, "request_id": "r-2"})
    before = await store.read_messages(first.conv_uid)
    for edited in (
        [user("EDITED one"), assistant(first.content), user("two")],
        [assistant(first.content), user("two")],  # a history that is not the conversation's start
    ):
        retry = {"messages": edited, "conv_uid": first.conv_uid, "request_id": "r-2"}
        with pytest.raises(ConflictError, match="already used for a different request"):
            if streaming:
                [c async for c in engine.chat_stream(retry)]
            else:
                await engine.chat(retry)
    assert await store.read_messages(first.conv_uid) == before


async def test_require_existing_turns_a_mistyped_conv_uid_into_a_404() -> None:
    engine, store = make()
    first = await engine.chat({"messages": "hi", "conv_uid": "chosen-by-client"})
    assert first.conversation_created
    with pytest.raises(ConversationNotFoundError, match="chosen-by-clinet"):
        await engine.chat({"messages": "hi", "conv_uid": "chosen-by-clinet", "require_existing": True})
    assert await store.get_conversation("chosen-by-clinet") is None
    later = await engine.chat({"messages": "again", "conv_uid": "chosen-by-client", "require_existing": True})
    assert not later.conversation_created
    typo = await engine.chat({"messages": "hi", "conv_uid": "chosen-by-clinet"})
    assert typo.conversation_created, "without require_existing a typo is visible in the response"


async def test_fork_edits_and_regenerates_without_touching_the_original() -> None:
    engine, store = make()
    first = await engine.chat({"messages": "a", "user_name": "ann"})
    uid = first.conv_uid
    for text in ("b", "c"):
        await engine.chat({"messages": text, "conv_uid": uid, "user_name": "ann"})
    original = await store.read_messages(uid)
    # Edit "c" (seq 5): fork up to seq 4, send the edit there.
    fork = await engine.fork(uid, 4, user_name="ann")
    assert fork.conv_uid != uid and fork.message_count == 4 and fork.user_name == "ann"
    edited = await engine.chat({"messages": "C!", "conv_uid": fork.conv_uid, "user_name": "ann"})
    assert not edited.conversation_created
    assert edited.content == "You said: C! (earlier user messages: 2; first: 'a')"
    assert await store.read_messages(uid) == original
    with pytest.raises(PermissionDeniedError):
        await engine.fork(uid, 2, user_name="bob")
    with pytest.raises(ConversationNotFoundError):
        await engine.fork("nope", 1)
    with pytest.raises(InvalidRequestError, match="at least 1") as bad:
        await engine.fork(uid, 0)
    assert bad.value.field == "up_to_seq"
    with pytest.raises(ForkPointError, match="at most the last seq") as past:
        await engine.fork(uid, 7)  # well formed, but this conversation has no seq 7
    assert past.value.field == "up_to_seq"
    with pytest.raises(ConflictError, match="already exists"):
        await engine.fork(uid, 2, new_conv_uid=fork.conv_uid)


async def test_fork_never_splits_tool_results_from_their_call() -> None:
    backend = ScriptedBackend([[("f", "{}"), ("g", "{}")], "done"])
    engine, _ = make(backend)
    first = await engine.chat({"messages": "go"})
    results = [
        {"role": "tool", "tool_call_id": "call_1", "content": "1"},
        {"role": "tool", "tool_call_id": "call_2", "content": "2"},
    ]
    await engine.chat({"messages": results, "conv_uid": first.conv_uid})
    with pytest.raises(ForkPointError, match="between the tool results"):
        await engine.fork(first.conv_uid, 3)
    at_call = await engine.fork(first.conv_uid, 2)  # ends with the calls: the fork awaits their results
    backend.add("again")
    done = await engine.chat({"messages": results, "conv_uid": at_call.conv_uid})
    assert done.content == "again"
    assert (await engine.fork(first.conv_uid, 4)).message_count == 4
