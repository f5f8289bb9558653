"""Latency kept in HDR histograms, and everything else a load step counts.

:class:`Histogram` wraps ``hdrhistogram`` (microseconds from 1 µs to one
hour, three significant digits), so percentiles up to p99.9 stay exact to
0.1% whatever the sample count, and histograms from several processes add
up exactly: :meth:`LoadMetrics.merge` adds counts, it never averages
percentiles. :meth:`LoadMetrics.to_dict` carries the histograms encoded
(HdrHistogram's compressed base64 form), which is how Locust workers ship
them to the master and how a result file can be merged again later.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["DIAGNOSTICS", "METRICS", "PERCENTILES", "Histogram", "LoadMetrics", "TurnOutcome"]

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
METRICS = ("ttft", "itl", "tpot", "e2e")  # what SLOs may name
# Diagnostics, never SLOs: how late sends were, and TTFT counted from the actual
# send (the figure a closed-loop tool reports; the gap to ``ttft`` is the queueing it hides).
DIAGNOSTICS = ("send_lag", "ttft_from_send")
_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 3_600_000_000, 3


class Histogram:
    """Seconds in, seconds out; microsecond HDR buckets inside."""

    def __init__(self) -> None:
        self._h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
        self.total = 0.0  # exact sum of the values, for the mean (HDR's own walks every bucket)

    def record(self, seconds: float) -> None:
        us = int(seconds * 1e6)
        self._h.record_value(min(max(us, _LOWEST_US), _HIGHEST_US))
        self.total += seconds

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def percentile(self, q: float) -> float:
        """The value at percentile ``q`` (0-100) in seconds; NaN when empty."""
        if not self.count:
            return math.nan
        return float(self._h.get_value_at_percentile(q)) / 1e6

    def percentiles(self, qs: list[float]) -> dict[float, float]:
        """Several percentiles in one walk over the buckets (seconds)."""
        if not self.count:
            return {q: math.nan for q in qs}
        values = self._h.get_percentile_to_value_dict(list(qs))
        return {q: float(values[q]) / 1e6 for q in qs}

    def summary(self) -> dict[str, float | int | None]:
        """count, mean, min, max and the report's percentiles (``p50`` … ``p99.9``), in seconds."""
        if not self.count:
            return {"count": 0}
        out: dict[str, float | int | None] = {
            "count": self.count,
            "mean": self.total / self.count,
            "min": self._h.get_min_value() / 1e6,
            "max": self._h.get_max_value() / 1e6,
        }
        for q, v in self.percentiles(list(PERCENTILES)).items():
            out[f"p{q:g}"] = v
        return out

    def spectrum(self, points: int = 60) -> list[tuple[float, float]]:
        """(percentile, seconds) pairs spaced for a log "1/(1-q)" axis, for plots."""
        if not self.count:
            return []
        qs = [100 * (1 - 10 ** (-4 * i / points)) for i in range(points + 1)]  # 0 … 99.99
        return list(self.percentiles(qs).items())

    def add(self, other: Histogram) -> None:
        self._h.add(other._h)
        self.total += other.total

    def encode(self) -> str:
        """HdrHistogram's compressed base64 form, with the exact sum after a ``;``."""
        return f"{self._h.encode().decode('ascii')};{self.total!r}" if self.count else ""

    @classmethod
    def decode(cls, text: str) -> Histogram:
        h = cls()
        if text:
            hdr, _, total = text.partition(";")
            h._h.decode_and_add(hdr.encode("ascii"))
            h.total = float(total) if total else h._h.get_mean_value() * h.count / 1e6
        return h


@dataclass
class TurnOutcome:
    """One turn as the client saw it; times are ``time.perf_counter()`` values."""

    intended: float  # when the schedule meant to send it
    sent: float = 0.0  # when the request actually went out
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk with content
    end: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    turn_id: str | None = None
    conv_uid: str | None = None
    content: str = ""
    finish_reason: str | None = None
    error: str | None = None  # its kind: "timeout", "http_503", "connect", "stream_error", …
    detail: str = ""


