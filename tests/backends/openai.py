"""The OpenAI-compatible backend against the fake upstream on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.backends import BackendFactory
from tests.backends.fake_upstream import get_upstream


@asynccontextmanager
async def openai_factory() -> AsyncIterator[BackendFactory]:
    from convcore_openai import OpenAIBackend

    upstream = get_upstream()

    async def assert_stopped_early(request_id: str) -> None:
        ex = await upstream.wait_for(request_id, disconnected=True)
        assert ex.sent < ex.total and not ex.finished, ex

    yield BackendFactory(
        name="openai",
        make=lambda: OpenAIBackend(upstream.base_url, api_key="sk-test", timeout=10, backoff=0.01),
        model="echo",
        slow_model="echo;delay=0.02",
        assert_stopped_early=assert_stopped_early,
        unknown_model="no-such-model",
    )


FACTORY_PARAMS = [pytest.param(openai_factory, id="openai")]
