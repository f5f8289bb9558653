"""Histograms from several processes (Locust workers) merge exactly: the merged
percentiles are those of all samples together, not an average of each
process's percentiles; counts, errors, sessions and audit damage add up."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks.hdr import Histogram, LoadMetrics, TurnOutcome
from benchmarks.locustmerge import LocustTally
from benchmarks.slo import Slo, limits_of


def _turn(ttft: float, start: float) -> TurnOutcome:
    times = [start + ttft + 0.01 * i for i in range(3)]
    return TurnOutcome(
        intended=start, sent=start, token_times=times, end=times[-1], tokens_out=3, tokens_in=7
    )


def _over_the_wire(payload: dict[str, object]) -> dict[str, object]:
    """What Locust's messaging would carry: plain data only."""
    return json.loads(json.dumps(payload))  # type: ignore[no-any-return]


def test_merged_percentiles_are_those_of_all_samples_not_an_average() -> None:
    rng = random.Random(4)
    fast = [rng.uniform(0.01, 0.02) for _ in range(900)]  # worker A: a quiet machine
    slow = [rng.uniform(0.5, 1.0) for _ in range(100)]  # worker B: an overloaded one
    a, b, together = Histogram(), Histogram(), Histogram()
    for v in fast:
        a.record(v)
        together.record(v)
    for v in slow:
        b.record(v)
        together.record(v)
    merged = Histogram.decode(a.encode())
    merged.add(Histogram.decode(b.encode()))
    for q in (50, 90, 95, 99, 99.9):
        assert merged.percentile(q) == together.percentile(q)
    averaged_p95 = (a.percentile(95) + b.percentile(95)) / 2
    assert merged.percentile(95) > 0.5 > averaged_p95, "the slow tail is in the merged p95"
    assert merged.percentile(50) == pytest.approx(sorted(fast + slow)[499], rel=0.001)


def test_workers_payloads_merge_into_one_tally_on_the_master() -> None:
    slos = [Slo.parse("ttft_p99=0.2")]
    workers = [LocustTally(limits=limits_of(slos), max_new_tokens=3) for _ in range(3)]
    single = LoadMetrics(limits=limits_of(slos), max_new_tokens=3)
    master = LocustTally(limits=limits_of(slos), max_new_tokens=3)
    rng = random.Random(9)
    for report in range(2):  # two report intervals
        for w, tally in enumerate(workers):
            for i in range(50):
                start = 1000.0 + report * 10 + w + i * 0.01
                t = _turn(rng.choice([0.05, 0.1, 0.3]) * (w + 1), start)
                tally.metrics.record(t)
                single.record(t)
                if i % 5 == 0:
                    tally.session_started(start)
            if w == 1 and report == 1:
                tally.metrics.record(TurnOutcome(intended=1.0e3, sent=1.0e3, end=1.0e3 + 1, error="timeout"))
                tally.audit.update({"conversations": 4, "acknowledged": 12, "lost": 1})
            master.absorb(_over_the_wire(tally.payload()))
    m = master.metrics
    assert m.requests == 301 and m.ok == 300 and m.good == single.good and dict(m.errors) == {"timeout": 1}
    for name in ("ttft", "itl", "tpot", "e2e"):
        for q in (50, 90, 99, 99.9):
            assert m.hist[name].percentile(q) == single.hist[name].percentile(q)
    assert master.starts == 60 and master.audit["lost"] == 1
    for tally in workers:  # each payload took what it shipped: nothing is counted twice
        assert tally.metrics.requests == 0 and tally.starts == 0 and not tally.audit
    step = master.step(6.0, slos)
    assert step["audit"]["status"] == "FAILED" and step["summary"]["tokens_out_per_s"] > 0
    record = master.record(host="http://h", rate=6.0, slos=slos, settings={}, env={})
    assert record["exit_code"] == 1, "damage found by any worker fails the merged run"


def test_an_empty_payload_changes_nothing() -> None:
    master = LocustTally()
    master.absorb(_over_the_wire(LocustTally().payload()))
    assert master.metrics.requests == 0 and master.starts == 0
    assert master.metrics.summary()["latency"]["ttft"] == {"count": 0}


def test_metrics_survive_the_round_trip_exactly() -> None:
    m = LoadMetrics(limits={"ttft": 0.1}, max_new_tokens=3)
    for i in range(20):
        m.record(_turn(0.02 * i, 50.0 + i))
    back = LoadMetrics.from_dict(_over_the_wire(m.to_dict()))
    assert back.summary() == m.summary()
