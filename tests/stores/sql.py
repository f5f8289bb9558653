"""SQL stores: a SQLite file (WAL), PostgreSQL and MariaDB on loopback.

Each factory owns a fresh namespace: its own SQLite file, or on the shared
servers tables under a unique ``cct_<hex>_`` prefix in database ``test``,
dropped by ``cleanup()``. ``make()`` opens a new storage (its own engine)
on those tables each time, from any thread or event loop, through
``open_store`` with the prefix in the URL (``?table_prefix=``).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from convcore import Storage, open_store
from tests.stores import StoreFactory, unavailable

PG_URL = os.environ.get("CONVCORE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("CONVCORE_TEST_MARIADB_URL", "mariadb://root@127.0.0.1:3306/test")
# Small pools: the contract suite opens several stores at once on shared servers.
POOL = {"pool_size": 5, "max_overflow": 5}


def new_prefix() -> str:
    return f"cct_{uuid.uuid4().hex[:10]}_"


def with_table_prefix(url: str, prefix: str) -> str:
    """``url`` naming the table prefix, so ``open_store(url)`` lands in the namespace."""
    return f"{url}{'&' if '?' in url else '?'}table_prefix={prefix}"


async def drop_namespace(url: str) -> None:
    """Drop the tables of the namespace ``url`` names (tests and teardown)."""
    store = open_store(url)
    try:
        await store.drop_tables()  # type: ignore[attr-defined]
    finally:
        await store.aclose()


def reachable(url: str) -> bool:
    from sqlalchemy.engine import make_url

    parsed = make_url(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 0), timeout=1.0):
            return True
    except OSError:
        return False


def server_factory(name: str, url: str, **options: Any) -> Any:
    @asynccontextmanager
    async def factory() -> AsyncIterator[StoreFactory]:
        if not reachable(url):
            unavailable(f"{name} is not reachable at {url}")
        prefix = new_prefix()
        opts = {**POOL, **options}
        mine, other = with_table_prefix(url, prefix), with_table_prefix(url, new_prefix())

        async def cleanup() -> None:
            for namespace in (mine, other):
                await drop_namespace(namespace)

        yield StoreFactory(
            name=name,
            make=lambda: open_store(mine, **opts),
            make_other=lambda: open_store(other, **opts),
            cleanup=cleanup,
            cross_process=True,
            url=mine,
            extra={"table_prefix": prefix},
        )

    return factory


@asynccontextmanager
async def sqlite_factory() -> AsyncIterator[StoreFactory]:
    directory = tempfile.mkdtemp(prefix="convcore-sql-")
    base = f"sqlite:///{directory}/store.db"
    prefix = "cct_"
    url = with_table_prefix(base, prefix)

    def make() -> Storage:
        return open_store(url)

    async def cleanup() -> None:
        shutil.rmtree(directory, ignore_errors=True)

    yield StoreFactory(
        name="sqlite",
        make=make,
        make_other=lambda: open_store(with_table_prefix(base, "cct_other_")),
        cleanup=cleanup,
        cross_process=True,
        url=url,
        extra={"table_prefix": prefix},
    )


postgres_factory = server_factory("postgresql", PG_URL)
mariadb_factory = server_factory("mariadb", MARIADB_URL)

FACTORY_PARAMS = [
    pytest.param(sqlite_factory, id="sqlite"),
    pytest.param(postgres_factory, id="postgresql", marks=pytest.mark.postgres),
    pytest.param(mariadb_factory, id="mariadb", marks=pytest.mark.mysql),
]
