"""The records facet's contract: every storage's ``records`` passes these.

Each storage is opened the way users open it, ``open_store(url)``, on the
seven backends of tests/stores (memory, fakeredis, Redis, a Redis Cluster
the tests start, SQLite, PostgreSQL, MariaDB) plus fakeredis with decoded
replies; each test gets a fresh namespace, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convcore import ConflictError, InvalidRequestError, RecordStore, Storage
from convcore.records import MemoryRecordStore
from tests.helpers import turn
from tests.stores import StoreFactory, all_factory_params
from tests.stores.redis import fakeredis_factory

pytestmark = pytest.mark.anyio

FACTORIES = [*all_factory_params(), pytest.param(fakeredis_factory(decode=True), id="fakeredis-decoded")]


@pytest.fixture(params=FACTORIES)
async def storage_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    opener: Callable[[], AbstractAsyncContextManager[StoreFactory]] = request.param
    async with opener() as factory:
        try:
            yield factory
        finally:
            await factory.cleanup()


@pytest.fixture
async def storage(storage_factory: StoreFactory) -> AsyncIterator[Storage]:
    opened = storage_factory.make()
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def records(storage: Storage) -> RecordStore:
    return storage.records


async def test_satisfies_the_protocols(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    assert isinstance(storage.records, RecordStore)
    assert storage.records is storage.records  # one facet, not a store per access


async def test_closing_the_facet_leaves_the_storage_open(storage: Storage) -> None:
    await storage.records.put("app", "a", {"v": 1})
    await storage.records.aclose()
    assert await storage.records.get("app", "a") == {"v": 1}
    await storage.append_turn(turn("c", "t1"))
    assert await storage.get_conversation("c") is not None


async def test_put_get_roundtrip_keeps_json_types(records: RecordStore) -> None:
    value = {"s": "héllo 世界", "i": 7, "f": 1.5, "b": True, "n": None, "l": [1, "x"], "d": {"k": [{}]}}
    await records.put("app", "a1", value)
    assert await records.get("app", "a1") == value
    assert await records.get("app", "missing") is None
    assert await records.get("other-kind", "a1") is None


async def test_put_replaces(records: RecordStore) -> None:
    await records.put("app", "a", {"v": 1})
    await records.put("app", "a", {"v": 2})
    assert await records.get("app", "a") == {"v": 2}
    assert await records.list("app") == [{"v": 2}]


async def test_create_only_conflicts_and_changes_nothing(records: RecordStore) -> None:
    await records.put("app", "a", {"v": 1}, create_only=True)
    with pytest.raises(ConflictError):
        await records.put("app", "a", {"v": 2}, create_only=True)
    assert await records.get("app", "a") == {"v": 1}
    await records.put("app2", "a", {"v": 3}, create_only=True)  # another kind: no conflict


async def test_list_is_ordered_by_key_and_paged(records: RecordStore) -> None:
    keys = ["b", "a", "c10", "c2", "Z", "é", "000000000010", "000000000002"]
    for k in keys:
        await records.put("k", k, {"key": k})
    listed = [r["key"] for r in await records.list("k", limit=100)]
    assert listed == sorted(keys)
    assert [r["key"] for r in await records.list("k", limit=3, offset=2)] == sorted(keys)[2:5]
    assert await records.list("k", limit=5, offset=100) == []
    assert await records.list("k", limit=0) == []
    assert await records.list("empty-kind") == []


async def test_delete_returns_the_record_once(records: RecordStore) -> None:
    await records.put("ds", "1", {"id": 1})
    assert await records.delete("ds", "1") == {"id": 1}
    assert await records.delete("ds", "1") is None
    assert await records.get("ds", "1") is None
    assert await records.list("ds") == []
    assert await records.delete("ds", "never") is None
    await records.put("ds", "1", {"id": 1}, create_only=True)  # the key is free again


async def test_odd_keys_and_kinds(records: RecordStore) -> None:
    long_key = "k" * 2000 + "{}:*?[]"
    kind = "knowledge_chunk:space {x} ünï"
    await records.put(kind, long_key, {"ok": 1})
    await records.put(kind, "", {"empty": True})
    assert await records.get(kind, long_key) == {"ok": 1}
    assert await records.get(kind, "") == {"empty": True}
    assert len(await records.list(kind)) == 2
    assert await records.delete(kind, long_key) == {"ok": 1}


async def test_racing_creates_exactly_one_wins(storage_factory: StoreFactory) -> None:
    stores = [storage_factory.make() for _ in range(4)]
    wins: list[int] = []
    conflicts: list[int] = []

    async def create(i: int) -> None:
        try:
            await stores[i % len(stores)].records.put("race", "the-one", {"by": i}, create_only=True)
            wins.append(i)
        except ConflictError:
            conflicts.append(i)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(create, i)
        assert len(wins) == 1 and len(conflicts) == 7
        assert await stores[0].records.get("race", "the-one") == {"by": wins[0]}
    finally:
        for s in stores:
            await s.aclose()


async def test_racing_deletes_return_the_record_once(storage_factory: StoreFactory) -> None:
    stores = [storage_factory.make() for _ in range(4)]
    got: list[object] = []
    try:
        await stores[0].records.put("race", "gone", {"v": 1, "user_name": "ann"})

        async def remove(i: int) -> None:
            got.append(await stores[i % len(stores)].records.delete("race", "gone"))

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(remove, i)
        assert [g for g in got if g is not None] == [{"v": 1, "user_name": "ann"}]
        assert await stores[1].records.list("race", user_name="ann") == []
    finally:
        for s in stores:
            await s.aclose()


async def test_values_are_copies(records: RecordStore) -> None:
    value = {"l": [1]}
    await records.put("c", "k", value)
    value["l"].append(2)
    got = await records.get("c", "k")
    assert got == {"l": [1]}
    assert got is not None
    got["l"].append(3)
    assert await records.get("c", "k") == {"l": [1]}


# -- namespaces -------------------------------------------------------------------


async def test_another_prefix_sees_none_of_the_records(storage_factory: StoreFactory) -> None:
    """Two prefixes on one server: records written under one are invisible,
    untouchable and not in conflict under the other."""
    mine, other = storage_factory.make(), storage_factory.make_other()
    try:
        await mine.records.put("app", "shared-key", {"owner": "mine", "user_name": "ann"})
        assert await other.records.get("app", "shared-key") is None
        assert await other.records.list("app") == []
        assert await other.records.list("app", user_name="ann") == []
        assert await other.records.delete("app", "shared-key") is None
        await other.records.put("app", "shared-key", {"owner": "other"}, create_only=True)
        assert await mine.records.get("app", "shared-key") == {"owner": "mine", "user_name": "ann"}
        assert await mine.records.list("app") == [{"owner": "mine", "user_name": "ann"}]
        assert await other.records.list("app") == [{"owner": "other"}]
    finally:
        await mine.aclose()
        await other.aclose()


# -- owners -----------------------------------------------------------------------

# Distinct strings that case-, accent-, width- or space-folding would merge.
NAMES = ["ann", "ANN", "Ann", "ann ", " ann", "änn", "a\u0308nn", "ａｎｎ", "ann\t"]


@pytest.mark.parametrize("field", ["user_name", "sys_code"])
async def test_owner_filter_matches_exactly(records: RecordStore, field: str) -> None:
    for i, name in enumerate(NAMES):
        await records.put("ds", f"k{i}", {"i": i, field: name})
    await records.put("ds", "nobody", {"i": -1})
    await records.put("ds", "not-a-string", {"i": -2, field: 7})
    for i, name in enumerate(NAMES):
        assert await records.list("ds", **{field: name}) == [{"i": i, field: name}], name
    assert await records.list("ds", **{field: "nobody"}) == []
    assert await records.list("ds", **{field: "7"}) == []
    assert len(await records.list("ds")) == len(NAMES) + 2  # unfiltered: ownerless ones too


async def test_owner_filters_combine_and_page(records: RecordStore) -> None:
    owners = [("ann", "s1"), ("bob", "s1"), ("ann", "s2"), (None, "s1"), ("ann", None), (None, None)]
    for i in range(30):
        user, sys = owners[i % len(owners)]
        value: dict[str, object] = {"i": i}
        if user is not None:
            value["user_name"] = user
        if sys is not None:
            value["sys_code"] = sys
        await records.put("app", f"r{i:02d}", value)

    async def paged(**filters: str) -> list[int]:
        seen: list[int] = []
        for offset in range(0, 40, 4):
            seen += [r["i"] for r in await records.list("app", limit=4, offset=offset, **filters)]
        return seen

    def expect(user: str | None, sys: str | None) -> list[int]:
        return [
            i
            for i in range(30)
            if (user is None or owners[i % 6][0] == user) and (sys is None or owners[i % 6][1] == sys)
        ]

    assert await paged(user_name="ann") == expect("ann", None)
    assert await paged(sys_code="s1") == expect(None, "s1")
    assert await paged(user_name="ann", sys_code="s1") == expect("ann", "s1")
    assert await paged(user_name="bob", sys_code="s2") == []
    assert await paged() == list(range(30))
    assert await records.list("app", user_name="ann", limit=2, offset=1) == [
        await records.get("app", f"r{i:02d}") for i in expect("ann", None)[1:3]
    ]


async def test_owner_follows_the_latest_value(records: RecordStore) -> None:
    await records.put("flow", "f", {"user_name": "ann", "sys_code": "s"})
    await records.put("flow", "f", {"user_name": "bob", "sys_code": "s"})
    assert await records.list("flow", user_name="ann") == []
    assert await records.list("flow", user_name="bob", sys_code="s") == [
        {"user_name": "bob", "sys_code": "s"}
    ]
    with pytest.raises(ConflictError):
        await records.put("flow", "f", {"user_name": "eve"}, create_only=True)
    assert await records.list("flow", user_name="eve") == []
    await records.put("flow", "f", {"v": "ownerless now"})
    assert await records.list("flow", user_name="bob") == []
    assert await records.list("flow", sys_code="s") == []
    await records.put("flow", "f", {"user_name": "ann"})
    assert await records.delete("flow", "f") == {"user_name": "ann"}
    assert await records.list("flow", user_name="ann") == []
    await records.put("flow", "f", {"v": 2}, create_only=True)
    assert await records.list("flow", user_name="ann") == []


@pytest.mark.parametrize("field", ["user_name", "sys_code"])
async def test_an_owner_longer_than_a_name_is_refused(records: RecordStore, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await records.put("app", "a", {field: "x" * 257})
    assert info.value.field == field
    assert await records.get("app", "a") is None
    await records.put("app", "a", {field: "x" * 256})
    assert await records.list("app", **{field: "x" * 256}) == [{field: "x" * 256}]


_OWNER = st.sampled_from([None, "ann", "Ann", "bob"])
_OPS = st.lists(
    st.tuples(st.sampled_from(["put", "delete"]), st.sampled_from("abcde"), _OWNER, _OWNER),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_OPS, page=st.integers(min_value=1, max_value=3))
async def test_listings_agree_with_the_reference_after_any_writes(
    records: RecordStore, ops: list[tuple[str, str, str | None, str | None]], page: int
) -> None:
    """Any sequence of puts and deletes leaves every filtered, paged listing
    equal to the in-memory reference's."""
    kind = f"prop-{uuid.uuid4().hex[:8]}"  # examples share the namespace
    reference = MemoryRecordStore()
    for op, key, user, sys in ops:
        value: dict[str, object] = {"key": key}
        if user is not None:
            value["user_name"] = user
        if sys is not None:
            value["sys_code"] = sys
        for target in (records, reference):
            if op == "put":
                await target.put(kind, key, value)
            else:
                await target.delete(kind, key)
    for user in (None, "ann", "Ann", "bob"):
        for sys in (None, "ann", "bob"):
            for offset in range(0, 6, page):
                want = await reference.list(kind, limit=page, offset=offset, user_name=user, sys_code=sys)
                got = await records.list(kind, limit=page, offset=offset, user_name=user, sys_code=sys)
                assert got == want, (user, sys, offset)


