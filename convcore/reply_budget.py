"""The reply budget, enforced by the engine whatever the backend does.

A backend is asked for at most ``max_new_tokens``, but some ignore the limit,
count differently or are misconfigured. So the engine counts the reply itself,
in the model's encoding, as its text arrives: a stream is closed at the budget
(which closes its upstream request), a whole reply is cut there, and the reply
stored and returned never holds more tokens than the budget; a cut reply
finishes with ``length``. Text a chat mode adds to the reply counts too.

Counting is exact and incremental: tiktoken encodes each piece of its
pre-tokenizer split on its own, so only the last pieces can change as text
arrives; the meter keeps the count of the settled pieces and encodes only the
rest again.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing

from .generation import Generation, GenerationChunk
from .models import trusted, trusted_copy
from .protocols import Tokenizer

__all__ = ["ReplyMeter", "metered_generation", "metered_stream", "settle_reply"]


class ReplyMeter:
    """One reply's text and exact token count, cut at ``budget`` tokens.

    ``feed`` takes the text as it arrives and returns the part that fits;
    once something did not fit, ``cut`` is True and nothing more is taken.
    ``text`` is always a prefix of everything fed, and ``tokens`` is
    exactly ``tokenizer.count(text)``, at most ``budget``.

    Every token holds at least one byte, so while the settled count plus the
    bytes since could not pass the budget, text is let through uncounted;
    a reply well within its budget is counted once, when ``tokens`` is read.
    """

    def __init__(self, tokenizer: Tokenizer, budget: int) -> None:
        self.tokenizer = tokenizer
        self.budget = budget
        self.cut = False
        self._settled: list[str] = []  # text whose pieces can no longer change
        self._settled_tokens = 0
        self._tail = ""  # counted text after it
        self._tail_tokens = 0
        self._tail_bytes = 0
        self._pending: list[str] = []  # let through, not counted yet
        self._pending_bytes = 0
        self._stable_length = getattr(tokenizer, "stable_length", None)

    @property
    def text(self) -> str:
        return "".join(self._settled) + self._tail + "".join(self._pending)

    @property
    def tokens(self) -> int:
        if self._pending:
            tail = self._tail + "".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            self._accept(tail, self.tokenizer.count(tail), settle=False)
        return self._settled_tokens + self._tail_tokens

    def count_of(self, text: str) -> int | None:
        """``text``'s exact token count when it is what the meter holds
        (counted now, once, if it was not yet), so the reply is not counted
        twice; None for any other text."""
        if text != self.text:
            return None
        return self.tokens

    def feed(self, text: str, *, last: bool = False) -> str:
        """The part of ``text`` that fits the budget after what came before
        (``last``: nothing follows, so nothing is kept for later counts)."""
        if self.cut or not text:
            return ""
        self._pending.append(text)
        self._pending_bytes += len(text.encode())
        if self._settled_tokens + self._tail_bytes + self._pending_bytes <= self.budget:
            return text
        return self._measure(settle=not last)

    def _measure(self, *, settle: bool) -> str:
        """Count what is pending; let through what fits of the newest text."""
        text = self._pending.pop()
        taken = self._tail + "".join(self._pending)  # let through already (it fit by bytes)
        self._pending, self._pending_bytes = [], 0
        tail = taken + text
        room = self.budget - self._settled_tokens
        tokens = self.tokenizer.encode(tail)
        if len(tokens) <= room:
            self._accept(tail, len(tokens), settle=settle)
            return text
        kept = self._fit(tail, tokens, room, taken)
        self.cut = True
        self._accept(kept, self.tokenizer.count(kept), settle=False)
        return kept[len(taken) :]

    def _accept(self, tail: str, count: int, *, settle: bool) -> None:
        settled = self._stable_length(tail) if settle and self._stable_length is not None else 0
        if settled:
            # The head is counted as it stands in the text, not on its own:
            # alone, its end would be the text's end, which some pieces look at.
            rest = tail[settled:]
            rest_tokens = self.tokenizer.count(rest)
            self._settled.append(tail[:settled])
            self._settled_tokens += count - rest_tokens
            tail, count = rest, rest_tokens
        self._tail, self._tail_tokens, self._tail_bytes = tail, count, len(tail.encode())

    def _fit(self, tail: str, tokens: Sequence[int], room: int, taken: str) -> str:
        """The longest prefix of ``tail`` within ``room`` tokens, never
        shorter than ``taken`` (it has gone out, and fits)."""
        for n in range(room, -1, -1):
            kept = self.tokenizer.decode(tokens[:n])
            while not tail.startswith(kept):
                kept = kept[:-1]  # a token ended inside a character (decoded as U+FFFD)
            if len(kept) <= len(taken):
                return taken
            if self.tokenizer.count(kept) <= room:
                return kept
        return taken  # pragma: no cover - n == 0 returns above


async def metered_stream(
    open_chunks: Callable[[], AsyncGenerator[GenerationChunk, None]], meter: ReplyMeter
) -> AsyncGenerator[GenerationChunk, None]:
    """The chunks of ``open_chunks()`` (called on the first step) within
    ``meter``'s budget: at the budget the source is closed and a last chunk
    with ``finish_reason="length"`` ends the reply."""
    prompt_tokens = None
    chunks = open_chunks()
    async with aclosing(chunks):
        async for chunk in chunks:
            content = meter.feed(chunk.content, last=chunk.finish_reason is not None)
            if meter.cut:
                prompt_tokens = chunk.prompt_tokens
                break
            if chunk.finish_reason is None:
                if content:
                    yield chunk
                continue
            yield chunk.model_copy(update={"completion_tokens": _trusted(chunk.completion_tokens, meter)})
            return
        else:
            return  # the source ended without a finish_reason; the caller says so
    # Over budget: the source is closed (leaving the block above) before the end is told.
    yield GenerationChunk(
        content=content, finish_reason="length", prompt_tokens=prompt_tokens, completion_tokens=meter.tokens
    )


def metered_generation(gen: Generation, meter: ReplyMeter) -> Generation:
    """A whole reply cut to ``meter``'s budget."""
    content = meter.feed(gen.content, last=True)
    if not meter.cut:
        completion_tokens = _trusted(gen.completion_tokens, meter)
        if completion_tokens == gen.completion_tokens:
            return gen
        return trusted_copy(gen, Generation, completion_tokens=completion_tokens)
    return trusted_copy(
        gen, Generation, content=content, finish_reason="length", completion_tokens=meter.tokens
    )


