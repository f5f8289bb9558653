"""A deterministic model for demos, tests and benchmarks.

It answers from what it is shown, so a reply proves which history reached
it: the newest input is echoed (with the kinds of any image, audio or file
parts it carries) and the earlier user messages are counted and the first
one quoted. Asked for a summary (compaction), it lists the messages it was
given by seq, so a summary proves what it covers. Latency and token rate
are configurable; streaming yields real tokens of the reply one by one.

Of OpenAI's parameters it honours ``stop`` (the reply ends before the first
stop sequence), ``seed`` (every reply is reproducible, whatever the seed)
and ``response_format`` of type ``text`` or ``json_object`` (the reply is
then the JSON object ``{"reply": ...}``); the engine refuses the others.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Collection
from typing import Any

from .errors import BackendError
from .generation import Generation, GenerationChunk, GenerationRequest, PromptMessage
from .models import trusted
from .protocols import Tokenizer
from .tokens import get_tokenizer

__all__ = ["LocalBackend", "echo_reply", "echo_summary", "shape_reply"]

ReplyFn = Callable[[tuple[PromptMessage, ...]], str]


def echo_reply(messages: tuple[PromptMessage, ...]) -> str:
    """``You said: <last input>`` plus what the model saw before it."""
    users = [m.content for m in messages if m.role == "user"]
    last = messages[-1].content
    media = [p.type for p in messages[-1].parts or () if p.type != "text"]
    if media:
        last = f"{last} [{', '.join(media)}]"
    earlier = users[:-1] if messages[-1].role == "user" else users
    if not earlier:
        return f"You said: {last}"
    return f"You said: {last} (earlier user messages: {len(earlier)}; first: {earlier[0]!r})"


def echo_summary(messages: tuple[PromptMessage, ...]) -> str:
    """``Messages a-b. <previous summary> [seq] role: first words | ...``: the
    summariser input's own lines, each message cut to a few words."""
    lines = messages[-1].content.splitlines()
    out = [lines[0]] if lines else []
    for line in lines[1:]:
        if line.startswith("Summary of messages"):
            previous = line.split(": ", 1)[-1]
            out.append(previous.split(" | ", 1)[-1] if " | " in previous else previous)
        elif line.startswith("["):
            out.append(" ".join(line.split()[:5]))
    return " | ".join(out)


class LocalBackend:
    """Replies computed locally by ``reply`` (``echo_reply`` by default).

    ``latency`` seconds pass before the first token; ``tokens_per_second``
    paces the rest (0 means as fast as possible). A reply longer than
    ``max_new_tokens`` is cut there with finish_reason ``length``. With
    ``models`` given, a request for any other model name is a BackendError,
    as a real server's unknown-model answer would be.
    """

    supported_params = frozenset({"stop", "seed", "response_format:text", "response_format:json_object"})

    def __init__(
        self,
        *,
        reply: ReplyFn = echo_reply,
        latency: float = 0.0,
        tokens_per_second: float = 0.0,
        tokenizer: Tokenizer | None = None,
        models: Collection[str] | None = None,
    ) -> None:
        self._models = None if models is None else frozenset(models)
        self._reply = reply
        self._latency = latency
        self._tps = tokens_per_second
        self._tokenizer = tokenizer or get_tokenizer()

    def _text(self, request: GenerationRequest) -> str:
        if self._models is not None and request.model not in self._models:
            raise BackendError(f"the local backend does not serve model {request.model!r}")
        if request.purpose == "summary":
            return echo_summary(request.messages)
        return shape_reply(self._reply(request.messages), request.params)

    def _tokens(self, request: GenerationRequest) -> tuple[list[int], bool]:
        tokens = list(self._tokenizer.encode(self._text(request)))
        cut = len(tokens) > request.max_new_tokens
        return tokens[: request.max_new_tokens], cut

    async def complete(self, request: GenerationRequest) -> Generation:
        if self._tps <= 0:
            text = self._text(request)
            if len(text.encode()) <= request.max_new_tokens:
                # Within the budget however it tokenizes (a token holds at least
                # a byte), and not paced: no need to tokenize it here (the
                # engine counts a reply once, as it stores it).
                if self._latency > 0:
                    await asyncio.sleep(self._latency)
                return trusted(Generation, content=text)
        tokens, cut = self._tokens(request)
        delay = self._latency + (len(tokens) / self._tps if self._tps > 0 else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        return trusted(
            Generation,
            content=self._tokenizer.decode(tokens),
            finish_reason="length" if cut else "stop",
            completion_tokens=len(tokens),
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        tokens, cut = self._tokens(request)
        if self._latency > 0:
            await asyncio.sleep(self._latency)
        pending: list[int] = []
        for tok in tokens:
            if self._tps > 0:
                await asyncio.sleep(1 / self._tps)
            pending.append(tok)
            text = self._tokenizer.decode(pending)
            if text.endswith("\ufffd"):
                continue  # a multi-byte character continues in the next token
            pending.clear()
            yield GenerationChunk(content=text)
        tail = self._tokenizer.decode(pending) if pending else ""
        yield GenerationChunk(
            content=tail,
            finish_reason="length" if cut else "stop",
            completion_tokens=len(tokens),
        )

    async def aclose(self) -> None:
        return None


def shape_reply(reply: str, params: dict[str, Any]) -> str:
    """The reply as ``response_format`` and ``stop`` ask for it."""
    if (params.get("response_format") or {}).get("type") == "json_object":
        reply = json.dumps({"reply": reply}, ensure_ascii=False)
    stop = params.get("stop")
    for seq in [stop] if isinstance(stop, str) else stop or ():
        if seq and seq in reply:
            reply = reply[: reply.index(seq)]
    return reply
