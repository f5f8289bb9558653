"""Fakes for tests of code that uses convcore: a recording backend and a scripted one.

Shipped with the core so an application's tests need no server and no
network: wrap the local backend to see every prompt the engine sent, make a
turn fail on purpose, hold a stream open until the test says go, or script
the replies a model gives (tool calls included) turn by turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from .errors import BackendError
from .generation import Generation, GenerationChunk, GenerationRequest
from .local import LocalBackend
from .models import FunctionCall, ToolCall
from .protocols import ModelBackend

__all__ = ["RecordingBackend", "ScriptedBackend"]


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


class ScriptedBackend:
    """Answers each request with the next reply of ``replies``: a string, a
    :class:`Generation`, or a list of ``(name, arguments)`` pairs meaning
    "call these tools" (ids ``call_<n>``, numbered across the script).
    ``requests`` records what was asked; running out of replies is a
    BackendError. Streams send the text in one piece, then the last chunk.
    """

    def __init__(self, replies: list[str | Generation | list[tuple[str, str]]] | None = None) -> None:
        self.replies = list(replies or [])
        self.requests: list[GenerationRequest] = []
        self._calls = 0

    def add(self, *replies: str | Generation | list[tuple[str, str]]) -> None:
        self.replies.extend(replies)

    def _next(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        if not self.replies:
            raise BackendError("the scripted backend has no reply left")
        reply = self.replies.pop(0)
        if isinstance(reply, Generation):
            return reply
        if isinstance(reply, str):
            return Generation(content=reply)
        calls = []
        for name, arguments in reply:
            self._calls += 1
            calls.append(
                ToolCall(id=f"call_{self._calls}", function=FunctionCall(name=name, arguments=arguments))
            )
        return Generation(content="", finish_reason="tool_calls", tool_calls=tuple(calls))

    async def complete(self, request: GenerationRequest) -> Generation:
        return self._next(request)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        gen = self._next(request)
        if gen.content:
            yield GenerationChunk(content=gen.content)
        yield GenerationChunk(
            finish_reason=gen.finish_reason,
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            tool_calls=gen.tool_calls,
        )

    async def aclose(self) -> None:
        return None
