"""SQL storage for convcore: SQLite, PostgreSQL and MySQL/MariaDB via sqlmodel
on SQLAlchemy's asyncio (aiosqlite, asyncpg, aiomysql).

``SQLStore.from_url("sqlite:///convcore.db")`` or ``SQLStore(async_engine)``;
see README.md for the tables, the locking on each dialect and upgrades.
"""

from .schema import SCHEMA_VERSION
from .store import SQLStore

__all__ = ["SCHEMA_VERSION", "SQLStore"]
