"""The audit after every run: read every conversation back and count the damage.

Where the driver can read the store, each conversation goes through
:func:`convcore.audit.audit_messages` with the turn ids the run was told
succeeded (lost, split, duplicated, misordered by seq). On top of that, for
every target:

- every acknowledged user message must be stored (else *lost*) exactly once
  (else *duplicated*), and be followed by an assistant reply (else *split*);
- a session's turns were sent one after another, each after the previous
  was acknowledged, so they must be stored in that order (else *misordered*).

Any non-zero count fails the run.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from convcore.audit import audit_messages

from .driver import Driver, ReadBack
from .workloads import Ledger

__all__ = ["RunAudit", "audit_run", "content_checks"]

_KINDS = ("lost", "split", "duplicated", "misordered")


@dataclass
class RunAudit:
    """Damage summed over a run's conversations; ``ok`` when all counts are zero."""

    conversations: int = 0
    messages: int = 0
    acknowledged: int = 0
    lost: int = 0
    split: int = 0
    duplicated: int = 0
    misordered: int = 0
    unaudited: int = 0  # conversations the driver could not read back
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(getattr(self, k) for k in _KINDS)

    @property
    def status(self) -> str:
        if not self.ok:
            return "FAILED"
        return "unaudited" if self.unaudited == self.conversations and self.conversations else "ok"

    def note(self, conv_uid: str, problem: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(f"{conv_uid}: {problem}")

    def damage(self) -> str:
        """``lost=2 split=1`` style, only the non-zero counts (``none`` if clean)."""
        parts = [f"{k}={getattr(self, k)}" for k in _KINDS if getattr(self, k)]
        return " ".join(parts) or "none"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "status": self.status}


def content_checks(
    report: RunAudit,
    conv_uid: str,
    pairs: list[tuple[str, str]],
    acked: list[tuple[str | None, str, object]],
    *,
    by_turn_id: bool,
) -> None:
    """Lost/duplicated/split/order checks by content, for what ``audit_messages`` cannot see."""
    position: dict[str, int] = {}
    counts = Counter(content for role, content in pairs if role == "user")
    for i, (role, content) in enumerate(pairs):
        if role == "user":
            position.setdefault(content, i)
    sessions: dict[object, list[int]] = {}
    for turn_id, text, session in acked:
        if not text:
            continue  # pre-filled history: checked by turn id
        where = position.get(text)
        if where is None:
            if not by_turn_id or turn_id is None:
                report.lost += 1
                report.note(conv_uid, f"acknowledged input {text[:40]!r} is not stored")
            continue
        if not by_turn_id:
            if counts[text] > 1:
                report.duplicated += counts[text] - 1
                report.note(conv_uid, f"input {text[:40]!r} is stored {counts[text]} times")
            if where + 1 >= len(pairs) or pairs[where + 1][0] != "assistant":
                report.split += 1
                report.note(conv_uid, f"input {text[:40]!r} is not followed by its reply")
        if session is not None:
            sessions.setdefault(session, []).append(where)
    for session, places in sessions.items():
        inversions = sum(1 for a, b in itertools.pairwise(places) if b < a)
        if inversions:
            report.misordered += inversions
            report.note(conv_uid, f"session {session}: {inversions} turns stored before an earlier one")


def _audit_one(
    report: RunAudit, conv_uid: str, back: ReadBack, acked: list[tuple[str | None, str, object]]
) -> None:
    if back.messages is not None:
        messages = list(back.messages)
        report.messages += len(messages)
        ids = [turn_id for turn_id, _, _ in acked if turn_id is not None]
        result = audit_messages(messages, expected_turns=ids, unique_inputs=True)
        for kind in _KINDS:
            setattr(report, kind, getattr(report, kind) + getattr(result, kind))
        for problem in result.problems[:10]:
            report.note(conv_uid, problem)
        pairs = [(m.role, m.content) for m in messages]
        content_checks(report, conv_uid, pairs, acked, by_turn_id=True)
    else:
        report.messages += len(back.pairs)
        content_checks(report, conv_uid, back.pairs, acked, by_turn_id=False)


async def audit_run(driver: Driver, ledger: Ledger) -> RunAudit:
    """Read back every conversation in ``ledger`` through ``driver`` and count the damage."""
    report = RunAudit()
    for conv_uid, acked in ledger.turns.items():
        report.conversations += 1
        report.acknowledged += sum(1 for _, text, _ in acked if text)
        try:
            back = await driver.read_back(conv_uid)
        except Exception as exc:
            report.unaudited += 1
            report.note(conv_uid, f"read-back failed: {type(exc).__name__}: {exc}")
            continue
        if back is None:
            report.unaudited += 1
            continue
        _audit_one(report, conv_uid, back, acked)
    if report.unaudited and report.unaudited == report.conversations:
        report.problems.insert(0, "the target cannot be read back: no conversation was audited")
    return report
