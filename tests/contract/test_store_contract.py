"""The store contract: every ConversationStore passes these, unchanged.

Written against the protocol only; the ``store`` fixture is parametrized over
every adapter (tests/stores/).
"""

from __future__ import annotations

import asyncio

import pytest

from convcore import (
    ConflictError,
    ConversationStore,
    FunctionCall,
    Message,
    MessageDraft,
    PermissionDeniedError,
    ToolCall,
)
from convcore.audit import audit_messages
from convcore.content import FilePart, FileRef, ImagePart, ImageURL, TextPart
from convcore.storekit import tail_start
from tests.helpers import draft, turn
from tests.stores import StoreFactory

pytestmark = pytest.mark.anyio

ODD_UIDS = [
    "plain",
    "{braces}:and:colons",
    "with spaces and\ttab",
    "ünïcødé-会话-🙂",
    "x" * 1000,
    "*?[glob]*",
    "'; DROP TABLE messages; --",
]


async def test_missing_conversation_reads_as_empty(store: ConversationStore) -> None:
    assert await store.get_conversation("nope") is None
    assert await store.read_tail("nope", 1000) == []
    assert await store.read_messages("nope") == []
    assert await store.get_turn("nope", "t") is None
    assert await store.delete_conversation("nope") is False


async def test_append_creates_conversation_with_gapless_seqs(store: ConversationStore) -> None:
    system = (draft("system", "be brief"),)
    result = await store.append_turn(
        turn("c1", "t1", "hello", "hi there", system=system, user_name="ann", sys_code="app")
    )
    assert not result.duplicate
    conv = result.conversation
    assert (conv.conv_uid, conv.user_name, conv.sys_code) == ("c1", "ann", "app")
    assert conv.message_count == 2
    assert conv.total_tokens == len("hello") + 4 + len("hi there") + 4
    assert conv.system == system
    assert [m.seq for m in result.turn.messages] == [1, 2]
    assert result.turn.reply.content == "hi there"

    second = await store.append_turn(turn("c1", "t2", "again", "sure"))
    assert [m.seq for m in second.turn.messages] == [3, 4]
    stored = await store.get_conversation("c1")
    assert stored is not None
    assert stored.message_count == 4
    assert stored.system == system, "system=None keeps the system prompt"
    assert stored.created_at == conv.created_at
    assert stored.updated_at >= conv.updated_at
    msgs = await store.read_messages("c1")
    assert [(m.seq, m.role, m.content, m.turn_id) for m in msgs] == [
        (1, "user", "hello", "t1"),
        (2, "assistant", "hi there", "t1"),
        (3, "user", "again", "t2"),
        (4, "assistant", "sure", "t2"),
    ]
    assert msgs[0].starts_round and not msgs[1].starts_round
    assert msgs[0].token_count == len("hello") + 4


async def test_system_prompt_is_replaced_by_a_turn_that_sends_one(store: ConversationStore) -> None:
    await store.append_turn(turn("c", "t1", system=(draft("system", "old"),)))
    await store.append_turn(turn("c", "t2", system=(draft("system", "new"), draft("system", "two"))))
    conv = await store.get_conversation("c")
    assert conv is not None
    assert [m.content for m in conv.system] == ["new", "two"]
    assert conv.message_count == 4, "system messages are not log entries"


async def test_retried_turn_id_is_stored_once(store: ConversationStore) -> None:
    first = await store.append_turn(turn("c", "t1", "q1", "a1"))
    again = await store.append_turn(turn("c", "t1", "q1 changed", "a1 changed"))
    assert again.duplicate
    assert again.turn == first.turn
    assert (await store.get_turn("c", "t1")) == first.turn
    assert len(await store.read_messages("c")) == 2
    conv = await store.get_conversation("c")
    assert conv is not None and conv.message_count == 2


async def test_turn_ids_are_scoped_to_their_conversation(store: ConversationStore) -> None:
    await store.append_turn(turn("a", "same"))
    result = await store.append_turn(turn("b", "same"))
    assert not result.duplicate
    assert await store.get_turn("b", "same") is not None


