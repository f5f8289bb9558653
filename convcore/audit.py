"""Checking a stored conversation for lost, split, duplicated or misordered turns.

Tests and benchmarks read a conversation back after racing writers at it;
this says, in counts, whether the store kept its promises.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .models import Message

__all__ = ["AuditReport", "audit_messages"]


@dataclass
class AuditReport:
    """Counts of each kind of damage; ``ok`` when all are zero."""

    turns: int = 0
    messages: int = 0
    lost: int = 0  # expected turns not stored
    split: int = 0  # turns whose messages are not adjacent, or not input-then-reply
    duplicated: int = 0  # turns (or contents) stored more than once
    misordered: int = 0  # seqs not gapless and increasing from 1
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.split or self.duplicated or self.misordered)


def audit_messages(
    messages: Sequence[Message],
    *,
    expected_turns: Iterable[str] | None = None,
    unique_inputs: bool = False,
) -> AuditReport:
    """Audit one conversation's messages as read back in seq order.

    ``expected_turns`` are the turn ids the caller was told succeeded; each
    must be stored exactly once. With ``unique_inputs`` every user message's
    content is expected to be unique, so a repeated content is a duplicate
    even under another turn id.
    """
    report = AuditReport(messages=len(messages))
    for i, m in enumerate(messages):
        if m.seq != i + 1:
            report.misordered += 1
            report.problems.append(f"position {i} holds seq {m.seq}")
    runs: list[tuple[str, list[Message]]] = []
    for m in messages:
        if runs and runs[-1][0] == m.turn_id:
            runs[-1][1].append(m)
        else:
            runs.append((m.turn_id, [m]))
    runs = [piece for run in runs for piece in _split_repeats(*run)]
    seen: dict[str, list[Message]] = {}
    for turn_id, run in runs:
        if turn_id in seen:
            if [m.content for m in seen[turn_id]] == [m.content for m in run]:
                report.duplicated += 1
                report.problems.append(f"turn {turn_id} is stored twice")
            else:
                report.split += 1
                report.problems.append(f"turn {turn_id} is not contiguous")
            continue
        seen[turn_id] = run
        if run[-1].role != "assistant" or any(m.role == "assistant" for m in run[:1]):
            report.split += 1
            report.problems.append(f"turn {turn_id} does not run from input to reply")
    report.turns = len(seen)
    if unique_inputs:
        contents = [m.content for m in messages if m.role == "user"]
        report.duplicated += len(contents) - len(set(contents))
    if expected_turns is not None:
        expected = set(expected_turns)
        report.lost = len(expected - seen.keys())
        if report.lost:
            report.problems.append(f"{report.lost} acknowledged turns are missing")
    return report


def _split_repeats(turn_id: str, run: list[Message]) -> list[tuple[str, list[Message]]]:
    """A run that is one turn's messages stored twice back to back, as two
    runs, so the twin is counted as a duplicate rather than merged away."""
    half = len(run) // 2
    if (
        len(run) % 2 == 0
        and half
        and [(m.role, m.content) for m in run[:half]] == [(m.role, m.content) for m in run[half:]]
    ):
        return [(turn_id, run[:half]), (turn_id, run[half:])]
    return [(turn_id, run)]