# -- compaction summaries ---------------------------------------------------------


async def test_compaction_summaries_are_kept_once_per_range(storage_factory: StoreFactory) -> None:
    """Two engines on two storage objects of one namespace (two processes'
    worth) racing to summarise the same range: it is stored once, under its
    range, next to the conversation, and both turns use that one."""
    from convcore import Compactor, Engine, LocalBackend, ModelRegistry, ModelSpec

    storages = [storage_factory.make() for _ in range(3)]
    spec = ModelSpec(name="m", backend=LocalBackend(), context_window=300, max_new_tokens=40)
    conv_uid = f"cmp-{uuid.uuid4().hex}"
    try:
        plain = Engine(storages[0], ModelRegistry([spec]))
        for i in range(12):
            await plain.chat({"messages": f"note {i}", "conv_uid": conv_uid})
        engines = [
            Engine(
                s,
                ModelRegistry([spec]),
                compaction=Compactor(s.records, min_rounds=2, share=0.5, max_new_tokens=60),
            )
            for s in storages[:2]
        ]
        done = await asyncio.gather(
            *(e.chat({"messages": f"race {i}", "conv_uid": conv_uid}) for i, e in enumerate(engines))
        )
        ranges = {d.trim.summarized_seqs[0] for d in done if d.trim and d.trim.summarized_seqs}
        assert len(ranges) == 1, ranges
        first, last = ranges.pop()
        reader = storages[2].records
        kept = await reader.get("summary", f"{conv_uid}:{last}")
        assert kept is not None and (kept["first"], kept["last"]) == (first, last) == (1, last)
        latest = await reader.get("summary-latest", conv_uid)
        assert latest is not None and latest["last"] == last
        await engines[0].delete_conversation(conv_uid)
        assert await reader.get("summary-latest", conv_uid) is None
        assert await reader.get("summary", f"{conv_uid}:{last}") is None
    finally:
        for s in storages:
            await s.aclose()