async def test_conditional_append(store: ConversationStore) -> None:
    with pytest.raises(ConflictError):
        await store.append_turn(turn("c", "t0", expect_last_seq=3))
    assert await store.get_conversation("c") is None, "a refused append writes nothing"
    await store.append_turn(turn("c", "t1", expect_last_seq=0))
    with pytest.raises(ConflictError):
        await store.append_turn(turn("c", "t2", expect_last_seq=0))
    await store.append_turn(turn("c", "t2", expect_last_seq=2))
    assert len(await store.read_messages("c")) == 4
    # A stored turn_id wins over a stale expectation: retries stay idempotent.
    dup = await store.append_turn(turn("c", "t1", expect_last_seq=0))
    assert dup.duplicate


async def test_append_refuses_a_conversation_of_another_owner(store: ConversationStore) -> None:
    first = await store.append_turn(turn("c", "t1", "mine", user_name="ann", sys_code="app"))
    refused = [
        turn("c", "t2", "bob's", user_name="bob"),
        turn("c", "t3", "other app's", sys_code="other"),
        turn("c", "t1", "bob retries ann's turn id", user_name="bob"),  # never ann's stored turn
    ]
    for write in refused:
        with pytest.raises(PermissionDeniedError):
            await store.append_turn(write)
    assert [m.content for m in await store.read_messages("c")] == ["mine", "a"], (
        "a refused turn writes nothing"
    )
    assert await store.get_turn("c", "t2") is None and await store.get_turn("c", "t3") is None
    conv = await store.get_conversation("c")
    assert conv == first.conversation
    # The owner, and an operator (no user_name), may append.
    await store.append_turn(turn("c", "t4", user_name="ann", sys_code="app"))
    await store.append_turn(turn("c", "t5"))
    assert len(await store.read_messages("c")) == 6


async def test_owned_only_append_refuses_a_conversation_without_owner(store: ConversationStore) -> None:
    await store.append_turn(turn("c", "t1"))
    with pytest.raises(PermissionDeniedError):
        await store.append_turn(turn("c", "t2", user_name="bob", owned_only=True))
    with pytest.raises(PermissionDeniedError):
        await store.append_turn(turn("c", "t1", user_name="bob", owned_only=True))
    assert len(await store.read_messages("c")) == 2
    # A new conversation takes an owned-only turn, and then its owner's.
    await store.append_turn(turn("d", "t1", user_name="bob", owned_only=True))
    await store.append_turn(turn("d", "t2", user_name="bob", owned_only=True))
    assert len(await store.read_messages("d")) == 4


async def test_racing_owners_of_a_new_conversation_never_share_it(store: ConversationStore) -> None:
    """Two users start the same conversation at once: whoever creates it
    owns it, and none of the other's turns is stored in it."""
    writes = [
        turn("new", f"{user}-{i}", f"{user} {i}", f"re:{user} {i}", user_name=user, owned_only=True)
        for i in range(12)
        for user in ("ann", "bob")
    ]
    outcomes = await asyncio.gather(*(store.append_turn(w) for w in writes), return_exceptions=True)
    conv = await store.get_conversation("new")
    assert conv is not None and conv.user_name in ("ann", "bob")
    for write, outcome in zip(writes, outcomes, strict=True):
        if write.user_name == conv.user_name:
            assert not isinstance(outcome, BaseException), outcome
        else:
            assert isinstance(outcome, PermissionDeniedError), outcome
    messages = await store.read_messages("new")
    assert len(messages) == 24
    assert all(m.content.startswith((conv.user_name, "re:" + conv.user_name)) for m in messages)


async def test_read_tail_is_the_longest_suffix_within_budget(store: ConversationStore) -> None:
    sizes = [7, 3, 12, 1, 9, 4, 4, 20, 2, 6]
    for i in range(0, len(sizes), 2):
        await store.append_turn(turn("c", f"t{i}", tokens=(sizes[i], sizes[i + 1])))
    everything = await store.read_messages("c")
    counts = [m.token_count for m in everything]
    assert counts == sizes
    for budget in [0, 1, 2, 5, 6, 8, 9, 30, 31, 32, 50, sum(sizes) - 1, sum(sizes), 10_000]:
        tail = await store.read_tail("c", budget)
        assert tail == everything[tail_start(counts, budget) :], budget
        assert sum(m.token_count for m in tail) <= budget


