"""Records (apps, datasources, knowledge, flows) in one SQL table.

``SQLRecordStore.from_url("sqlite:///convcore.db")`` or
``SQLRecordStore(async_engine)``; the table is ``<prefix>records``::

    kind        VARCHAR(255)  binary collation
    key_digest  CHAR(64)      SHA-256 of key; PRIMARY KEY (kind, key_digest)
    key         TEXT          binary collation (lists are ordered by it)
    value       TEXT          the record as JSON (LONGTEXT on MySQL)
    updated_at  FLOAT         unix seconds

Keys of any length fit the primary key through the digest (MySQL limits
index length). Binary collations make ``list`` order keys by code point on
every dialect, as the memory store does. The table is created on first use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Column, Float, MetaData, String, Table, Text, delete, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from convcore.errors import ConflictError, InvalidRequestError, StorageError, StorageUnavailableError

__all__ = ["SQLRecordStore"]

Record = dict[str, Any]
MAX_KIND_LENGTH = 255

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
    "mariadb": "mariadb+aiomysql",
}


def _binary_text(length: int | None = None) -> Any:
    base = String(length) if length else Text()
    my = mysql.VARCHAR(length, collation="utf8mb4_bin") if length else mysql.TEXT(collation="utf8mb4_bin")
    return (
        base.with_variant(String(length, collation="C") if length else Text(collation="C"), "postgresql")
        .with_variant(my, "mysql")
        .with_variant(my, "mariadb")
    )


def _table(metadata: MetaData, prefix: str) -> Table:
    long_text = Text().with_variant(mysql.LONGTEXT(), "mysql").with_variant(mysql.LONGTEXT(), "mariadb")
    return Table(
        f"{prefix}records",
        metadata,
        Column("kind", _binary_text(MAX_KIND_LENGTH), primary_key=True),
        Column("key_digest", String(64), primary_key=True),
        Column("key", _binary_text(), nullable=False),
        Column("value", long_text, nullable=False),
        Column("updated_at", Float, nullable=False),
    )


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _is_unique_violation(exc: sa_exc.IntegrityError) -> bool:
    text = str(exc.orig).lower()
    return any(s in text for s in ("unique", "duplicate", "primary key"))


class SQLRecordStore:
    """Records in ``<table_prefix>records`` on an async SQLAlchemy engine.

    An engine passed in is not disposed by :meth:`aclose`; one made by
    :meth:`from_url` is.
    """

    def __init__(self, engine: AsyncEngine, *, table_prefix: str = "convcore_", owned: bool = False) -> None:
        self.engine = engine
        self.metadata = MetaData()
        self.table = _table(self.metadata, table_prefix)
        self._owned = owned
        self._ready = False
        self._ready_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, table_prefix: str = "convcore_", **engine_options: Any) -> SQLRecordStore:
        """A store on its own engine: ``sqlite:///file.db``, ``postgresql://…``,
        ``mysql://…`` or ``mariadb://…`` (the async driver is chosen for you)."""
        scheme, sep, rest = url.partition("://")
        if sep and scheme.lower() in _DRIVERS:
            url = f"{_DRIVERS[scheme.lower()]}://{rest}"
        parsed = make_url(url)
        options: dict[str, Any] = {"pool_pre_ping": True}
        if parsed.get_backend_name() in {"mysql", "mariadb"} and "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        if parsed.get_backend_name() == "sqlite":
            options["connect_args"] = {"timeout": 30}
        options.update(engine_options)
        return cls(create_async_engine(parsed, **options), table_prefix=table_prefix, owned=True)

    # -- the protocol ------------------------------------------------------

    async def put(self, kind: str, key: str, value: Record, *, create_only: bool = False) -> None:
        _check_kind(kind)
        row = {
            "kind": kind,
            "key_digest": _digest(key),
            "key": key,
            "value": json.dumps(value, ensure_ascii=False),
            "updated_at": time.time(),
        }
        async with self._begin() as conn:
            if create_only:
                try:
                    await conn.execute(insert(self.table).values(**row))
                except sa_exc.IntegrityError as exc:
                    if _is_unique_violation(exc):
                        raise ConflictError(f"{kind} {key!r} already exists") from None
                    raise
                return
            await conn.execute(self._upsert(conn.dialect.name, row))

    async def get(self, kind: str, key: str) -> Record | None:
        t = self.table
        async with self._begin() as conn:
            found = await conn.scalar(
                select(t.c.value).where(t.c.kind == kind, t.c.key_digest == _digest(key))
            )
        return _load(found)

    async def list(self, kind: str, *, limit: int = 100, offset: int = 0) -> list[Record]:
        if limit <= 0:
            return []
        t = self.table
        async with self._begin() as conn:
            rows = await conn.execute(
                select(t.c.value)
                .where(t.c.kind == kind)
                .order_by(t.c.key)
                .limit(limit)
                .offset(max(offset, 0))
            )
            values = [r[0] for r in rows]
        return [v for v in map(_load, values) if v is not None]

    async def delete(self, kind: str, key: str) -> Record | None:
        t = self.table
        where = (t.c.kind == kind, t.c.key_digest == _digest(key))
        async with self._begin() as conn:
            query = select(t.c.value).where(*where)
            if conn.dialect.name != "sqlite":
                query = query.with_for_update()
            found = await conn.scalar(query)
            if found is None:
                return None
            gone = await conn.execute(delete(t).where(*where))
            return _load(found) if gone.rowcount else None

    def _upsert(self, dialect: str, row: Record) -> Any:
        changes = {"value": row["value"], "updated_at": row["updated_at"]}
        if dialect in {"mysql", "mariadb"}:
            return mysql.insert(self.table).values(**row).on_duplicate_key_update(**changes)
        if dialect == "postgresql":
            stmt: Any = postgresql.insert(self.table).values(**row)
        elif dialect == "sqlite":
            stmt = sqlite.insert(self.table).values(**row)
        else:
            raise StorageError(f"the record store does not support the {dialect!r} dialect")
        return stmt.on_conflict_do_update(index_elements=["kind", "key_digest"], set_=changes)

    async def aclose(self) -> None:
        if self._owned:
            await self.engine.dispose()

    # -- schema ------------------------------------------------------------

    async def create_tables(self) -> None:
        """Create the table if missing (done on first use anyway)."""
        async with self._ready_lock:
            if self._ready:
                return
            for attempt in range(3):
                try:
                    async with self.engine.begin() as conn:
                        await conn.run_sync(self.metadata.create_all, checkfirst=True)
                    break
                except sa_exc.DBAPIError:
                    # Two processes creating the same table at once: the loser retries and finds it.
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
            self._ready = True

    async def drop_tables(self) -> None:
        """Drop the table (tests, uninstall)."""
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(self.metadata.drop_all, checkfirst=True)
        except sa_exc.DBAPIError as exc:
            raise _storage_error(exc) from exc
        self._ready = False

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        try:
            if not self._ready:
                await self.create_tables()
            async with self.engine.begin() as conn:
                yield conn
        except sa_exc.DBAPIError as exc:
            raise _storage_error(exc) from exc
        except OSError as exc:
            raise StorageUnavailableError(f"the record store cannot be reached: {exc}") from exc


def _check_kind(kind: str) -> None:
    if not kind or len(kind) > MAX_KIND_LENGTH:
        raise InvalidRequestError(f"must be 1 to {MAX_KIND_LENGTH} characters", field="kind")


def _load(value: str | None) -> Record | None:
    if value is None:
        return None
    loaded = json.loads(value)
    return loaded if isinstance(loaded, dict) else None


def _storage_error(exc: sa_exc.DBAPIError) -> StorageError:
    if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError | sa_exc.OperationalError):
        return StorageUnavailableError(f"the record store failed: {type(exc.orig).__name__}")
    return StorageError(f"the record store failed: {type(exc.orig).__name__}: {exc.orig}")
