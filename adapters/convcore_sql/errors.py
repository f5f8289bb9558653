"""Driver errors sorted at the edge: retry, unavailable, or a plain failure.

Every operation of the store is idempotent as a whole (an append is keyed by
its turn_id), so contention (deadlock, serialization failure, lock timeout,
SQLite busy, a unique key taken by a racing writer) and a lost connection
are both retried from the top; what is left when retries run out becomes a
:class:`~convcore.errors.StorageError` or ``StorageUnavailableError``,
chained to the driver's error.
"""

from __future__ import annotations

import enum
import sqlite3

from sqlalchemy import exc as sa_exc

from convcore.errors import StorageError, StorageUnavailableError

__all__ = ["Kind", "classify", "is_unique_violation", "to_storage_error"]


class Kind(enum.Enum):
    CONTENTION = "contention"  # retry: another writer got in the way
    UNAVAILABLE = "unavailable"  # retry: the connection failed or was refused
    FATAL = "fatal"  # do not retry


# PostgreSQL SQLSTATEs: serialization_failure, deadlock_detected,
# unique_violation, lock_not_available.
_PG_CONTENTION = {"40001", "40P01", "23505", "55P03"}
# admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
# and the 08 class (connection exceptions).
_PG_UNAVAILABLE = {"57P01", "57P02", "57P03", "53300"}
# MySQL/MariaDB: deadlock, lock wait timeout, duplicate key.
_MY_CONTENTION = {1213, 1205, 1062}
# Client errors: can't connect, server gone away, lost connection, ...
_MY_UNAVAILABLE = {2002, 2003, 2005, 2006, 2013, 2055, 1040, 1053, 1077, 1927}  # 1040: too many connections
_SQLITE_BUSY_LOCKED = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_SQLITE_UNIQUE = {sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY, sqlite3.SQLITE_CONSTRAINT_UNIQUE}


def _root(exc: BaseException) -> BaseException:
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def classify(exc: BaseException) -> Kind:
    """What to do about ``exc``, raised by SQLAlchemy or a driver."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return Kind.UNAVAILABLE
    orig = _root(exc)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str):
        if sqlstate in _PG_CONTENTION:
            return Kind.CONTENTION
        if sqlstate in _PG_UNAVAILABLE or sqlstate.startswith("08"):
            return Kind.UNAVAILABLE
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        if code & 0xFF in _SQLITE_BUSY_LOCKED or code in _SQLITE_UNIQUE:
            return Kind.CONTENTION
        if code & 0xFF == sqlite3.SQLITE_CANTOPEN:
            return Kind.UNAVAILABLE
        return Kind.FATAL
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        if args[0] in _MY_CONTENTION:
            return Kind.CONTENTION
        if args[0] in _MY_UNAVAILABLE:
            return Kind.UNAVAILABLE
    if isinstance(orig, OSError | TimeoutError | ConnectionError):
        return Kind.UNAVAILABLE
    if isinstance(exc, sa_exc.InterfaceError | sa_exc.DisconnectionError):
        return Kind.UNAVAILABLE
    # asyncpg's own connection errors, when they escape SQLAlchemy's wrapping.
    if type(orig).__module__.startswith("asyncpg") and "Connection" in type(orig).__name__:
        return Kind.UNAVAILABLE
    return Kind.FATAL


def is_unique_violation(exc: BaseException) -> bool:
    """A write refused because its primary or unique key is taken."""
    orig = _root(exc)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # MySQL/MariaDB (their SQLSTATE is a class, 23000)
        return args[0] == 1062
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code in _SQLITE_UNIQUE
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return sqlstate == "23505"


def is_driver_error(exc: BaseException) -> bool:
    """Errors this adapter maps; anything else (a bug, cancellation) passes."""
    return isinstance(exc, sa_exc.SQLAlchemyError | OSError | TimeoutError) or (
        type(exc).__module__.split(".")[0] in {"asyncpg", "aiomysql", "pymysql", "aiosqlite", "sqlite3"}
    )


def to_storage_error(exc: BaseException, what: str, attempts: int = 1) -> StorageError:
    """The convcore error for ``exc``; the caller raises it ``from exc``."""
    kind = classify(exc)
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    detail = f"{type(_root(exc)).__name__}: {_root(exc)}".strip()
    if kind is Kind.UNAVAILABLE:
        return StorageUnavailableError(f"SQL store unreachable during {what}{tried}: {detail}")
    if kind is Kind.CONTENTION:
        return StorageError(f"SQL store: {what} kept colliding with other writers{tried}: {detail}")
    return StorageError(f"SQL store failed during {what}: {detail}")
