from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from convcore import ModelBackend
from tests.backends import BackendFactory, all_factory_params


@pytest.fixture(params=all_factory_params())
async def backend_factory(request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    """Every model backend the project has."""
    opener: Callable[[], AbstractAsyncContextManager[BackendFactory]] = request.param
    async with opener() as factory:
        yield factory


@pytest.fixture
async def backend(backend_factory: BackendFactory) -> AsyncIterator[ModelBackend]:
    b = backend_factory.make()
    try:
        yield b
    finally:
        await b.aclose()