async def test_read_context_is_the_three_reads_at_once(store: ConversationStore) -> None:
    missing = await store.read_context("nope", 100, turn_id="t0")
    assert missing.conversation is None and missing.tail == () and missing.turn is None
    sizes = [7, 3, 12, 1, 9, 4, 4, 20]
    for i in range(0, len(sizes), 2):
        await store.append_turn(turn("c", f"t{i}", tokens=(sizes[i], sizes[i + 1])))
    for budget in [0, 5, 9, 24, 29, 10_000]:
        ctx = await store.read_context("c", budget)
        assert ctx.conversation == await store.get_conversation("c")
        assert list(ctx.tail) == await store.read_tail("c", budget), budget
        assert ctx.turn is None
    found = await store.read_context("c", 10_000, turn_id="t2")
    assert found.turn is not None and found.turn == await store.get_turn("c", "t2")
    assert found.conversation == await store.get_conversation("c")
    unknown = await store.read_context("c", 10_000, turn_id="never")
    assert unknown.turn is None and len(unknown.tail) == len(sizes)


async def test_read_messages_pages_by_seq(store: ConversationStore) -> None:
    for i in range(5):
        await store.append_turn(turn("c", f"t{i}", f"q{i}", f"a{i}"))
    page = await store.read_messages("c", start_seq=3, limit=4)
    assert [m.seq for m in page] == [3, 4, 5, 6]
    assert [m.seq for m in await store.read_messages("c", start_seq=9)] == [9, 10]
    assert await store.read_messages("c", start_seq=11) == []
    assert await store.read_messages("c", limit=0) == []


async def test_list_conversations_filters_orders_and_pages(store: ConversationStore) -> None:
    base = 1_700_000_000.0
    await store.append_turn(turn("a1", "t", user_name="ann", sys_code="x", created_at=base + 1))
    await store.append_turn(turn("b1", "t", user_name="bob", sys_code="x", created_at=base + 2))
    await store.append_turn(turn("a2", "t", user_name="ann", sys_code="y", created_at=base + 3))
    await store.append_turn(turn("a3", "t", user_name="ann", sys_code="x", created_at=base + 4))
    await store.append_turn(turn("a1", "t2", user_name="ann", created_at=base + 5))  # a1 updated last

    ann = await store.list_conversations(user_name="ann")
    assert [c.conv_uid for c in ann] == ["a1", "a3", "a2"]
    assert [c.conv_uid for c in await store.list_conversations(user_name="ann", limit=2)] == ["a1", "a3"]
    assert [c.conv_uid for c in await store.list_conversations(user_name="ann", offset=2)] == ["a2"]
    assert [c.conv_uid for c in await store.list_conversations(sys_code="x")] == ["a1", "a3", "b1"]
    both = await store.list_conversations(user_name="ann", sys_code="x")
    assert [c.conv_uid for c in both] == ["a1", "a3"]
    assert await store.list_conversations(user_name="nobody") == []
    everyone = await store.list_conversations(limit=100)
    assert {c.conv_uid for c in everyone} == {"a1", "a2", "a3", "b1"}


async def test_delete_removes_everything(store: ConversationStore) -> None:
    await store.append_turn(turn("c", "t1", user_name="ann", sys_code="x"))
    await store.append_turn(turn("keep", "t1", user_name="ann", sys_code="x"))
    assert await store.delete_conversation("c") is True
    assert await store.get_conversation("c") is None
    assert await store.read_messages("c") == []
    assert await store.read_tail("c", 10_000) == []
    assert await store.get_turn("c", "t1") is None
    assert [c.conv_uid for c in await store.list_conversations(user_name="ann")] == ["keep"]
    assert [c.conv_uid for c in await store.list_conversations(sys_code="x")] == ["keep"]
    assert await store.delete_conversation("c") is False
    again = await store.append_turn(turn("c", "t1"))
    assert not again.duplicate
    assert [m.seq for m in again.turn.messages] == [1, 2]


