"""The trim report: which stored messages a turn's prompt used, and which it left out.

Every turn's window is described by seq ranges (``[first, last]``, both
included) so the report of a conversation with thousands of messages stays
a few numbers long: the stored messages in the prompt, those a compaction
summary stood in for, and those dropped, with the token counts that
decided it. It is
on :class:`~convcore.schema.ChatCompletion` (``trim``), on a stream's last
chunk and :class:`~convcore.streaming.TurnStream`, and over HTTP in the
``trim`` field and the ``X-Convcore-Trim`` header.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict

from .answer_schema import SENT_WHOLE
from .models import INSTRUCTION_ROLES, Message, trusted
from .tokens import REPLY_PRIMING_TOKENS
from .window import Counted

__all__ = ["SeqRange", "TrimReport", "seq_ranges", "trim_report"]

SeqRange = tuple[int, int]


def seq_ranges(seqs: Iterable[int]) -> list[SeqRange]:
    """Seqs as sorted ``(first, last)`` runs of consecutive numbers.

    A window's seqs are a few long runs (first rounds, newest rounds), so
    each run's end is found by bisection rather than by walking it.
    """
    ordered = sorted(set(seqs))
    runs: list[SeqRange] = []
    start, n = 0, len(ordered)
    while start < n:
        lo, hi = start, n - 1
        while lo < hi:  # the last index still in the run that starts at ``start``
            mid = (lo + hi + 1) // 2
            if ordered[mid] - ordered[start] == mid - start:
                lo = mid
            else:
                hi = mid - 1
        runs.append((ordered[start], ordered[lo]))
        start = lo + 1
    return runs


def complement(ranges: Sequence[SeqRange], last: int) -> list[SeqRange]:
    """The runs of 1..``last`` outside ``ranges`` (disjoint)."""
    taken = sorted(ranges)
    out: list[SeqRange] = []
    nxt = 1
    for first, end in taken:
        if first > nxt:
            out.append((nxt, min(first - 1, last)))
        nxt = max(nxt, end + 1)
    if nxt <= last:
        out.append((nxt, last))
    return [r for r in out if r[0] <= r[1]]


class TrimReport(BaseModel):
    """What one turn's prompt held.

    ``history_messages`` is how many messages the conversation had when the
    window was built. ``prompt_seqs`` are the stored messages in the prompt,
    ``summarized_seqs`` those a compaction summary in the prompt stood in
    for, and ``dropped_seqs`` the rest. Token counts are in the model's
    encoding: ``prompt_tokens`` the whole prompt (reply priming included),
    ``system_tokens`` system prompt, scene context and summary,
    ``history_tokens`` the stored messages, ``input_tokens`` the request's
    new messages; ``dropped_tokens`` is what the dropped messages cost in
    the conversation's own encoding (None when the model counts with
    another one). ``input_dropped`` counts the request's earlier new
    messages that did not fit.
    """

    model_config = ConfigDict(frozen=True, **SENT_WHOLE)

    history_messages: int
    prompt_seqs: list[SeqRange]
    dropped_seqs: list[SeqRange]
    summarized_seqs: list[SeqRange] = []
    prompt_tokens: int
    system_tokens: int
    history_tokens: int
    input_tokens: int
    dropped_tokens: int | None
    input_dropped: int = 0
    context_window: int
    max_new_tokens: int

    def header(self) -> str:
        """The report in one header line: ``messages=1000; prompt=1-2,951-1000; dropped=3-950; ...``."""

        def runs(ranges: Sequence[SeqRange]) -> str:
            return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges) or "none"

        parts = [
            f"messages={self.history_messages}",
            f"prompt={runs(self.prompt_seqs)}",
            f"dropped={runs(self.dropped_seqs)}",
            f"summarized={runs(self.summarized_seqs)}",
            f"prompt_tokens={self.prompt_tokens}",
            f"history_tokens={self.history_tokens}",
            f"dropped_tokens={'unknown' if self.dropped_tokens is None else self.dropped_tokens}",
            f"budget={self.context_window}-{self.max_new_tokens}",
        ]
        return "; ".join(parts)


def trim_report(
    *,
    chosen: Sequence[Counted],
    prompt_tokens: int,
    history_messages: int,
    history_total_tokens: int,
    same_encoding: bool,
    inputs: int,
    summarized: SeqRange | None = None,
    summarized_tokens: int = 0,
    context_window: int,
    max_new_tokens: int,
) -> TrimReport:
    """The report of a window whose messages are ``chosen`` (stored ones are
    :class:`Message`, counted in the model's encoding). ``history_total_tokens``
    is the conversation's total in its own encoding, ``same_encoding``
    whether the model counts with it too; ``summarized`` the range a summary
    in the prompt covers and ``summarized_tokens`` its messages' cost there."""
    # Built on every turn: builtins over the list, no per-message branches
    # in Python, and no validation of values made here.
    kept = [m.seq for m in chosen if type(m) is Message]
    others = [m for m in chosen if type(m) is not Message]  # system, context, summary, input: a few
    system_parts = [m.token_count for m in others if m.role in INSTRUCTION_ROLES]
    system = sum(system_parts)
    new = sum(m.token_count for m in others) - system
    history = prompt_tokens - REPLY_PRIMING_TOKENS - system - new
    used_inputs = len(others) - len(system_parts)
    prompt_ranges = seq_ranges(kept)
    dropped_tokens = history_total_tokens - history - summarized_tokens if same_encoding else None
    covered = [summarized] if summarized else []
    return trusted(
        TrimReport,
        history_messages=history_messages,
        prompt_seqs=prompt_ranges,
        dropped_seqs=complement([*prompt_ranges, *covered], history_messages),
        summarized_seqs=covered,
        prompt_tokens=prompt_tokens,
        system_tokens=system,
        history_tokens=history,
        input_tokens=new,
        dropped_tokens=dropped_tokens,
        input_dropped=inputs - used_inputs,
        context_window=context_window,
        max_new_tokens=max_new_tokens,
    )
