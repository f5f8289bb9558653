"""The in-memory reference store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from convcore import MemoryStore
from tests.stores import StoreFactory


@asynccontextmanager
async def memory_factory() -> AsyncIterator[StoreFactory]:
    store = MemoryStore()

    async def cleanup() -> None:
        return None

    yield StoreFactory(name="memory", make=lambda: store, cleanup=cleanup, url="memory://")


FACTORY_PARAMS = [pytest.param(memory_factory, id="memory")]
