"""Store URLs to async SQLAlchemy URLs and engine options.

``sqlite:///path.db``, ``postgresql://…`` (or ``postgres://``), ``mysql://…``
and ``mariadb://…`` get their async driver (aiosqlite, asyncpg, aiomysql);
a URL that names its driver (``postgresql+asyncpg://``) is kept as it is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import AsyncAdaptedQueuePool

from convcore.errors import InvalidRequestError

__all__ = ["STORE_OPTIONS", "driver_url", "engine_options", "to_async_url"]

# Query parameters the store reads itself; the driver never sees them.
STORE_OPTIONS = ("table_prefix", "group_commit")

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
    "mariadb": "mariadb+aiomysql",
}


def to_async_url(url: str | URL) -> URL:
    """``url`` with an async driver chosen when it names none."""
    try:
        if isinstance(url, str):
            scheme, sep, rest = url.partition("://")
            if sep and scheme.lower() in _DRIVERS:
                url = f"{_DRIVERS[scheme.lower()]}://{rest}"
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InvalidRequestError(f"not a database URL: {exc}", field="store_url") from exc
    if parsed.get_backend_name() in {"mysql", "mariadb"} and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


def driver_url(url: str | URL) -> URL:
    """``to_async_url(url)`` without the store's own options: what a plain
    SQLAlchemy engine on the same database is given."""
    return to_async_url(url).difference_update_query(STORE_OPTIONS)


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


# Connections a file SQLite database or a PostgreSQL server keeps open: as
# many as SQLAlchemy's default pool may hold at its peak (5 + 10 overflow).
FIXED_POOL_SIZE = 16


def engine_options(url: URL, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults for ``create_async_engine``, overridden by ``given``."""
    backend = url.get_backend_name()
    # No ping on checkout (a round trip per operation): a pooled connection
    # the server dropped fails its first statement, SQLAlchemy invalidates
    # it, and the store reruns the whole operation on a fresh one.
    options: dict[str, Any] = {"pool_pre_ping": False}
    if backend in {"mysql", "mariadb"}:
        # No gap locks: fewer deadlocks between appends creating conversations.
        options["isolation_level"] = "READ COMMITTED"
    if backend == "sqlite" and is_memory_sqlite(url):
        # Each connection to :memory: is a database of its own: keep one.
        options.update(poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
    elif backend in {"sqlite", "postgresql"}:
        # A connection opened past the pool's size is closed when it is
        # returned, and under load it is opened again at once. On SQLite
        # each one is a thread, a file to open and a schema to parse; on
        # PostgreSQL a connect, an authentication and asyncpg's statement
        # cache starting cold (every statement prepared again). That churn
        # cost more than the turns: a fixed pool is kept instead, and callers
        # past it wait for a connection. (MySQL/MariaDB measured no gain.)
        options.update(poolclass=AsyncAdaptedQueuePool, pool_size=FIXED_POOL_SIZE, max_overflow=0)
    options.update(given)
    return options
