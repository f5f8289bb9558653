"""The in-memory reference store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from convcore import open_store
from tests.stores import StoreFactory


@asynccontextmanager
async def memory_factory() -> AsyncIterator[StoreFactory]:
    # One process's memory is one namespace: every make() shares one storage,
    # and another storage object is another namespace.
    store = open_store("memory://")
    other = open_store("memory://")

    async def cleanup() -> None:
        return None

    yield StoreFactory(
        name="memory", make=lambda: store, make_other=lambda: other, cleanup=cleanup, url="memory://"
    )


FACTORY_PARAMS = [pytest.param(memory_factory, id="memory")]
