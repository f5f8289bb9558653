"""A flood of refused connections is a few log lines, each saying how many."""

from __future__ import annotations

import logging

import pytest

from convcore_server.limits import RefusalLog


def test_refused_connections_are_one_warning_a_second_with_their_count(caplog: pytest.LogCaptureFixture) -> None:
    refusals = RefusalLog(every=1.0)
    with caplog.at_level(logging.WARNING, logger="convcore_server"):
        for i in range(1000):
            refusals.refused(64, now=100.0 + i * 0.0015)  # 1,000 refusals in 1.5 s
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused 1 connection(s): 64 are open already",
        "refused 667 connection(s): 64 are open already",
    ]