async def test_another_prefix_sees_none_of_the_conversations(store_factory: StoreFactory) -> None:
    """Two prefixes on one server: neither reads, lists, continues or
    deletes the other's conversations, even under the same conv_uid."""
    mine, other = store_factory.make(), store_factory.make_other()
    try:
        await mine.append_turn(turn("c", "t1", "mine", user_name="ann", sys_code="x"))
        assert await other.get_conversation("c") is None
        assert await other.read_messages("c") == []
        assert await other.read_tail("c", 10_000) == []
        assert await other.get_turn("c", "t1") is None
        assert await other.list_conversations() == []
        assert await other.list_conversations(user_name="ann", sys_code="x") == []
        assert await other.delete_conversation("c") is False
        theirs = await other.append_turn(turn("c", "t1", "other"))
        assert not theirs.duplicate and [m.seq for m in theirs.turn.messages] == [1, 2]
        assert [m.content for m in await mine.read_messages("c")] == ["mine", "a"]
        assert [c.conv_uid for c in await mine.list_conversations(user_name="ann")] == ["c"]
    finally:
        await mine.aclose()
        await other.aclose()


@pytest.mark.parametrize("conv_uid", ODD_UIDS, ids=lambda u: u[:12])
async def test_any_conv_uid_string_is_safe(store: ConversationStore, conv_uid: str) -> None:
    await store.append_turn(turn(conv_uid, "t1", "q", "a", user_name="u:{x}"))
    await store.append_turn(turn(conv_uid + "-other", "t1"))
    conv = await store.get_conversation(conv_uid)
    assert conv is not None and conv.conv_uid == conv_uid
    assert [m.content for m in await store.read_messages(conv_uid)] == ["q", "a"]
    assert [c.conv_uid for c in await store.list_conversations(user_name="u:{x}")] == [conv_uid]
    assert await store.delete_conversation(conv_uid)
    assert await store.get_conversation(conv_uid + "-other") is not None


async def test_unicode_and_large_content_round_trip(store: ConversationStore) -> None:
    big = "长文本 " * 20_000 + "\x00\n\r\"'\\ end"
    await store.append_turn(turn("c", "t", big, "🙂 ok"))
    msgs = await store.read_messages("c")
    assert msgs[0].content == big and msgs[1].content == "🙂 ok"


async def test_tool_calls_and_results_round_trip(store: ConversationStore) -> None:
    """An assistant's tool calls (null bytes and JSON text in the arguments
    included) and the tool results answering them come back exactly, from
    every read."""
    calls = (
        ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}')),
        ToolCall(id="call_2🙂", function=FunctionCall(name="lookup", arguments='{"q": "a\\u0000b\x00"}')),
    )
    asked = turn("c", "t1", "weather?", "")
    calling = asked.messages[1].model_copy(update={"tool_calls": calls})
    first = await store.append_turn(asked.model_copy(update={"messages": (asked.messages[0], calling)}))
    assert first.turn.reply.tool_calls == calls
    results = (
        MessageDraft(role="tool", content="18C", tool_call_id="call_2🙂", token_count=7),
        MessageDraft(role="tool", content="sunny", tool_call_id="call_1", token_count=8),
        draft("assistant", "It is sunny and 18C."),
    )
    answered = turn("c", "t2").model_copy(update={"messages": results})
    await store.append_turn(answered)
    msgs = await store.read_messages("c")
    assert [(m.role, m.tool_call_id, m.tool_calls) for m in msgs] == [
        ("user", None, None),
        ("assistant", None, calls),
        ("tool", "call_2🙂", None),
        ("tool", "call_1", None),
        ("assistant", None, None),
    ]
    assert await store.read_tail("c", 10**6) == msgs
    assert (await store.read_context("c", 10**6)).tail == tuple(msgs)
    stored = await store.get_turn("c", "t1")
    assert stored is not None and stored.reply == msgs[1]


