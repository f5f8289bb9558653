"""Service-level objectives: ``--slo ttft_p99=0.5``, the verdict, and the knee of a sweep.

An SLO names a metric (``ttft``, ``itl``, ``tpot``, ``e2e``), a percentile
(``p50`` … ``p99.9``) and a limit in seconds; ``error_rate=0.01`` bounds
the share of failed requests. A step passes when every SLO holds. Its
*goodput* is the rate of requests that succeeded and were each within every
latency limit (a request's ITL being its largest gap), so a step can pass
its percentiles and still show how much of its traffic was good.
The *knee* of a sweep is the highest rate such that it, and every lower
rate, passed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .hdr import METRICS

__all__ = ["Slo", "knee", "limits_of", "verdict"]

_SPEC = re.compile(r"^(?P<metric>[a-z][a-z0-9_]*?)(?:_p(?P<q>\d+(?:\.\d+)?))?=(?P<limit>[^=]+)$")


@dataclass(frozen=True)
class Slo:
    metric: str
    percentile: float | None
    limit: float

    @classmethod
    def parse(cls, text: str) -> Slo:
        """``ttft_p99=0.5``, ``e2e_p95=5``, ``tpot_p50=0.05``, ``itl_p99.9=0.2``, ``error_rate=0.01``."""
        m = _SPEC.match(text.strip().lower())
        if not m:
            raise ValueError(f"{text!r}: write METRIC_pQ=SECONDS (like ttft_p99=0.5) or error_rate=R")
        metric, q = m["metric"], m["q"]
        try:
            limit = float(m["limit"].rstrip("s"))
        except ValueError:
            raise ValueError(f"{text!r}: the limit must be a number of seconds") from None
        if not (math.isfinite(limit) and limit >= 0):
            raise ValueError(f"{text!r}: the limit must be finite and non-negative")
        if metric == "error_rate":
            if q is not None or limit > 1:
                raise ValueError(f"{text!r}: error_rate takes a share between 0 and 1, no percentile")
            return cls("error_rate", None, limit)
        if metric not in METRICS:
            raise ValueError(f"{text!r}: unknown metric {metric!r}; use {', '.join(METRICS)} or error_rate")
        if q is None:
            raise ValueError(f"{text!r}: say which percentile, like {metric}_p99=…")
        percentile = float(q)
        if not 0 < percentile < 100:
            raise ValueError(f"{text!r}: the percentile must be between 0 and 100")
        return cls(metric, percentile, limit)

    @property
    def name(self) -> str:
        return self.metric if self.percentile is None else f"{self.metric}_p{self.percentile:g}"

    def __str__(self) -> str:
        return f"{self.name}<={self.limit:g}"


def limits_of(slos: list[Slo]) -> dict[str, float]:
    """Per-request limits for goodput: the tightest limit given for each latency metric."""
    out: dict[str, float] = {}
    for s in slos:
        if s.percentile is not None:
            out[s.metric] = min(out.get(s.metric, math.inf), s.limit)
    return out


def verdict(summary: dict[str, Any], slos: list[Slo]) -> dict[str, Any]:
    """Each SLO checked against a step's summary (:meth:`LoadMetrics.summary`)."""
    checks = []
    for s in slos:
        if s.percentile is None:
            value: float | None = summary.get("error_rate", 0.0)
        else:
            hist = _hist(summary, s.metric)
            value = hist.percentile(s.percentile) if hist is not None and hist.count else None
        met = value is not None and not math.isnan(value) and value <= s.limit
        checks.append({"slo": s.name, "limit": s.limit, "value": value, "met": met})
    passed = all(c["met"] for c in checks) if checks else None
    return {"passed": passed, "checks": checks}


def _hist(summary: dict[str, Any], metric: str) -> Any:
    from .hdr import Histogram

    encoded = summary.get("hdr", {}).get(metric)
    return Histogram.decode(encoded) if encoded is not None else None


def knee(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest requested rate that passed with every lower rate passing too.

    ``steps`` carry ``rate`` and ``verdict``; None when no SLO was given, and
    ``rate: None`` when even the lowest rate failed."""
    judged = sorted(
        (s for s in steps if s.get("verdict", {}).get("passed") is not None), key=lambda s: s["rate"]
    )
    if not judged:
        return None
    best = None
    for step in judged:
        if not step["verdict"]["passed"]:
            break
        best = step
    failed_above = [s["rate"] for s in judged if best is None or s["rate"] > best["rate"]]
    passed_above = [s["rate"] for s in judged if best and s["rate"] > best["rate"] and s["verdict"]["passed"]]
    return {
        "rate": best["rate"] if best else None,
        "goodput_rps": best["summary"]["goodput_rps"] if best else None,
        "throughput_rps": best["summary"]["throughput_rps"] if best else None,
        "first_failing_rate": failed_above[0] if failed_above else None,
        "passed_again_above": passed_above,
    }