def settle_reply(
    meter: ReplyMeter, generated: Generation | GenerationChunk, text: str, final: str, *, cut: bool = False
) -> Generation:
    """The reply to store once a chat mode has finished it.

    ``text`` is what the model said (all fed to ``meter``), ``generated``
    its finish and counts, ``final`` the chat mode's reply (``cut``: the
    mode's addition was already cut to the budget). What the mode
    added after ``text`` is counted in the reply and cut at the budget like
    the model's text; a reply the mode rewrote is counted on its own.
    """
    finish = generated.finish_reason or "stop"
    if final == text:
        if isinstance(generated, Generation) and generated.content == text:
            return generated
        return trusted(
            Generation,
            content=text,
            finish_reason=finish,
            prompt_tokens=generated.prompt_tokens,
            completion_tokens=generated.completion_tokens,
            tool_calls=generated.tool_calls,
        )
    if final.startswith(text):
        content = text + meter.feed(final[len(text) :], last=True)
    else:
        meter = ReplyMeter(meter.tokenizer, meter.budget)
        content = meter.feed(final, last=True)
    cut = cut or meter.cut
    return Generation(
        content=content,
        finish_reason="length" if cut else finish,
        prompt_tokens=generated.prompt_tokens,
        completion_tokens=meter.tokens,
        tool_calls=None if cut else generated.tool_calls,
    )


def _trusted(reported: int | None, meter: ReplyMeter) -> int:
    """The backend's own count, unless it has none or one above the budget
    (it counts differently): then the meter's exact count."""
    return reported if reported is not None and reported <= meter.budget else meter.tokens
