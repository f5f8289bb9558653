"""SLOs: parsing ``--slo``, pass/fail verdicts on measured percentiles, goodput per
request, and the knee of a sweep."""

from __future__ import annotations

import pytest

from benchmarks.hdr import LoadMetrics, TurnOutcome
from benchmarks.slo import Slo, knee, limits_of, verdict


def _turn(ttft: float, gap: float = 0.01, tokens: int = 5, start: float = 100.0) -> TurnOutcome:
    times = [start + ttft + i * gap for i in range(tokens)]
    return TurnOutcome(intended=start, sent=start, token_times=times, end=times[-1], tokens_out=tokens)


def _metrics(ttfts: list[float], slos: list[Slo], errors: int = 0) -> LoadMetrics:
    m = LoadMetrics(limits=limits_of(slos))
    for t in ttfts:
        m.record(_turn(t))
    for _ in range(errors):
        m.record(TurnOutcome(intended=100.0, sent=100.0, end=100.1, error="http_503", detail="busy"))
    return m


def test_slos_parse_from_the_command_line_form() -> None:
    assert Slo.parse("ttft_p99=0.5") == Slo("ttft", 99.0, 0.5)
    assert Slo.parse("e2e_p95=5") == Slo("e2e", 95.0, 5.0)
    assert Slo.parse("ITL_P99.9=0.2s") == Slo("itl", 99.9, 0.2)
    assert Slo.parse("error_rate=0.01") == Slo("error_rate", None, 0.01)
    assert str(Slo.parse("tpot_p50=0.05")) == "tpot_p50<=0.05"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttft=0.5", "which percentile"),
        ("latency_p99=1", "unknown metric"),
        ("ttft_p99=fast", "number of seconds"),
        ("ttft_p100=1", "between 0 and 100"),
        ("ttft_p99=-1", "non-negative"),
        ("error_rate=2", "between 0 and 1"),
        ("ttft_p99", "METRIC_pQ=SECONDS"),
    ],
)
def test_bad_slos_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Slo.parse(text)


def test_a_percentile_slo_passes_and_fails_on_the_measured_value() -> None:
    slos = [Slo.parse("ttft_p99=0.5"), Slo.parse("e2e_p50=1")]
    # 99 fast requests and one slow: p99 is still fast; two slow ones put p99 over.
    ok = verdict(_metrics([0.1] * 99 + [2.0], slos).summary(), slos)
    bad = verdict(_metrics([0.1] * 98 + [2.0] * 2, slos).summary(), slos)
    assert ok["passed"] is True and [c["met"] for c in ok["checks"]] == [True, True]
    assert bad["passed"] is False and bad["checks"][0]["value"] == pytest.approx(2.0, rel=0.001)
    assert bad["checks"][1]["met"] is True


def test_goodput_counts_only_requests_within_every_limit() -> None:
    slos = [Slo.parse("ttft_p90=0.5"), Slo.parse("e2e_p90=0.6")]
    m = _metrics([0.1] * 6 + [0.55] * 2 + [0.7] * 2, slos, errors=2)
    # ttft 0.55 passes neither 0.5; e2e 0.1+0.04 is within 0.6 for the fast ones.
    assert m.good == 6 and m.ok == 10 and m.requests == 12
    s = m.summary()
    assert s["goodput_rps"] == pytest.approx(s["throughput_rps"] * 6 / 10)


def test_itl_limits_judge_a_request_by_its_largest_gap() -> None:
    m = LoadMetrics(limits=limits_of([Slo.parse("itl_p99=0.05")]))
    m.record(_turn(0.1, gap=0.01))
    slow = _turn(0.1, gap=0.01)
    slow.token_times[3] += 0.2
    slow.token_times[4] += 0.2
    slow.end = slow.token_times[-1]
    m.record(slow)
    assert m.good == 1


def test_an_error_rate_slo_fails_on_errors_and_no_data_fails_a_latency_slo() -> None:
    slos = [Slo.parse("error_rate=0.1")]
    assert verdict(_metrics([0.1] * 9, slos, errors=1).summary(), slos)["passed"] is True
    assert verdict(_metrics([0.1] * 8, slos, errors=2).summary(), slos)["passed"] is False
    latency = [Slo.parse("ttft_p50=1")]
    nothing = verdict(_metrics([], latency, errors=3).summary(), latency)
    assert nothing["passed"] is False and nothing["checks"][0]["value"] is None


def test_no_slos_means_no_verdict() -> None:
    assert verdict(_metrics([0.1], []).summary(), []) == {"passed": None, "checks": []}


def _step(rate: float, passed: bool | None) -> dict[str, object]:
    return {
        "rate": rate,
        "verdict": {"passed": passed},
        "summary": {"goodput_rps": rate, "throughput_rps": rate},
    }


def test_the_knee_is_the_highest_rate_with_every_lower_rate_passing() -> None:
    steps = [_step(r, p) for r, p in [(8, False), (1, True), (2, True), (4, True)]]
    k = knee(steps)
    assert k is not None and k["rate"] == 4 and k["first_failing_rate"] == 8
    # A pass above a failure is noise past the knee, not a higher knee.
    k = knee([_step(1, True), _step(2, False), _step(4, True)])
    assert k is not None and k["rate"] == 1 and k["passed_again_above"] == [4]
    k = knee([_step(1, False), _step(2, False)])
    assert k is not None and k["rate"] is None and k["first_failing_rate"] == 1
    assert knee([_step(1, None)]) is None
