"""The SQL store's cache of decoded messages: keyed by every value of the
row, so a cached message is always what decoding the row again gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from convcore_sql import SQLStore
from convcore_sql.message_cache import RawMessageCache
from tests.helpers import turn

pytestmark = pytest.mark.anyio


def _row(content: str, seq: int = 1, parts: str | None = None) -> tuple[object, ...]:
    return ("user", content, None, None, 3, 1, seq, "t1", 1.5, parts, None)


def test_the_same_row_decodes_once() -> None:
    cache = RawMessageCache()
    first = cache.message(_row("hello"), raw=True)
    assert cache.message(_row("hello"), raw=True) is first
    assert first.content == "hello" and first.starts_round is True and first.seq == 1


def test_any_changed_value_is_a_different_message() -> None:
    cache = RawMessageCache()
    a = cache.message(_row("hello"), raw=True)
    b = cache.message(_row("hullo"), raw=True)
    assert b is not a and b.content == "hullo"
    with_parts = cache.message(_row("hello", parts='[{"type": "text", "text": "x"}]'), raw=True)
    assert with_parts is not a and with_parts.parts


def test_the_cache_stays_within_its_bounds() -> None:
    cache = RawMessageCache(capacity=3, max_chars=400)
    for i in range(10):
        cache.message(_row(f"m{i}", seq=i + 1), raw=True)
    assert len(cache._entries) == 3
    big = cache.message(_row("x" * 200), raw=True)  # over a quarter of max_chars: decoded, not kept
    assert big.content == "x" * 200 and len(cache._entries) == 3
    off = RawMessageCache(capacity=0)
    off.message(_row("a"), raw=True)
    assert off._entries == {}


async def test_a_conversation_deleted_and_written_again_reads_its_new_messages(tmp_path: Path) -> None:
    store = SQLStore.from_url(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        await store.append_turn(turn("c", "t1", "old question", "old answer"))
        assert [m.content for m in (await store.read_context("c", 1000)).tail] == [
            "old question",
            "old answer",
        ]
        await store.delete_conversation("c")
        await store.append_turn(turn("c", "t1", "new question", "new answer"))
        tail = (await store.read_context("c", 1000)).tail
        assert [m.content for m in tail] == ["new question", "new answer"]
        assert [m.seq for m in tail] == [1, 2]
    finally:
        await store.aclose()