@dataclass
class LoadMetrics:
    """What one load step (or one Locust process) measured, mergeable across processes.

    ``limits`` are per-request SLO thresholds in seconds by metric: a request
    is *good* (counts towards goodput) when it succeeded and its TTFT, TPOT,
    E2E and largest inter-token gap are each within the limit given."""

    limits: dict[str, float] = field(default_factory=dict)
    max_new_tokens: int = 0
    hist: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram() for name in (*METRICS, *DIAGNOSTICS)}
    )
    requests: int = 0
    ok: int = 0
    good: int = 0
    full_replies: int = 0  # replies that reached max_new_tokens
    tokens_in: int = 0
    tokens_out: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    first_intended: float = math.inf
    last_end: float = -math.inf
    skipped: int = 0

    def record(self, t: TurnOutcome) -> None:
        self.requests += 1
        self.first_intended = min(self.first_intended, t.intended)
        self.last_end = max(self.last_end, t.end)
        self.hist["send_lag"].record(max(t.sent - t.intended, 0.0))
        if t.error is None and not t.token_times:
            t.error, t.detail = "empty_reply", "the stream ended without any content"
        if t.error is not None:
            self.errors[t.error] += 1
            if len(self.error_examples) < 10:
                self.error_examples.append(f"{t.error}: {t.detail}"[:300])
            return
        self.ok += 1
        self.tokens_in += t.tokens_in
        self.tokens_out += t.tokens_out
        if self.max_new_tokens and t.tokens_out >= self.max_new_tokens:
            self.full_replies += 1
        ttft = t.token_times[0] - t.intended
        e2e = t.end - t.intended
        self.hist["ttft"].record(ttft)
        self.hist["ttft_from_send"].record(t.token_times[0] - t.sent)
        self.hist["e2e"].record(e2e)
        gap_max = 0.0
        times = t.token_times
        itl = self.hist["itl"]
        for i in range(1, len(times)):
            gap = times[i] - times[i - 1]
            gap_max = max(gap_max, gap)
            itl.record(gap)
        tpot = (t.end - t.token_times[0]) / (t.tokens_out - 1) if t.tokens_out > 1 else None
        if tpot is not None:
            self.hist["tpot"].record(tpot)
        values = {"ttft": ttft, "e2e": e2e, "itl": gap_max, "tpot": tpot or 0.0}
        if all(values[m] <= limit for m, limit in self.limits.items()):
            self.good += 1

    @property
    def elapsed(self) -> float:
        """From the first intended send to the last reply (0 when nothing ran)."""
        return max(self.last_end - self.first_intended, 0.0) if self.requests else 0.0

    def merge(self, other: LoadMetrics) -> None:
        """Add ``other`` in: counts and histogram buckets add, nothing is averaged."""
        for name, h in other.hist.items():
            self.hist.setdefault(name, Histogram()).add(h)
        for name in ("requests", "ok", "good", "full_replies", "tokens_in", "tokens_out", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.update(other.errors)
        self.error_examples.extend(other.error_examples[: max(0, 10 - len(self.error_examples))])
        self.first_intended = min(self.first_intended, other.first_intended)
        self.last_end = max(self.last_end, other.last_end)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (histograms encoded) that :meth:`from_dict` restores exactly.

        ``first_intended``/``last_end`` are clock readings: merge them only
        between processes that share a clock (``time.time``-based in Locust)."""
        return {
            "limits": dict(self.limits),
            "max_new_tokens": self.max_new_tokens,
            "hdr": {name: h.encode() for name, h in self.hist.items()},
            "requests": self.requests,
            "ok": self.ok,
            "good": self.good,
            "full_replies": self.full_replies,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "skipped": self.skipped,
            "errors": dict(self.errors),
            "error_examples": list(self.error_examples),
            "first_intended": self.first_intended if self.requests else None,
            "last_end": self.last_end if self.requests else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadMetrics:
        m = cls(limits=dict(data.get("limits") or {}), max_new_tokens=int(data.get("max_new_tokens") or 0))
        for name, text in (data.get("hdr") or {}).items():
            m.hist[name] = Histogram.decode(text)
        for name in ("requests", "ok", "good", "full_replies", "tokens_in", "tokens_out", "skipped"):
            setattr(m, name, int(data.get(name) or 0))
        m.errors = Counter({str(k): int(v) for k, v in (data.get("errors") or {}).items()})
        m.error_examples = list(data.get("error_examples") or [])
        if data.get("first_intended") is not None:
            m.first_intended = float(data["first_intended"])
            m.last_end = float(data["last_end"])
        return m

    def summary(self) -> dict[str, Any]:
        """The JSON-ready figures: counts, rates over :attr:`elapsed`, percentiles per metric."""
        span = self.elapsed
        per_s = (lambda n: n / span) if span > 0 else (lambda n: math.nan)
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "error_examples": self.error_examples,
            "skipped": self.skipped,
            "error_rate": sum(self.errors.values()) / self.requests if self.requests else 0.0,
            "elapsed_s": span,
            "throughput_rps": per_s(self.ok),
            "goodput_rps": per_s(self.good),
            "good": self.good,
            "tokens_in_per_s": per_s(self.tokens_in),
            "tokens_out_per_s": per_s(self.tokens_out),
            "mean_tokens_out": self.tokens_out / self.ok if self.ok else math.nan,
            "full_replies": self.full_replies,
            "latency": {name: h.summary() for name, h in self.hist.items()},
            "hdr": {name: h.encode() for name, h in self.hist.items()},
        }
