"""The local reference backend, with a tokenizer that shows how far it got."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager

import pytest

from convcore import (
    BackendRateLimitedError,
    BackendUnavailableError,
    Generation,
    GenerationChunk,
    GenerationRequest,
    LocalBackend,
    get_tokenizer,
)
from tests.backends import BackendFactory, Misbehaviour


class CountingTokenizer:
    """Wraps cl100k_base; LocalBackend encodes a reply once, then decodes it
    token by token while streaming, so the decodes show its progress."""

    def __init__(self) -> None:
        self._inner = get_tokenizer("cl100k_base")
        self.reply_tokens = 0  # tokens in the reply most recently encoded
        self.decodes = 0  # decode calls since then

    @property
    def name(self) -> str:
        return self._inner.name

    def encode(self, text: str) -> Sequence[int]:
        tokens = self._inner.encode(text)
        self.reply_tokens, self.decodes = len(tokens), 0
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        self.decodes += 1
        return self._inner.decode(tokens)

    def count(self, text: str) -> int:
        return self._inner.count(text)


class MisbehavingLocal:
    """The local backend, misbehaving as asked (see :class:`Misbehaviour`)."""

    def __init__(self, inner: LocalBackend, faults: Misbehaviour) -> None:
        self.inner = inner
        self.faults = faults

    def _request(self, request: GenerationRequest) -> GenerationRequest:
        if not self.faults.ignore_budget:
            return request
        return request.model_copy(update={"max_new_tokens": 100_000})

    def _check_first(self) -> None:
        if self.faults.fail_before_first_token:
            raise BackendRateLimitedError("the local backend answered 429: scripted rate limit")

    async def complete(self, request: GenerationRequest) -> Generation:
        self._check_first()
        if self.faults.fail_after_tokens is not None:
            raise BackendUnavailableError("the local backend dropped the reply (scripted)")
        return await self.inner.complete(self._request(request))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self._check_first()
        sent = 0
        async with aclosing(self.inner.stream(self._request(request))) as chunks:
            async for chunk in chunks:
                if sent == self.faults.fail_after_tokens:
                    raise BackendUnavailableError("the local backend dropped the reply mid-way (scripted)")
                yield chunk
                sent += 1

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def local_factory() -> AsyncIterator[BackendFactory]:
    tokenizers: list[CountingTokenizer] = []

    def make() -> LocalBackend:
        tokenizers.append(CountingTokenizer())
        # Paced, so a consumer can be cancelled while it waits for the next token.
        return LocalBackend(tokenizer=tokenizers[-1], tokens_per_second=2000, models={"convcore-local"})

    async def assert_stopped_early(request_id: str) -> None:
        # The generator is the generation: once closed, no token follows.
        tok = tokenizers[-1]
        assert 0 < tok.decodes < tok.reply_tokens, (tok.decodes, tok.reply_tokens)

    yield BackendFactory(
        name="local",
        make=make,
        model="convcore-local",
        slow_model="convcore-local",
        assert_stopped_early=assert_stopped_early,
        misbehaving=lambda faults: MisbehavingLocal(make(), faults),
        unknown_model="no-such-model",
    )


FACTORY_PARAMS = [pytest.param(local_factory, id="local")]
