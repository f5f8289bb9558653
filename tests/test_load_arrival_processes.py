"""Arrival processes and session plans, checked by statistics on generated schedules."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.arrivals import Dist, arrival_times, plan_sessions


def _gaps(process: str, rate: float, n: int = 20_000, burstiness: float = 1.0, seed: int = 7) -> list[float]:
    times = arrival_times(process, rate, n, random.Random(seed), burstiness=burstiness)
    return [b - a for a, b in itertools.pairwise(times)]


def _cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


@pytest.mark.parametrize("rate", [0.5, 10.0, 400.0])
def test_poisson_arrivals_have_the_rate_and_a_cv_of_one(rate: float) -> None:
    gaps = _gaps("poisson", rate)
    # 20,000 exponential gaps: the mean's standard error is 0.7%, the CV's about 1%.
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert _cv(gaps) == pytest.approx(1.0, abs=0.04)
    # Memoryless: about e^-1 of the gaps exceed the mean gap.
    assert sum(g > 1 / rate for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.015)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_keep_the_rate_and_set_the_cv_by_burstiness(burstiness: float) -> None:
    gaps = _gaps("gamma", 20.0, burstiness=burstiness)
    assert statistics.fmean(gaps) == pytest.approx(1 / 20.0, rel=0.04)
    assert _cv(gaps) == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_burstier_gamma_clusters_arrivals_more_than_poisson() -> None:
    """Counts per window: variance/mean is 1 for Poisson, larger for bursty arrivals."""

    def dispersion(process: str, burstiness: float) -> float:
        times = arrival_times(process, 50.0, 20_000, random.Random(3), burstiness=burstiness)
        counts = [0] * (int(times[-1]) + 1)
        for t in times:
            counts[int(t)] += 1
        return statistics.pvariance(counts) / statistics.fmean(counts)

    assert dispersion("poisson", 1.0) == pytest.approx(1.0, abs=0.3)
    assert dispersion("gamma", 0.2) > 3 * dispersion("poisson", 1.0)


def test_constant_arrivals_are_evenly_spaced() -> None:
    gaps = _gaps("constant", 8.0, n=1000)
    assert max(gaps) == pytest.approx(0.125) and min(gaps) == pytest.approx(0.125)


def test_a_plan_is_reproducible_from_its_seed_and_follows_its_distributions() -> None:
    kw = {
        "rate": 5.0,
        "count": 3000,
        "process": "poisson",
        "turns": Dist.parse("uniform:2,6"),
        "think": Dist.parse("exp:1.5"),
        "input_words": Dist.parse("normal:50,10"),
    }
    a, b, c = plan_sessions(seed=1, **kw), plan_sessions(seed=1, **kw), plan_sessions(seed=2, **kw)
    assert [(p.start, p.input_words, p.think) for p in a] == [(p.start, p.input_words, p.think) for p in b]
    assert [p.start for p in a] != [p.start for p in c]
    turns = [len(p.input_words) for p in a]
    assert min(turns) == 2 and max(turns) == 6 and statistics.fmean(turns) == pytest.approx(4, abs=0.1)
    assert all(p.think[0] == 0 for p in a)
    thinks = [t for p in a for t in p.think[1:]]
    assert statistics.fmean(thinks) == pytest.approx(1.5, rel=0.05)
    words = [w for p in a for w in p.input_words]
    assert statistics.fmean(words) == pytest.approx(50, abs=1) and min(words) >= 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("poisson:3", "unknown distribution"),
        ("uniform:5", "takes 2 parameters"),
        ("uniform:5,1", "LO <= HI"),
        ("exp:-1", "non-negative"),
        ("const:x", "must be numbers"),
        ("exp:nan", "finite"),
    ],
)
def test_bad_distributions_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Dist.parse(text)


def test_bad_arrival_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown arrival process"):
        arrival_times("bursty", 1.0, 3, random.Random(1))
    with pytest.raises(ValueError, match="rate must be"):
        arrival_times("poisson", 0.0, 3, random.Random(1))
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times("gamma", 1.0, 3, random.Random(1), burstiness=0)


@settings(max_examples=60, deadline=None)
@given(
    process=st.sampled_from(["poisson", "gamma", "constant"]),
    rate=st.floats(0.01, 10_000),
    count=st.integers(0, 300),
    burstiness=st.floats(0.05, 20),
    seed=st.integers(0, 2**32),
)
def test_schedules_start_at_zero_and_never_go_back(
    process: str, rate: float, count: int, burstiness: float, seed: int
) -> None:
    times = arrival_times(process, rate, count, random.Random(seed), burstiness=burstiness)
    assert len(times) == count
    assert not times or times[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(times))


@settings(max_examples=60, deadline=None)
@given(text=st.sampled_from(["3", "const:0", "uniform:0,4", "exp:2", "normal:1,5", "lognormal:2,1"]))
def test_samples_are_never_negative(text: str) -> None:
    rng = random.Random(0)
    dist = Dist.parse(text)
    assert all(dist.sample(rng) >= 0 for _ in range(200))
    assert str(Dist.parse(str(dist))) == str(dist)
