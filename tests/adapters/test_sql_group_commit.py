"""Group commit on the SQL store: appends waiting together share one
transaction, and what a caller sees is what one transaction per turn gives:
only committed turns are acknowledged, a failed batch leaves nothing
half-written, a turn refused on its own fails alone, seqs stay gapless and a
repeated turn_id is a duplicate."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from convcore import ConflictError, StorageError, TurnWrite
from convcore.audit import audit_messages
from convcore_sql import SQLStore
from convcore_sql.group_commit import GroupCommit, Outcome
from convcore_sql.sqlite_trip import NoThreadHook
from tests.helpers import assert_race_kept_every_turn, turn
from tests.stores import unavailable
from tests.stores.sql import MARIADB_URL, PG_URL, POOL, new_prefix, reachable, with_table_prefix

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Any) -> AsyncIterator[SQLStore]:
    s = SQLStore.from_url(f"sqlite:///{tmp_path / 'gc.db'}", table_prefix="gc_")
    await s.get_conversation("warm")  # schema in place: batches below are the appends only
    yield s
    await s.aclose()


def _committer(store: SQLStore) -> GroupCommit[TurnWrite, Any]:
    group = store._group
    assert group is not None, "group commit is on by default on SQLite"
    return group


async def test_concurrent_appends_share_transactions_and_keep_every_turn(store: SQLStore) -> None:
    convs = [f"c{i}" for i in range(8)]
    ids = {c: [f"{c}-t{k}" for k in range(12)] for c in convs}

    async def writer(c: str, k: int) -> str:
        await store.append_turn(turn(c, ids[c][k], question=f"q {c} {k}"))
        return ids[c][k]

    results = await asyncio.gather(*(writer(c, k) for c in convs for k in range(12)))
    group = _committer(store)
    assert group.batched == len(results) == 96
    assert group.batches < group.batched / 4  # turns did share commits
    for c in convs:
        await assert_race_kept_every_turn(store, c, ids[c])


@contextmanager
def failing(store: SQLStore, statement: str, times: int) -> Iterator[list[str]]:
    """The next ``times`` statements starting with ``statement`` fail as a
    busy database would; yields the statements that failed."""
    failed: list[str] = []

    def before(conn: Any, cursor: Any, sql: str, *rest: Any) -> None:
        if sql.lstrip().upper().startswith(statement) and len(failed) < times:
            failed.append(sql)
            raise sqlite3.OperationalError("database is locked")

    sync_engine = store.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", before)
    try:
        yield failed
    finally:
        event.remove(sync_engine, "before_cursor_execute", before)


@pytest.mark.parametrize(
    "statement",
    ["INSERT INTO GC_MESSAGES", "INSERT INTO GC_TURNS", "UPDATE GC_CONVERSATIONS"],
    ids=["messages", "turns", "update"],
)
async def test_a_failed_batch_acknowledges_none_and_leaves_nothing_half_written(
    store: SQLStore, monkeypatch: pytest.MonkeyPatch, statement: str
) -> None:
    async def alone_fails(t: TurnWrite) -> Any:
        raise StorageError("the database went away")

    await store.append_turn(turn("f0", "f0-first"))  # so the batch updates a row too
    monkeypatch.setattr(_committer(store), "_alone", alone_fails)
    turns = [turn("f0", "f0-second"), turn("f1", "f1-t"), turn("f2", "f2-t")]
    with failing(store, statement, times=1) as failed:
        outcomes = await asyncio.gather(*(store.append_turn(t) for t in turns), return_exceptions=True)
    assert len(failed) == 1  # the batch's one statement of that kind, after the others before it ran
    assert all(isinstance(o, StorageError) for o in outcomes)  # none acknowledged
    await assert_race_kept_every_turn(store, "f0", ["f0-first"])  # unchanged
    for conv in ("f1", "f2"):  # and nothing of the others stored, not even in part
        assert await store.get_conversation(conv) is None
        assert await store.read_messages(conv) == []
        assert await store.get_turn(conv, f"{conv}-t") is None


async def test_a_failed_batch_runs_each_turn_again_alone(store: SQLStore) -> None:
    ids = [f"r{i}" for i in range(5)]
    with failing(store, "INSERT INTO GC_TURNS", times=1) as failed:
        results = await asyncio.gather(*(store.append_turn(turn("retried", t, question=t)) for t in ids))
    assert len(failed) == 1
    assert [r.duplicate for r in results] == [False] * 5  # the rolled-back attempt left no trace
    await assert_race_kept_every_turn(store, "retried", ids)


async def test_a_refused_turn_fails_alone_and_the_batch_commits(store: SQLStore) -> None:
    await store.append_turn(turn("known", "k0"))  # last seq 2
    batch = [
        turn("known", "k1", question="k1"),
        turn("known", "k-stale", question="stale", expect_last_seq=0),  # refused
        turn("new", "n0", expect_last_seq=5),  # refused before the row is created
        turn("other", "o0"),
    ]
    outcomes = await asyncio.gather(*(store.append_turn(t) for t in batch), return_exceptions=True)
    assert isinstance(outcomes[1], ConflictError) and isinstance(outcomes[2], ConflictError)
    assert not isinstance(outcomes[0], BaseException) and not isinstance(outcomes[3], BaseException)
    await assert_race_kept_every_turn(store, "known", ["k0", "k1"])
    assert await store.get_conversation("new") is None
    assert (await store.get_conversation("other")) is not None
    # The refusal changed nothing for the others' retries: a repeat is a duplicate.
    again = await store.append_turn(turn("known", "k1", question="k1"))
    assert again.duplicate and again.turn.messages[0].seq == 3


async def test_a_turn_id_repeated_in_one_batch_is_stored_once(store: SQLStore) -> None:
    same = [turn("dup", "d0", question="d0") for _ in range(4)]
    results = await asyncio.gather(*(store.append_turn(t) for t in same))
    assert [r.duplicate for r in results] == [False, True, True, True]
    assert {r.turn.messages[0].seq for r in results} == {1}
    await assert_race_kept_every_turn(store, "dup", ["d0"])


async def test_a_caller_that_stops_waiting_does_not_stop_the_write(store: SQLStore) -> None:
    task = asyncio.ensure_future(store.append_turn(turn("gone", "g0")))
    await asyncio.sleep(0)  # queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _committer(store).aclose()
    retried = await store.append_turn(turn("gone", "g0"))
    assert retried.duplicate  # the retry finds the turn the writer committed


async def test_group_commit_is_chosen_by_keyword_or_url(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'opt.db'}"
    for made, on in [
        (SQLStore.from_url(url), True),
        (SQLStore.from_url(url + "?group_commit=0"), False),
        (SQLStore.from_url(url + "?group_commit=off", group_commit=True), True),
    ]:
        assert (made._group is not None) is on
        await made.aclose()
    with pytest.raises(Exception, match="group_commit"):
        SQLStore.from_url(url + "?group_commit=maybe")


async def test_group_commit_writer_settles_every_outcome() -> None:
    """The committer alone: outcomes reach their callers in order, errors included."""

    async def batch(items: Any) -> list[Outcome[int]]:
        return [Outcome(error=ValueError(i)) if i % 3 == 0 else Outcome(value=i * 10) for i in items]

    async def alone(item: int) -> int:
        raise AssertionError("no batch failed")

    group: GroupCommit[int, int] = GroupCommit(batch, alone, max_batch=4)
    results = await asyncio.gather(*(group.submit(i) for i in range(10)), return_exceptions=True)
    assert [r if isinstance(r, int) else "err" for r in results] == [
        "err",
        10,
        20,
        "err",
        40,
        50,
        "err",
        70,
        80,
        "err",
    ]
    assert group.batches == 3 and group.batched == 10  # at most 4 a batch


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(
        st.tuples(
            st.integers(0, 2), st.integers(0, 5), st.booleans()
        ),  # conversation, turn, stale expectation
        min_size=1,
        max_size=24,
    )
)
async def test_any_mix_of_waiting_turns_is_stored_gapless_and_once(tmp_path: Any, plan: list[Any]) -> None:
    store = SQLStore.from_url(f"sqlite:///{tmp_path / 'prop.db'}", table_prefix=new_prefix())
    try:
        writes = [
            turn(f"p{c}", f"p{c}-t{k}", question=f"p{c}-t{k}", expect_last_seq=999 if stale else None)
            for c, k, stale in plan
        ]
        outcomes = await asyncio.gather(*(store.append_turn(w) for w in writes), return_exceptions=True)
        acked: dict[str, list[str]] = {}
        for w, o in zip(writes, outcomes, strict=True):
            if isinstance(o, BaseException):
                assert isinstance(o, ConflictError) and w.expect_last_seq == 999
            elif not o.duplicate:
                acked.setdefault(w.conv_uid, []).append(w.turn_id)
        for conv in {w.conv_uid for w in writes}:
            messages = await store.read_messages(conv)
            report = audit_messages(messages, expected_turns=acked.get(conv, []), unique_inputs=True)
            assert report.ok, report.problems[:5]
            assert len(messages) == 2 * len(acked.get(conv, []))
    finally:
        await store.drop_tables()
        await store.aclose()


@pytest.mark.parametrize("url", [PG_URL, MARIADB_URL], ids=["postgresql", "mariadb"])
async def test_group_commit_on_server_databases(url: str) -> None:
    if not reachable(url):
        unavailable(f"{url} is not reachable")
    store = SQLStore.from_url(with_table_prefix(url, new_prefix()), group_commit=True, **POOL)
    try:
        await store.append_turn(turn("s-known", "k0"))
        writes = [turn(f"s{i % 4}", f"s{i % 4}-t{i}", question=f"s{i}") for i in range(24)]
        writes.append(turn("s-known", "stale", expect_last_seq=0))
        outcomes = await asyncio.gather(*(store.append_turn(w) for w in writes), return_exceptions=True)
        assert isinstance(outcomes[-1], ConflictError)  # alone: its savepoint undone, the batch kept
        for i in range(4):
            await assert_race_kept_every_turn(store, f"s{i}", [w.turn_id for w in writes[i:24:4]])
        await assert_race_kept_every_turn(store, "s-known", ["k0"])
        assert _committer(store).batched == 26
    finally:
        await store.drop_tables()
        await store.aclose()


async def test_a_batch_runs_in_one_trip_to_the_drivers_thread(store: SQLStore) -> None:
    trip = store._trip
    assert trip is not None and trip.usable()
    trips: list[int] = []
    run = trip._in_thread

    def counted(raw: Any, work: Any) -> Any:
        trips.append(1)
        return run(raw, work)

    trip._in_thread = counted  # type: ignore[method-assign]
    convs = [f"one-trip-{i}" for i in range(6)]
    await asyncio.gather(
        *(store.append_turn(turn(c, f"{c}-t{k}", question=f"{c}-t{k}")) for c in convs for k in range(3))
    )
    group = _committer(store)
    assert len(trips) == group.batches > 0
    for c in convs:
        await assert_race_kept_every_turn(store, c, [f"{c}-t{k}" for k in range(3)])


async def test_an_engine_with_statement_listeners_keeps_sqlalchemys_path(store: SQLStore) -> None:
    seen: list[str] = []

    def before(conn: Any, cursor: Any, sql: str, *rest: Any) -> None:
        seen.append(sql)

    event.listen(store.engine.sync_engine, "before_cursor_execute", before)
    try:
        assert store._trip is not None and not store._trip.usable()
        await asyncio.gather(
            *(store.append_turn(turn("watched", f"w{k}", question=f"w{k}")) for k in range(3))
        )
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", before)
    assert any(s.lstrip().upper().startswith("INSERT INTO GC_MESSAGES") for s in seen)
    await assert_race_kept_every_turn(store, "watched", ["w0", "w1", "w2"])


async def test_a_driver_without_the_thread_hook_keeps_sqlalchemys_path(store: SQLStore) -> None:
    async def no_hook(work: Any) -> Any:
        raise NoThreadHook("no hook here")

    assert store._trip is not None
    store._trip.batch = no_hook  # type: ignore[method-assign]
    await asyncio.gather(*(store.append_turn(turn("hookless", f"h{k}", question=f"h{k}")) for k in range(3)))
    assert store._trip is None  # not tried again
    await assert_race_kept_every_turn(store, "hookless", ["h0", "h1", "h2"])
