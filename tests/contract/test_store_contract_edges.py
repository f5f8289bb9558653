"""The store contract at its edges, on every store.

Written against the protocol only, with the contract suite's ``store``
fixture, so each case runs on all stores.
"""

from __future__ import annotations

import time

import pytest

from convcore import ConversationStore, TurnWrite
from convcore.storekit import tail_start
from tests.helpers import draft, turn

pytestmark = pytest.mark.anyio


def _history(conv_uid: str, turn_id: str, n: int) -> TurnWrite:
    """One turn of ``n`` messages: a whole history sent at once."""
    return TurnWrite(
        conv_uid=conv_uid,
        turn_id=turn_id,
        messages=tuple(
            draft("user" if i % 2 == 0 else "assistant", f"m{i}", 1 + i % 3, starts_round=i % 2 == 0)
            for i in range(n)
        ),
        encoding="cl100k_base",
        model="m",
        prompt_tokens=1,
        completion_tokens=1,
        created_at=time.time(),
    )


async def test_list_filters_match_names_exactly(store: ConversationStore) -> None:
    """user_name / sys_code filters are exact: no case, accent or
    trailing-space folding (another user's conversations must not show)."""
    names = ["ann", "ANN", "Ann", "ann ", "änn"]
    for i, name in enumerate(names):
        await store.append_turn(turn(f"c{i}", "t", user_name=name, sys_code=name.upper()))
    for i, name in enumerate(names):
        by_user = await store.list_conversations(user_name=name)
        assert [c.conv_uid for c in by_user] == [f"c{i}"], name
        by_sys = await store.list_conversations(sys_code=name.upper())
        expected = sorted(f"c{j}" for j, other in enumerate(names) if other.upper() == name.upper())
        assert sorted(c.conv_uid for c in by_sys) == expected, name
        both = await store.list_conversations(user_name=name, sys_code=name.upper())
        assert [c.conv_uid for c in both] == [f"c{i}"], name


async def test_a_turn_of_thousands_of_messages(store: ConversationStore) -> None:
    n = 5_000
    first = await store.append_turn(_history("big", "h", n))
    assert not first.duplicate
    assert [m.seq for m in first.turn.messages] == list(range(1, n + 1))
    total = sum(1 + i % 3 for i in range(n))
    assert first.conversation.message_count == n and first.conversation.total_tokens == total
    again = await store.append_turn(_history("big", "h", n))
    assert again.duplicate and again.turn == first.turn
    nxt = await store.append_turn(turn("big", "t", expect_last_seq=n))
    assert [m.seq for m in nxt.turn.messages] == [n + 1, n + 2]
    msgs = await store.read_messages("big")
    assert [m.seq for m in msgs] == list(range(1, n + 3))
    assert await store.read_tail("big", 10**9) == msgs
    assert (await store.get_turn("big", "h")) == first.turn


async def test_budgets_at_the_edges(store: ConversationStore) -> None:
    # Zero-token messages at the end and in the middle: ties on tokens-before.
    sizes = [5, 0, 3, 0, 0, 4, 0, 0]
    for i in range(0, len(sizes), 2):
        await store.append_turn(turn("c", f"t{i}", tokens=(sizes[i], sizes[i + 1])))
    everything = await store.read_messages("c")
    cumulative = [sum(sizes[i:]) for i in range(len(sizes))]
    for budget in [-(2**63) + 1, -(10**6), -1, 0, 1, 3, 4, 6, 7, 8, *cumulative, 2**63 - 1]:
        want = everything[tail_start(sizes, budget) :] if budget >= 0 else []
        assert await store.read_tail("c", budget) == want, budget
        ctx = await store.read_context("c", budget)
        assert list(ctx.tail) == want, budget
        assert ctx.conversation is not None and ctx.conversation.message_count == len(sizes)
    found = await store.read_context("c", -1, turn_id="t2")
    assert found.turn is not None and [m.seq for m in found.turn.messages] == [3, 4]


async def test_listing_pages_cover_ties_once(store: ConversationStore) -> None:
    """Conversations updated at the same instant are paged in one fixed
    order: every one appears exactly once across the pages."""
    same = 1_700_000_000.5
    uids = [f"tie-{i:02d}" for i in range(12)]
    for uid in uids:
        await store.append_turn(turn(uid, "t", user_name="u", sys_code="s", created_at=same))
    await store.append_turn(turn("newest", "t", user_name="u", sys_code="s", created_at=same + 1))
    for filters in ({}, {"user_name": "u"}, {"sys_code": "s"}, {"user_name": "u", "sys_code": "s"}):
        seen: list[str] = []
        for offset in range(0, 14, 5):
            seen += [c.conv_uid for c in await store.list_conversations(limit=5, offset=offset, **filters)]
        assert seen[0] == "newest", filters
        assert sorted(seen[1:]) == uids and len(seen) == 13, filters
        whole = [c.conv_uid for c in await store.list_conversations(limit=100, **filters)]
        assert whole == seen, filters


async def test_duplicate_wins_over_a_stale_expectation_on_a_new_write(store: ConversationStore) -> None:
    await store.append_turn(turn("c", "t1"))
    await store.append_turn(turn("c", "t2", expect_last_seq=2))
    dup = await store.append_turn(turn("c", "t1", "other", "other", expect_last_seq=99))
    assert dup.duplicate and [m.seq for m in dup.turn.messages] == [1, 2]
    assert dup.conversation.message_count == 4
    assert len(await store.read_messages("c")) == 4


async def test_timestamps_and_totals_after_many_turns(store: ConversationStore) -> None:
    stamps = [1_700_000_000.123456789 + i * 0.1 for i in range(40)] + [0.1 + 0.2, 1e-7, 2**52 + 0.5]
    total = 0
    for i, at in enumerate(stamps):
        w = turn("c", f"t{i}", tokens=(i, 7 * i + 1), created_at=at)
        total += i + 7 * i + 1
        result = await store.append_turn(w)
        assert result.turn.created_at == at
    conv = await store.get_conversation("c")
    assert conv is not None
    assert conv.total_tokens == total and conv.message_count == 2 * len(stamps)
    assert conv.created_at == stamps[0] and conv.updated_at == max(stamps)
    msgs = await store.read_messages("c")
    assert [m.created_at for m in msgs[::2]] == stamps
    for i, at in enumerate(stamps):
        stored = await store.get_turn("c", f"t{i}")
        assert stored is not None and stored.created_at == at
