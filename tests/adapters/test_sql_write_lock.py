"""SQLite batches take turns across processes by a file lock that wakes its
waiter: a batch waits while another holder has the lock and goes on once it
is let go, a cancelled wait leaves the lock free, and a database without a
lock file (in memory, or a directory it cannot be made in) still writes."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from convcore_sql import SQLStore
from convcore_sql.write_lock import LOCK_SUFFIX, FileWriteLock, lock_path_for
from tests.helpers import turn

pytestmark = pytest.mark.anyio


@contextmanager
def held_elsewhere(path: str) -> Iterator[None]:
    """The lock taken through a descriptor of its own, as another process's store would."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # lets the lock go


def test_the_lock_file_sits_beside_a_database_file_only(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    assert lock_path_for(str(db)) == f"{db}{LOCK_SUFFIX}"
    assert lock_path_for("relative.db") == os.path.abspath("relative.db") + LOCK_SUFFIX
    for database in (None, "", ":memory:", "file:chats?mode=memory&cache=shared"):
        assert lock_path_for(database) is None


async def test_a_batch_waits_for_the_lock_and_goes_on_when_it_is_let_go(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    store = SQLStore.from_url(f"sqlite:///{db}")
    try:
        await store.append_turn(turn("c", "t0"))  # schema in place; the lock file made
        assert (tmp_path / f"chats.db{LOCK_SUFFIX}").exists()
        with held_elsewhere(f"{db}{LOCK_SUFFIX}"):
            waiting = asyncio.ensure_future(store.append_turn(turn("c", "t1")))
            done, _ = await asyncio.wait({waiting}, timeout=0.5)
            assert not done, "the batch wrote while another holder had the lock"
            assert [m.seq for m in await store.read_messages("c")] == [1, 2]
        result = await asyncio.wait_for(waiting, timeout=10)
        assert not result.duplicate
        assert [m.seq for m in await store.read_messages("c")] == [1, 2, 3, 4]
    finally:
        await store.aclose()


async def test_a_cancelled_wait_leaves_the_lock_free(tmp_path: Path) -> None:
    path = str(tmp_path / f"x{LOCK_SUFFIX}")
    first, second = FileWriteLock(path), FileWriteLock(path)

    async def take(lock: FileWriteLock) -> None:
        async with lock.held():
            pass

    try:
        with held_elsewhere(path):
            waiter = asyncio.ensure_future(take(first))
            done, _ = await asyncio.wait({waiter}, timeout=0.2)
            assert not done
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        # The cancelled waiter's thread takes the lock once it is free, then gives it back.
        await asyncio.wait_for(take(second), timeout=10)
    finally:
        first.close()
        second.close()


async def test_without_a_lock_file_batches_still_write(tmp_path: Path) -> None:
    lock = FileWriteLock(str(tmp_path / "no-such-directory" / f"x{LOCK_SUFFIX}"))
    async with lock.held():
        pass  # SQLite's busy handler is then the only wait
    memory = SQLStore.from_url("sqlite://")
    try:
        await memory.append_turn(turn("c", "t0"))
        assert memory._write_lock is None
        assert len(await memory.read_messages("c")) == 2
    finally:
        await memory.aclose()
