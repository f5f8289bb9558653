"""What Locust processes measure, shipped to the master and merged into one report.

Each process (a worker, or a lone local runner) keeps a :class:`LocustTally`.
A worker hands :meth:`LocustTally.payload` to every ``report_to_master``
(what it measured since the last report, then starts afresh) and the master
folds each into its own tally with :meth:`LocustTally.absorb`: histogram
buckets and counts add, percentiles are computed once, from the merged
histograms, never averaged. :meth:`LocustTally.record` then builds the
same record ``python -m benchmarks load`` writes, so the same report comes
out. Kept free of Locust imports (Locust patches the process with gevent).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .hdr import LoadMetrics
from .slo import Slo, knee, verdict

__all__ = ["LocustTally"]

_AUDIT_KINDS = ("lost", "split", "duplicated", "misordered")


@dataclass
class LocustTally:
    limits: dict[str, float] = field(default_factory=dict)
    max_new_tokens: int = 0
    metrics: LoadMetrics = field(init=False)
    starts: int = 0  # sessions whose first turn was sent
    first_start: float = math.inf
    last_start: float = -math.inf
    audit: Counter[str] = field(default_factory=Counter)
    processes: int = 0  # payloads absorbed from distinct reports (diagnostic)

    def __post_init__(self) -> None:
        self.metrics = LoadMetrics(limits=dict(self.limits), max_new_tokens=self.max_new_tokens)

    def session_started(self, sent: float) -> None:
        self.starts += 1
        self.first_start = min(self.first_start, sent)
        self.last_start = max(self.last_start, sent)

    def payload(self) -> dict[str, Any]:
        """Everything measured since the last payload, as plain data; the tally starts afresh."""
        data = {
            "metrics": self.metrics.to_dict(),
            "starts": self.starts,
            "first_start": self.first_start if self.starts else None,
            "last_start": self.last_start if self.starts else None,
            "audit": dict(self.audit),
        }
        self.metrics = LoadMetrics(limits=dict(self.limits), max_new_tokens=self.max_new_tokens)
        self.starts, self.first_start, self.last_start = 0, math.inf, -math.inf
        self.audit = Counter()
        return data

    def absorb(self, data: dict[str, Any]) -> None:
        """Add a payload in (from any process): sums and histogram merges only."""
        self.metrics.merge(LoadMetrics.from_dict(data["metrics"]))
        if data.get("starts"):
            self.starts += int(data["starts"])
            self.first_start = min(self.first_start, float(data["first_start"]))
            self.last_start = max(self.last_start, float(data["last_start"]))
        self.audit.update({k: int(v) for k, v in (data.get("audit") or {}).items()})
        self.processes += 1

    def audit_dict(self) -> dict[str, Any]:
        counts = {
            k: self.audit.get(k, 0) for k in (*_AUDIT_KINDS, "conversations", "acknowledged", "unaudited")
        }
        ok = not any(counts[k] for k in _AUDIT_KINDS)
        unaudited = counts["conversations"] and counts["unaudited"] == counts["conversations"]
        return {**counts, "ok": ok, "status": "FAILED" if not ok else "unaudited" if unaudited else "ok",
                "problems": []}  # fmt: skip

    def step(self, rate: float, slos: list[Slo]) -> dict[str, Any]:
        """The merged measurement as one step of a load record."""
        summary = self.metrics.summary()
        span = self.last_start - self.first_start if self.starts > 1 else 0.0
        return {
            "rate": rate,
            "sessions": self.starts,
            "achieved_rate": (self.starts - 1) / span if span > 0 else math.nan,
            "summary": summary,
            "verdict": verdict(summary, slos),
            "audit": self.audit_dict(),
        }

    def record(
        self, *, host: str, rate: float, slos: list[Slo], settings: dict[str, Any], env: dict[str, Any]
    ) -> dict[str, Any]:
        """A whole load record (as :func:`benchmarks.load.run_load` makes) for the report writer."""
        step = self.step(rate, slos)
        damaged = not step["audit"]["ok"]
        passed = step["verdict"]["passed"]
        now = datetime.now(UTC)
        return {
            "schema": "convcore-bench-load/1",
            "run_id": f"locust-{now:%H%M%S}",
            "run_name": f"{now:%Y%m%d-%H%M%S}-locust-load",
            "started_at": now.isoformat(),
            "finished_at": now.isoformat(),
            "command": ["locust"],
            "environment": env,
            "config": {**settings, "slos": [str(s) for s in slos]},
            "targets": [
                {
                    "name": f"locust {host}",
                    "kind": "locust",
                    "processes": self.processes,
                    "steps": [step],
                    "knee": knee([step]),
                }
            ],
            "exit_code": 1 if damaged else 4 if passed is False else 0,
        }
