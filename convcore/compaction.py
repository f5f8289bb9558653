"""Compaction: rounds that leave the window are summarised, once, and the summary stands in for them.

Opt-in: ``Engine(compaction=Compactor(records))``, and per request
``"compact": true/false``. When a turn's window drops stored rounds, the
compactor makes a rolling summary of them through the conversation's own
model backend (``GenerationRequest.purpose == "summary"``) and stores it in
a :class:`~convcore.records.RecordStore` with the seq range it covers. The
prompt then holds the summary (as a system message after the kept first
rounds) if it fits in ``share`` of the room the budget leaves; the newest
rounds get the rest, so ``prompt_tokens + max_new_tokens <= context_window``
still holds exactly.

At most once per range: a summary is made only when at least
``min_rounds`` dropped rounds are not yet covered (never per turn); turns of
one conversation in this process take a lock to make one, and look again
once they have it; and each range is stored ``create_only`` under its own
key, so a second process that raced to the same range keeps the first one
stored (it may have paid for one generation more). A summary extends the
previous one (previous summary + the newly dropped rounds), so each covers
seqs ``first..last`` without gaps; one generation reads at most
``max_read`` messages, and a conversation that compaction meets late
catches up over several turns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import BackendError, ConflictError, ConvcoreError
from .generation import GenerationRequest, PromptMessage
from .locks import KeyedLocks
from .models import Message, MessageDraft
from .protocols import ConversationStore, Tokenizer
from .records import RecordStore
from .registry import ModelSpec
from .tokens import REPLY_PRIMING_TOKENS, count_message, get_tokenizer

__all__ = ["SUMMARY_INSTRUCTION", "Compactor", "Summary", "render_for_summary"]

SUMMARY_INSTRUCTION = (
    "Summarise the conversation below for your own later use: keep names, facts, decisions, "
    "open questions and what the user asked for. Write only the summary."
)
log = logging.getLogger("convcore.compaction")
_KIND = "summary"
_LATEST = "summary-latest"


@dataclass(frozen=True)
class Summary:
    """A stored summary of seqs ``first..last``; ``covered_tokens`` is what
    those messages cost in the conversation's encoding."""

    first: int
    last: int
    content: str
    covered_tokens: int

    def prompt_text(self) -> str:
        return f"Summary of the earlier conversation (messages {self.first}-{self.last}):\n{self.content}"

    def as_record(self) -> dict[str, object]:
        return {
            "first": self.first,
            "last": self.last,
            "content": self.content,
            "covered_tokens": self.covered_tokens,
        }

    @classmethod
    def of(cls, record: dict[str, object]) -> Summary:
        return cls(
            first=int(record["first"]),  # type: ignore[call-overload]
            last=int(record["last"]),  # type: ignore[call-overload]
            content=str(record["content"]),
            covered_tokens=int(record["covered_tokens"]),  # type: ignore[call-overload]
        )


def render_for_summary(first: int, previous: Summary | None, messages: Sequence[Message]) -> str:
    """The summariser's input: the range it must cover, then each message with its seq."""
    last = messages[-1].seq
    lines = [f"Messages {first}-{last}."]
    if previous is not None:
        lines.append(f"Summary of messages {previous.first}-{previous.last}: {previous.content}")
    lines += [f"[{m.seq}] {m.role}: {m.content}" for m in messages]
    return "\n".join(lines)


