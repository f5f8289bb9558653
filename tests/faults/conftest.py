"""Prints the fault suite's table (acknowledged against stored turns) at the end of the run."""

from __future__ import annotations

import pytest

from tests.faults.ledger import ROWS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("fault suite: acknowledged vs stored turns")
    head = ("case", "acknowledged", "stored", "lost", "half-written", "duplicated", "5xx after recovery", "note")
    rows = [
        (r.case, r.acknowledged, r.stored, r.lost, r.half_written, r.duplicated, r.five_xx_after_recovery, r.note)
        for r in ROWS
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for line in (head, tuple("-" * w for w in widths), *rows):
        tr.write_line("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
