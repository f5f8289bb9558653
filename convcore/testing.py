"""Fakes for tests of code that uses convcore: a recording, scriptable backend.

Shipped with the core so an application's tests need no server and no
network: wrap the local backend to see every prompt the engine sent, make a
turn fail on purpose, or hold a stream open until the test says go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from .errors import BackendError
from .generation import Generation, GenerationChunk, GenerationRequest
from .local import LocalBackend
from .protocols import ModelBackend

__all__ = ["RecordingBackend"]


class RecordingBackend:
    """Delegates to ``inner`` (the local backend by default) and records.

    ``requests`` holds every GenerationRequest received; ``fail`` (a callable
    taking the request) makes a call raise BackendError when it returns True;
    ``gate``, when set, makes streams wait for it after their first chunk;
    ``closed_streams`` counts streams closed before their last chunk.
    """

    def __init__(
        self,
        inner: ModelBackend | None = None,
        *,
        fail: Callable[[GenerationRequest], bool] | None = None,
    ) -> None:
        self.inner = inner or LocalBackend()
        self.requests: list[GenerationRequest] = []
        self.fail = fail
        self.gate: asyncio.Event | None = None
        self.closed_streams = 0
        self.completed_streams = 0

    def _check(self, request: GenerationRequest) -> None:
        self.requests.append(request)
        if self.fail is not None and self.fail(request):
            raise BackendError("scripted failure")

    @property
    def supported_params(self) -> frozenset[str]:
        """The inner backend's."""
        return frozenset(getattr(self.inner, "supported_params", ()))

    async def complete(self, request: GenerationRequest) -> Generation:
        self._check(request)
        return await self.inner.complete(request)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self._check(request)
        finished = False
        first = True
        inner = self.inner.stream(request)
        try:
            async for chunk in inner:
                yield chunk
                if first and self.gate is not None:
                    first = False
                    await self.gate.wait()
                if chunk.finish_reason is not None:
                    finished = True
        finally:
            await inner.aclose()
            if finished:
                self.completed_streams += 1
            else:
                self.closed_streams += 1

    async def aclose(self) -> None:
        await self.inner.aclose()