class Compactor:
    """Makes and finds summaries; see the module docstring."""

    def __init__(
        self,
        records: RecordStore,
        *,
        share: float = 0.25,
        min_rounds: int = 2,
        max_new_tokens: int = 256,
        max_read: int = 400,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.records = records
        self.share = share
        self.min_rounds = max(1, min_rounds)
        self.max_new_tokens = max_new_tokens
        self.max_read = max_read
        self._locks = KeyedLocks()

    async def latest(self, conv_uid: str) -> Summary | None:
        record = await self.records.get(_LATEST, conv_uid)
        return None if record is None else Summary.of(record)

    async def summary_for(
        self,
        store: ConversationStore,
        spec: ModelSpec,
        conv_uid: str,
        start: int,
        end: int,
    ) -> Summary | None:
        """The summary to use for dropped seqs ``start..end``: the stored one
        (extended first when ``min_rounds`` more rounds went uncovered), or
        None when there is nothing usable."""
        current = await self._usable(conv_uid, start, end)
        if not await self._needs_more(store, conv_uid, current, start, end):
            return current
        async with self._locks.hold(conv_uid):
            current = await self._usable(conv_uid, start, end)  # another turn may have made it
            if not await self._needs_more(store, conv_uid, current, start, end):
                return current
            try:
                return await self._extend(store, spec, conv_uid, current, start, end)
            except BackendError as exc:
                # The turn goes on with the summary it has: a summary is an
                # improvement to the prompt, not a reason to fail the reply.
                log.warning("summarising %r failed, the turn goes on without: %s", conv_uid, exc)
                return current

    async def forget(self, conv_uid: str) -> None:
        """Delete a conversation's summaries (when the conversation is deleted)."""
        latest = await self.records.get(_LATEST, conv_uid)
        if latest is None:
            return
        for last in latest.get("ranges") or ():
            await self.records.delete(_KIND, f"{conv_uid}:{last}")
        await self.records.delete(_LATEST, conv_uid)

    # -- internals -----------------------------------------------------------

    async def _usable(self, conv_uid: str, start: int, end: int) -> Summary | None:
        """The newest stored summary of ``start..`` that ends by ``end``. When
        the window drops fewer rounds than the newest summary covers (a larger
        reply budget, a longer prompt), an earlier range still fits: made
        again from scratch instead, it would cost a generation every turn."""
        record = await self.records.get(_LATEST, conv_uid)
        if record is None:
            return None
        summary = Summary.of(record)
        if summary.last > end:  # reaching into the kept rounds
            earlier = [int(last) for last in record.get("ranges") or () if int(last) <= end]
            stored = await self.records.get(_KIND, f"{conv_uid}:{max(earlier)}") if earlier else None
            if stored is None:
                return None
            summary = Summary.of(stored)
        return summary if summary.first == start else None  # or another head's

    async def _needs_more(
        self, store: ConversationStore, conv_uid: str, current: Summary | None, start: int, end: int
    ) -> bool:
        begin = current.last + 1 if current else start
        if end - begin + 1 < 2 * self.min_rounds:  # a round is at least two messages
            return False
        page = await store.read_messages(conv_uid, start_seq=begin, limit=min(end - begin + 1, self.max_read))
        return sum(1 for m in page if m.starts_round) >= self.min_rounds

    async def _extend(
        self,
        store: ConversationStore,
        spec: ModelSpec,
        conv_uid: str,
        current: Summary | None,
        start: int,
        end: int,
    ) -> Summary | None:
        begin = current.last + 1 if current else start
        page = await store.read_messages(conv_uid, start_seq=begin, limit=min(end - begin + 1, self.max_read))
        # Whole rounds only: stop before a round the page does not hold whole.
        if len(page) < end - begin + 1:
            cut = max((i for i, m in enumerate(page) if m.starts_round), default=0)
            page = page[:cut]
        first = current.first if current else start
        max_new = min(self.max_new_tokens, spec.context_window // 2)
        page = _fit_rounds(page, first, current, get_tokenizer(spec.encoding), spec.context_window - max_new)
        if not page:
            return current
        request = GenerationRequest(
            model=spec.upstream,
            messages=(
                PromptMessage(role="system", content=SUMMARY_INSTRUCTION),
                PromptMessage(role="user", content=render_for_summary(first, current, page)),
            ),
            max_new_tokens=max_new,
            conv_uid=conv_uid,
            purpose="summary",
        )
        try:
            generated = await spec.backend.complete(request)
        except ConvcoreError:
            raise
        except Exception as exc:
            raise BackendError(f"model backend for {spec.name!r} failed to summarise: {exc}") from exc
        summary = Summary(
            first=first,
            last=page[-1].seq,
            content=generated.content,
            covered_tokens=(current.covered_tokens if current else 0) + sum(m.token_count for m in page),
        )
        try:
            await self.records.put(_KIND, f"{conv_uid}:{summary.last}", summary.as_record(), create_only=True)
        except ConflictError:
            stored = await self.records.get(_KIND, f"{conv_uid}:{summary.last}")
            summary = Summary.of(stored) if stored is not None else summary  # another process was first
        previous = await self.records.get(_LATEST, conv_uid)
        ranges = [int(last) for last in (previous.get("ranges") or () if previous else ())]
        if summary.last not in ranges:  # every range is listed: found again, and deleted with the rest
            ranges = sorted([*ranges, summary.last])
        if previous is None or int(previous["last"]) < summary.last:
            await self.records.put(_LATEST, conv_uid, {**summary.as_record(), "ranges": ranges})
        elif ranges != previous.get("ranges"):
            await self.records.put(_LATEST, conv_uid, {**previous, "ranges": ranges})
        return summary


def _fit_rounds(
    page: Sequence[Message], first: int, previous: Summary | None, tok: Tokenizer, limit: int
) -> list[Message]:
    """The longest prefix of whole rounds of ``page`` whose summariser
    prompt fits ``limit`` tokens, counted exactly (an estimate from each
    line's count picks the cut, the rendered prompt confirms it)."""
    fixed = REPLY_PRIMING_TOKENS + count_message(tok, "system", SUMMARY_INSTRUCTION)
    head = render_for_summary(first, previous, page[:1]).rsplit("\n", 1)[0]
    used = fixed + count_message(tok, "user", head)
    cut = 0
    for i, m in enumerate(page):
        if m.starts_round and i:
            cut = i
        used += tok.count(f"[{m.seq}] {m.role}: {m.content}") + 1
        if used > limit:
            break
    else:
        cut = len(page)
    kept = list(page[:cut])
    while kept and fixed + count_message(tok, "user", render_for_summary(first, previous, kept)) > limit:
        kept = kept[: max((i for i, m in enumerate(kept) if m.starts_round and i), default=0)]
    return kept


def summary_message(summary: Summary, tok: Tokenizer) -> MessageDraft:
    """The summary as the prompt's system message, counted in the model's encoding."""
    text = summary.prompt_text()
    return MessageDraft(role="system", content=text, token_count=count_message(tok, "system", text))
