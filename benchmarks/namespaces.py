"""Isolation on shared servers: one run's keys and tables, and their removal.

Every run gets an id; its Redis keys live under ``ccbench:<id>`` and its SQL
tables are named ``ccb_<id>_…``, for the store under test (through the
store's prefix option, when it has one) and for the floors alike. Cleanup
deletes exactly those: Redis keys by SCAN of the prefix (never FLUSHALL),
SQL tables by name prefix. Nothing here restarts or reconfigures a server.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

__all__ = ["Namespace", "async_sql_url", "namespaced_url", "redis_client", "scheme_of"]

# The URL parameter each kind of store reads its namespace from.
_PREFIX_PARAM = {"redis": "prefix", "sql": "table_prefix"}


def scheme_of(url: str) -> str:
    """``memory``, ``redis`` or ``sql`` for a store URL."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        return "memory"
    if scheme.startswith("redis") or scheme.startswith("rediss"):
        return "redis"
    return "sql"


def async_sql_url(url: str) -> str:
    """The SQLAlchemy async URL for a convcore SQL store URL (the SQL store's own mapping)."""
    from convcore_sql.urls import driver_url

    return driver_url(url).render_as_string(hide_password=False)


def redis_client(url: str) -> Any:
    """A redis-py asyncio client (a cluster client for ``redis+cluster://``)."""
    import redis.asyncio as aioredis

    scheme, rest = url.split("://", 1)
    if scheme.endswith("+cluster"):
        base = scheme.split("+", 1)[0]
        return aioredis.RedisCluster.from_url(f"{base}://{rest}")
    return aioredis.Redis.from_url(url)


def namespaced_url(url: str, namespace: Namespace) -> tuple[str, dict[str, Any]]:
    """``url`` carrying the run's prefix (``?prefix=`` for Redis, ``?table_prefix=``
    for SQL), so the store opened on it, in this process or in ``convcore
    serve``, keeps all its data there; and that setting, for the report."""
    kind = scheme_of(url)
    if kind not in _PREFIX_PARAM:
        return url, {}
    name = _PREFIX_PARAM[kind]
    value = namespace.redis_prefix if kind == "redis" else namespace.sql_prefix
    # Appended as text (urlunsplit would drop a slash of sqlite:////abs/path);
    # the stores read the last value of a repeated parameter.
    return f"{url}{'&' if '?' in url else '?'}{urlencode({name: value}, safe=':')}", {name: value}


@dataclass
class Namespace:
    """One run's isolation: prefixes, and the cleanup of what was created."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def redis_prefix(self) -> str:
        return f"ccbench:{self.run_id}"

    @property
    def sql_prefix(self) -> str:
        return f"ccb_{self.run_id}_"

    async def cleanup(self, store_url: str) -> dict[str, int]:
        """Delete this run's keys or tables on ``store_url``'s server; the counts removed."""
        kind = scheme_of(store_url)
        if kind == "redis":
            return {"redis_keys": await self._cleanup_redis(store_url)}
        if kind == "sql":
            return {"sql_tables": await self._cleanup_sql(store_url)}
        return {}

    async def _cleanup_redis(self, url: str) -> int:
        client = redis_client(url)
        removed = 0
        try:
            batch: list[Any] = []
            async for key in client.scan_iter(match=f"{self.redis_prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += await _unlink(client, batch)
                    batch = []
            if batch:
                removed += await _unlink(client, batch)
        finally:
            await client.aclose()
        return removed

    async def _cleanup_sql(self, url: str) -> int:
        from sqlalchemy import MetaData
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(async_sql_url(url))
        try:
            async with engine.begin() as conn:

                def drop(sync_conn: Any) -> int:
                    meta = MetaData()
                    meta.reflect(sync_conn, only=lambda name, _: name.startswith(self.sql_prefix))
                    meta.drop_all(sync_conn)
                    return len(meta.tables)

                dropped: int = await conn.run_sync(drop)
                return dropped
        finally:
            await engine.dispose()


async def _unlink(client: Any, keys: list[Any]) -> int:
    # One key per call keeps a cluster happy (keys of a batch span slots).
    if hasattr(client, "get_nodes"):
        n = 0
        for key in keys:
            n += await client.unlink(key)
        return n
    result: int = await client.unlink(*keys)
    return result


async def server_version(store_url: str) -> str | None:
    """The server's version string, for the run's environment record."""
    kind = scheme_of(store_url)
    try:
        if kind == "redis":
            client = redis_client(store_url)
            try:
                info = await client.info("server")
            finally:
                await client.aclose()
            if isinstance(info, dict) and "redis_version" in info:
                return f"redis {info['redis_version']}"
            return None
        if kind == "sql":
            from sqlalchemy import text
            from sqlalchemy.ext.asyncio import create_async_engine

            engine = create_async_engine(async_sql_url(store_url))
            try:
                async with engine.connect() as conn:
                    query = (
                        "select sqlite_version()" if store_url.startswith("sqlite") else "select version()"
                    )
                    return str((await conn.execute(text(query))).scalar())
            finally:
                await engine.dispose()
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"
    return None
