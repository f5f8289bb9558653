"""One SQLite writer at a time across processes, woken when the lock frees.

SQLite lets one connection write at a time. A writer that finds the lock
taken waits in SQLite's busy handler, which sleeps 1, 2, 5, 10, ... up to
100 ms between tries and never learns that the lock was released. Two
processes that group-commit their turns on one database file (``convcore
serve --workers 2``) then take turns badly: the one that just committed
starts its next batch at once, while the other sleeps on, so cores sit
idle and the waiting process's turns pile up (p99 of seconds).

A store on a SQLite file therefore takes an exclusive ``flock`` on a lock
file beside the database (``<database>-convcore-lock``) around each
group-committed batch. The kernel wakes a waiter as soon as the holder
lets go, so the write lock changes hands within microseconds, and SQLite's
busy handler only ever sees writers that do not take the lock (another
program, or this store's rare writes outside a batch). The lock file is a
file of its own because SQLite's POSIX locks on the database are dropped
when any descriptor of that file closes in the process.

Without ``fcntl`` (Windows) there is no such lock, and SQLite's busy
handler does all the waiting, as it would anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_SUFFIX", "FileWriteLock", "database_file", "lock_path_for"]

LOCK_SUFFIX = "-convcore-lock"


def database_file(database: str | None) -> str | None:
    """A SQLite database path as an absolute file name; None for an
    in-memory database or a ``file:`` URI."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


def lock_path_for(database: str | None) -> str | None:
    """The lock file for a SQLite database path; None for an in-memory
    database, a ``file:`` URI or a system without ``flock``."""
    file = database_file(database)
    return None if fcntl is None or file is None else f"{file}{LOCK_SUFFIX}"


class FileWriteLock:
    """An exclusive ``flock`` on ``path``, held by one task at a time.

    Taking it tries without blocking first (the usual case: nobody holds
    it); only a contended lock is waited for, in a thread. A waiter that
    is cancelled gives the lock back as soon as its thread gets it, so a
    cancelled wait never leaves the file locked.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._usable = True  # False once the lock file could not be opened
        self._local = asyncio.Lock()  # one holder in this process; the flock is per descriptor

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        async with self._local:
            fd = self._open()
            if fd is None:  # no lock file (a read-only directory): SQLite's busy handler waits alone
                yield
                return
            await _lock(fd)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int | None:
        if self._fd is None and self._usable:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            except OSError:
                self._usable = False
        return self._fd


async def _lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    waiting = asyncio.get_running_loop().run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
    try:
        await asyncio.shield(waiting)
    except asyncio.CancelledError:
        waiting.add_done_callback(_release_when_taken(fd))
        raise


def _release_when_taken(fd: int) -> Any:
    def release(done: asyncio.Future[None]) -> None:
        if not done.cancelled() and done.exception() is None:
            with contextlib.suppress(OSError):  # closed meanwhile: the lock went with it
                fcntl.flock(fd, fcntl.LOCK_UN)

    return release