async def test_content_parts_and_turn_params_round_trip(store: ConversationStore) -> None:
    parts = (
        TextPart(type="text", text="what is this?"),
        ImagePart(type="image_url", image_url=ImageURL(url="https://example.com/a.png", detail="low")),
        FilePart(type="file", file=FileRef(file_id="file-1", filename="a.pdf")),
    )
    question = draft("user", "what is this?", starts_round=True).model_copy(update={"parts": parts})
    params = {"seed": 3, "response_format": {"type": "json_object"}, "temperature": 0.5}
    write = turn("c", "t").model_copy(
        update={
            "messages": (question, draft("assistant", "a cat")),
            "params": params,
            "system": (draft("developer", "be brief"),),
        }
    )
    result = await store.append_turn(write)
    assert result.turn.params == params and result.turn.messages[0].parts == parts
    stored = await store.get_turn("c", "t")
    assert stored is not None and stored.params == params
    assert stored.messages[0].parts == parts and stored.messages[1].parts is None
    assert [m.parts for m in await store.read_messages("c")] == [parts, None]
    assert [m.parts for m in await store.read_tail("c", 10**6)] == [parts, None]
    conv = await store.get_conversation("c")
    assert conv is not None and [m.role for m in conv.system] == ["developer"]
    plain = await store.append_turn(turn("c", "t2"))
    assert plain.turn.params is None
    again = await store.get_turn("c", "t2")
    assert again is not None and again.params is None


def _check_race(messages: list[Message], turn_ids: list[str]) -> None:
    report = audit_messages(messages, expected_turns=turn_ids, unique_inputs=True)
    assert report.ok, report.problems[:5]
    assert report.turns == len(turn_ids)
    assert [m.seq for m in messages] == list(range(1, 2 * len(turn_ids) + 1))
    for user, reply in zip(messages[::2], messages[1::2], strict=True):
        assert user.role == "user" and reply.role == "assistant"
        assert reply.content == "re:" + user.content
        assert reply.turn_id == user.turn_id


async def test_100_concurrent_appends_on_one_conversation(store: ConversationStore) -> None:
    ids = [f"t{i}" for i in range(100)]
    writes = [turn("race", t, f"q-{t}", f"re:q-{t}") for t in ids]
    # Every turn is sent twice at once, as a client retrying a timed-out request would.
    results = await asyncio.gather(*(store.append_turn(w) for w in writes + writes))
    assert sum(not r.duplicate for r in results) == 100
    _check_race(await store.read_messages("race"), ids)
    conv = await store.get_conversation("race")
    assert conv is not None and conv.message_count == 200
    assert conv.total_tokens == sum(m.token_count for m in await store.read_messages("race"))


async def test_concurrent_appends_from_separate_store_objects(store_factory: StoreFactory) -> None:
    """Several store objects on one namespace, each on its own event loop in
    its own thread, race at one conversation (what processes do)."""
    import threading

    ids = [f"t{i}" for i in range(60)]
    errors: list[BaseException] = []

    def worker(chunk: list[str]) -> None:
        async def run() -> None:
            s = store_factory.make()
            try:
                await asyncio.gather(*(s.append_turn(turn("race", t, f"q-{t}", f"re:q-{t}")) for t in chunk))
            finally:
                await s.aclose()

        try:
            asyncio.run(run())
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
        _check_race(await reader.read_messages("race"), ids)
    finally:
        await reader.aclose()


async def test_conditional_appends_race_one_winner_per_seq(store: ConversationStore) -> None:
    await store.append_turn(turn("c", "t0"))
    outcomes = await asyncio.gather(
        *(store.append_turn(turn("c", f"t{i}", expect_last_seq=2)) for i in range(1, 11)),
        return_exceptions=True,
    )
    wins = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(o, ConflictError) for o in outcomes if isinstance(o, BaseException))
    assert len(await store.read_messages("c")) == 4
