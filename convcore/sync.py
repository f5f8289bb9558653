"""A blocking twin of :class:`~convcore.engine.Engine` for code without a loop.

The engine runs on a private event loop in a daemon thread; every call is
submitted to it, so any number of threads can share one ``SyncEngine`` and
their turns are as safe as concurrent tasks are.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from .engine import Engine
from .errors import ConvcoreError
from .models import Conversation, Message
from .schema import ChatCompletion, ChatCompletionChunk, ChatRequest

__all__ = ["SyncEngine"]

T = TypeVar("T")


class SyncEngine:
    """Blocking calls onto an :class:`Engine` built on the private loop.

    ``factory`` builds the engine inside the loop (stores and clients bind
    to the loop that creates them). ``close()`` closes the engine and stops
    the loop.
    """

    def __init__(self, factory: Callable[[], Engine | Awaitable[Engine]]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="convcore-sync", daemon=True)
        self._thread.start()

        async def build() -> Engine:
            made = factory()
            return await made if isinstance(made, Awaitable) else made

        try:
            self.engine: Engine = self._run(build())
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Awaitable[T]) -> T:
        if self._loop.is_closed():
            if asyncio.iscoroutine(coro):
                coro.close()  # never scheduled: do not leave it un-awaited
            raise ConvcoreError("this SyncEngine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def chat(self, request: ChatRequest | dict[str, Any]) -> ChatCompletion:
        return self._run(self.engine.chat(request))

    def chat_stream(self, request: ChatRequest | dict[str, Any]) -> Iterator[ChatCompletionChunk]:
        """Chunks as they come; leaving the loop early abandons the stream."""
        stream = self._run(self.engine.open_stream(request))
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())

    def get_conversation(self, conv_uid: str, **owner: Any) -> Conversation:
        return self._run(self.engine.get_conversation(conv_uid, **owner))

    def read_messages(self, conv_uid: str, **kwargs: Any) -> list[Message]:
        return self._run(self.engine.read_messages(conv_uid, **kwargs))

    def list_conversations(self, **kwargs: Any) -> list[Conversation]:
        return self._run(self.engine.list_conversations(**kwargs))

    def fork(self, conv_uid: str, up_to_seq: int, **kwargs: Any) -> Conversation:
        return self._run(self.engine.fork(conv_uid, up_to_seq, **kwargs))

    def delete_conversation(self, conv_uid: str, **owner: Any) -> bool:
        return self._run(self.engine.delete_conversation(conv_uid, **owner))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.engine.aclose())
        finally:
            self._stop()

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
