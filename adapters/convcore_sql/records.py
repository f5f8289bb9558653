"""The records facet of :class:`~convcore_sql.SQLStore`: the chat modes'
apps, datasources, knowledge and flows in ``<table_prefix>records``.

It runs on the store's engine and through the store's ``_run``: the same
pool, schema bootstrap (the table and its owner columns are part of the
versioned schema, see schema.py), retries and error mapping as the
conversations. Lists are ordered by key in code-point order on every
dialect (binary collations); an owner filter compares ``user_name`` /
``sys_code`` exactly (binary, NO PAD on MySQL/MariaDB) through an index on
(kind, owner).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects import mysql, postgresql, sqlite

from convcore.errors import ConflictError, InvalidRequestError, StorageError
from convcore.records import Record, record_owner

from .errors import is_unique_violation
from .tables import MAX_KIND_LENGTH, digest

if TYPE_CHECKING:
    from .store import SQLStore

__all__ = ["SQLRecords"]


class SQLRecords:
    """A :class:`~convcore.RecordStore` on a :class:`SQLStore`'s engine.

    :meth:`aclose` releases nothing: the store owns the engine.
    """

    def __init__(self, store: SQLStore) -> None:
        self._store = store
        self._table = store.tables.records

    async def put(self, kind: str, key: str, value: Record, *, create_only: bool = False) -> None:
        _check_kind(kind)
        user_name, sys_code = record_owner(value)
        row = {
            "kind": kind,
            "key_digest": digest(key),
            "key": key,
            "value": json.dumps(value, ensure_ascii=False),
            "updated_at": time.time(),
            "user_name": user_name,
            "sys_code": sys_code,
        }

        async def op() -> None:
            async with self._store._writer.begin() as conn:
                if not create_only:
                    await conn.execute(self._upsert(conn.dialect.name, row))
                    return
                try:
                    await conn.execute(insert(self._table).values(**row))
                except Exception as exc:
                    if is_unique_violation(exc):
                        raise ConflictError(f"{kind} {key!r} already exists") from None
                    raise

        await self._store._run("storing a record", op)

    async def get(self, kind: str, key: str) -> Record | None:
        t = self._table
        query = select(t.c.value).where(t.c.kind == kind, t.c.key_digest == digest(key))

        async def op() -> Record | None:
            async with self._store._reader.connect() as conn:
                return _load(await conn.scalar(query))

        return await self._store._run("reading a record", op)

    async def list(
        self,
        kind: str,
        *,
        limit: int = 100,
        offset: int = 0,
        user_name: str | None = None,
        sys_code: str | None = None,
    ) -> list[Record]:
        if limit <= 0:
            return []
        t = self._table
        query = select(t.c.value).where(t.c.kind == kind)
        if user_name is not None:
            query = query.where(t.c.user_name == user_name)
        if sys_code is not None:
            query = query.where(t.c.sys_code == sys_code)
        query = query.order_by(t.c.key).limit(limit).offset(max(offset, 0))

        async def op() -> list[Record]:
            async with self._store._reader.connect() as conn:
                values = [row[0] for row in await conn.execute(query)]
            return [r for r in map(_load, values) if r is not None]

        return await self._store._run("listing records", op)

    async def delete(self, kind: str, key: str) -> Record | None:
        t = self._table
        where = (t.c.kind == kind, t.c.key_digest == digest(key))

        async def op() -> Record | None:
            async with self._store._writer.begin() as conn:
                query = select(t.c.value).where(*where)
                if conn.dialect.name != "sqlite":  # SQLite's writers hold the database lock
                    query = query.with_for_update()
                found = await conn.scalar(query)
                if found is None:
                    return None
                gone = await conn.execute(delete(t).where(*where))
                return _load(found) if gone.rowcount else None

        return await self._store._run("deleting a record", op)

    async def aclose(self) -> None:
        """Nothing to release: the store owns the engine."""
        return None

    def _upsert(self, dialect: str, row: Record) -> Any:
        changes = {k: row[k] for k in ("value", "updated_at", "user_name", "sys_code")}
        if dialect in {"mysql", "mariadb"}:
            return mysql.insert(self._table).values(**row).on_duplicate_key_update(**changes)
        if dialect == "postgresql":
            stmt: Any = postgresql.insert(self._table).values(**row)
        elif dialect == "sqlite":
            stmt = sqlite.insert(self._table).values(**row)
        else:
            raise StorageError(f"records do not support the {dialect!r} dialect")
        return stmt.on_conflict_do_update(index_elements=["kind", "key_digest"], set_=changes)


def _check_kind(kind: str) -> None:
    if not kind or len(kind) > MAX_KIND_LENGTH:
        raise InvalidRequestError(f"must be 1 to {MAX_KIND_LENGTH} characters", field="kind")


def _load(value: str | None) -> Record | None:
    if value is None:
        return None
    loaded = json.loads(value)
    return loaded if isinstance(loaded, dict) else None
