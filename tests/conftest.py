from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

import pytest

from convcore import ConversationStore
from tests.stores import StoreFactory, all_factory_params


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def collector_unfrozen() -> Iterator[None]:
    """A test that starts the service in this process lets it freeze the
    objects alive then (as ``convcore serve`` does): thaw them after, so no
    later test finds objects the collector, or ``gc.get_objects()``, skips."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


@pytest.fixture(params=all_factory_params())
async def store_factory(
    request: pytest.FixtureRequest,
) -> AsyncIterator[StoreFactory]:
    """Every store the project has, each on a fresh namespace."""
    opener: Callable[[], AbstractAsyncContextManager[StoreFactory]] = request.param
    async with opener() as factory:
        try:
            yield factory
        finally:
            await factory.cleanup()


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[ConversationStore]:
    s = store_factory.make()
    try:
        yield s
    finally:
        await s.aclose()
