"""When sessions arrive and what they send: arrival processes, distributions, session plans.

Arrivals are open-loop: a schedule of start times fixed before the run, so a
slow server cannot slow the load down (a closed loop would, and hide the
queueing). Three processes:

- ``poisson``: exponential gaps, the memoryless arrivals of independent users;
- ``gamma``: gamma gaps with shape ``burstiness`` (1 is Poisson, below 1 is
  burstier, above 1 smoother); the gaps' coefficient of variation is
  ``1 / sqrt(burstiness)``, the convention vLLM's ``benchmark_serving`` uses;
- ``constant``: one session every ``1 / rate`` seconds.

Think times, turn counts and input lengths are :class:`Dist` values written
``3``, ``const:3``, ``uniform:1,5``, ``exp:2``, ``normal:40,10`` or
``lognormal:40,0.5`` (median and sigma). A plan is generated from a seed, so
the same arguments give the same load.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

__all__ = ["ARRIVALS", "Dist", "SessionPlan", "arrival_times", "plan_sessions"]

ARRIVALS = ("poisson", "gamma", "constant")


@dataclass(frozen=True)
class Dist:
    """A distribution of non-negative values, sampled with the caller's ``random.Random``."""

    kind: str
    a: float
    b: float = 0.0

    _KINDS = ("const", "uniform", "exp", "normal", "lognormal")

    @classmethod
    def parse(cls, text: str) -> Dist:
        """``3`` or ``const:3``, ``uniform:LO,HI``, ``exp:MEAN``, ``normal:MEAN,SD``,
        ``lognormal:MEDIAN,SIGMA``; ValueError naming what is wrong."""
        kind, _, args = text.strip().partition(":")
        if not args:
            kind, args = "const", kind
        kind = kind.lower()
        if kind not in cls._KINDS:
            raise ValueError(f"unknown distribution {kind!r}: use {', '.join(cls._KINDS)}")
        try:
            values = [float(v) for v in args.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{text!r}: parameters must be numbers") from None
        wanted = 1 if kind in ("const", "exp") else 2
        if len(values) != wanted:
            raise ValueError(f"{text!r}: {kind} takes {wanted} parameter{'s' if wanted > 1 else ''}")
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"{text!r}: parameters must be finite and non-negative")
        if kind == "uniform" and values[1] < values[0]:
            raise ValueError(f"{text!r}: uniform needs LO <= HI")
        return cls(kind, values[0], values[1] if wanted == 2 else 0.0)

    def sample(self, rng: random.Random) -> float:
        if self.kind == "const":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1 / self.a) if self.a > 0 else 0.0
        if self.kind == "normal":
            return max(0.0, rng.gauss(self.a, self.b))
        return self.a * math.exp(rng.gauss(0.0, self.b)) if self.a > 0 else 0.0

    @property
    def mean(self) -> float:
        """The mean before clipping at zero (what a reader of the report expects)."""
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        if self.kind == "lognormal":
            return self.a * math.exp(self.b**2 / 2)
        return self.a

    def __str__(self) -> str:
        if self.kind in ("const", "exp"):
            return f"{self.kind}:{self.a:g}"
        return f"{self.kind}:{self.a:g},{self.b:g}"


def arrival_times(
    process: str, rate: float, count: int, rng: random.Random, *, burstiness: float = 1.0
) -> list[float]:
    """Start offsets (seconds from 0) of ``count`` sessions arriving at ``rate`` per second.

    The first session starts at 0; the gaps follow ``process``."""
    if process not in ARRIVALS:
        raise ValueError(f"unknown arrival process {process!r}: use {', '.join(ARRIVALS)}")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number, not {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, not {burstiness}")
    times = [0.0]
    t = 0.0
    for _ in range(count - 1):
        if process == "constant":
            gap = 1 / rate
        elif process == "poisson":
            gap = rng.expovariate(rate)
        else:
            gap = rng.gammavariate(burstiness, 1 / (rate * burstiness))
        t += gap
        times.append(t)
    return times[: max(count, 0)]


@dataclass
class SessionPlan:
    """One session: when it arrives, and per turn the input words and the think time before it."""

    index: int
    start: float
    input_words: list[int] = field(default_factory=list)
    think: list[float] = field(default_factory=list)  # think[0] is 0: the first turn goes at ``start``


def plan_sessions(
    *,
    rate: float,
    count: int,
    process: str,
    turns: Dist,
    think: Dist,
    input_words: Dist,
    seed: int,
    burstiness: float = 1.0,
) -> list[SessionPlan]:
    """``count`` sessions arriving at ``rate``, each with its turns drawn from the distributions."""
    rng = random.Random(seed)
    starts = arrival_times(process, rate, count, rng, burstiness=burstiness)
    plans = []
    for i, start in enumerate(starts):
        n = max(1, round(turns.sample(rng)))
        words = [max(1, round(input_words.sample(rng))) for _ in range(n)]
        pauses = [0.0, *(think.sample(rng) for _ in range(n - 1))]
        plans.append(SessionPlan(i, start, words, pauses))
    return plans
