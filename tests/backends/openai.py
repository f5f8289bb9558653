"""The OpenAI-compatible backend against the fake upstream on loopback."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.backends import BackendFactory, Misbehaviour
from tests.backends.fake_upstream import get_upstream


@asynccontextmanager
async def openai_factory() -> AsyncIterator[BackendFactory]:
    from convcore_openai import OpenAIBackend

    upstream = get_upstream()

    async def assert_stopped_early(request_id: str) -> None:
        ex = await upstream.wait_for(request_id, disconnected=True)
        assert ex.sent < ex.total and not ex.finished, ex

    def misbehaving(faults: Misbehaviour) -> OpenAIBackend:
        # Paced, so a stream stopped at the budget is seen to stop upstream.
        directives = [f"id={uuid.uuid4().hex}", "delay=0.002"]
        if faults.ignore_budget:
            directives.append("ignore_budget=1")
        if faults.fail_before_first_token:
            directives.append("fail=429")
        if faults.fail_after_tokens is not None:
            directives.append(f"drop={faults.fail_after_tokens}")
        return OpenAIBackend(
            upstream.base_url,
            api_key="sk-test",
            timeout=10,
            backoff=0.01,
            max_retries=1,
            headers={"X-Fake": ";".join(directives)},
        )

    yield BackendFactory(
        name="openai",
        make=lambda: OpenAIBackend(upstream.base_url, api_key="sk-test", timeout=10, backoff=0.01),
        model="echo",
        slow_model="echo;delay=0.02",
        assert_stopped_early=assert_stopped_early,
        misbehaving=misbehaving,
        unknown_model="no-such-model",
    )


FACTORY_PARAMS = [pytest.param(openai_factory, id="openai")]
