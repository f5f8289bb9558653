"""The three workloads, each written against :class:`~benchmarks.driver.Driver` only.

- **W1 throughput**: S concurrent sessions, T sequential turns each.
- **W2 history scaling**: one conversation grown to each H in turn (pre-filled
  through the driver's fast path), then single-client turns timed at each H.
- **W3 contention**: C concurrent writers on one conv_uid, K turns each.

Every acknowledged turn is written to a :class:`Ledger`, which the audit
checks against what the store holds afterwards. Every turn is bounded by a
timeout and every workload by the run's deadline; a turn that fails or times
out counts as an error, never as a result.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .driver import Driver, TurnText

__all__ = [
    "Ledger",
    "Limits",
    "Timing",
    "run_w1",
    "run_w2",
    "run_w3",
    "summarize",
]

Tick = Callable[[int], None]


@dataclass
class Limits:
    """Bounds every workload respects: a per-turn timeout and a run deadline."""

    turn_timeout: float = 30.0
    deadline: float = float("inf")  # time.monotonic() value

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


@dataclass
class Ledger:
    """Acknowledged turns per conversation: (turn_id or None, user text, session).

    A session's turns are sent one after another, so their stored order must
    follow the order here. Pre-filled turns have an empty text and no session.
    """

    turns: dict[str, list[tuple[str | None, str, object]]] = field(default_factory=dict)

    def add(self, conv_uid: str, turn_id: str | None, text: str, session: object = None) -> None:
        self.turns.setdefault(conv_uid, []).append((turn_id, text, session))

    def conversations(self) -> list[str]:
        return list(self.turns)


@dataclass
class Timing:
    """Latencies of the turns that succeeded, and what went wrong with the rest."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    skipped: int = 0  # not attempted: the deadline passed
    error_examples: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(f"{type(exc).__name__}: {exc}"[:300])


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def summarize(t: Timing) -> dict[str, Any]:
    """The JSON-ready numbers of one timing: counts, rate and percentiles (seconds)."""
    values = sorted(t.latencies)
    ok = len(values)
    return {
        "turns": ok,
        "errors": t.errors,
        "skipped": t.skipped,
        "elapsed_s": t.elapsed,
        "turns_per_s": ok / t.elapsed if t.elapsed > 0 else float("nan"),
        "p50_s": _pct(values, 50),
        "p95_s": _pct(values, 95),
        "p99_s": _pct(values, 99),
        "mean_s": statistics.fmean(values) if values else float("nan"),
        "error_examples": t.error_examples,
    }


async def _timed_turn(
    driver: Driver,
    conv_uid: str,
    text: str,
    timing: Timing,
    ledger: Ledger | None,
    limits: Limits,
    session: object = None,
) -> None:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(limits.turn_timeout):
            ack = await driver.turn(conv_uid, text)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        timing.failed(exc)
        return
    timing.latencies.append(time.perf_counter() - start)
    if ledger is not None:
        ledger.add(ack.conv_uid, ack.turn_id, text, session)


async def _sessions(
    driver: Driver,
    plan: list[tuple[str, list[str]]],
    ledger: Ledger | None,
    limits: Limits,
    tick: Tick,
) -> Timing:
    """Run each (conv_uid, texts) session concurrently, its turns in sequence."""
    timing = Timing()

    async def session(key: int, conv_uid: str, texts: list[str]) -> None:
        for i, text in enumerate(texts):
            if limits.expired():
                timing.skipped += len(texts) - i
                tick(len(texts) - i)
                return
            await _timed_turn(driver, conv_uid, text, timing, ledger, limits, key)
            tick(1)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for key, (conv_uid, texts) in enumerate(plan):
            tg.create_task(session(key, conv_uid, texts))
    timing.elapsed = time.perf_counter() - start
    return timing


async def run_w1(
    driver: Driver,
    *,
    tag: str,
    sessions: int,
    turns: int,
    text: TurnText,
    ledger: Ledger | None,
    limits: Limits,
    tick: Tick = lambda n: None,
) -> dict[str, Any]:
    """W1: ``sessions`` conversations at once, ``turns`` sequential turns each."""
    plan = [(f"{tag}-s{s}", [text.user(f"{tag} s{s} t{t}") for t in range(turns)]) for s in range(sessions)]
    timing = await _sessions(driver, plan, ledger, limits, tick)
    return {"sessions": sessions, "turns_each": turns, **summarize(timing)}


async def run_w3(
    driver: Driver,
    *,
    tag: str,
    writers: int,
    turns: int,
    text: TurnText,
    ledger: Ledger | None,
    limits: Limits,
    tick: Tick = lambda n: None,
) -> dict[str, Any]:
    """W3: ``writers`` concurrent writers on one conv_uid, ``turns`` turns each."""
    conv_uid = f"{tag}-shared"
    plan = [(conv_uid, [text.user(f"{tag} w{w} t{t}") for t in range(turns)]) for w in range(writers)]
    timing = await _sessions(driver, plan, ledger, limits, tick)
    return {"writers": writers, "turns_each": turns, "conv_uid": conv_uid, **summarize(timing)}


async def run_w2(
    driver: Driver,
    *,
    tag: str,
    histories: list[int],
    samples: int,
    warmup: int,
    text: TurnText,
    ledger: Ledger | None,
    limits: Limits,
    tick: Tick = lambda n: None,
    on_prefill: Callable[[int], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """W2: grow one conversation to each H (ascending) and time single turns there.

    The pre-fill goes through :meth:`Driver.prefill` (straight to the store,
    in batches), so reaching H=100,000 takes seconds, not hours. The timed
    turns themselves add ``2 * (warmup + samples)`` messages per H, which is
    why the pre-fill for the next H counts from the real length.
    """
    conv_uid = f"{tag}-history"
    points: list[dict[str, Any]] = []
    stored = 0
    for h in sorted(histories):
        if limits.expired():
            points.append({"history": h, "skipped": True})
            tick(warmup + samples)
            continue
        if h > stored:
            started = time.perf_counter()
            ids = await driver.prefill(conv_uid, stored, h - stored)
            if ledger is not None:
                for turn_id in ids:
                    ledger.add(conv_uid, turn_id, "")
            prefill_s = time.perf_counter() - started
            stored = h
        else:
            prefill_s = 0.0
        if on_prefill is not None:
            await on_prefill(h)
        throwaway = Timing()
        for i in range(warmup):
            await _timed_turn(
                driver, conv_uid, text.user(f"{tag} h{h} warm{i}"), throwaway, ledger, limits, 0
            )
            tick(1)
        timing = Timing(errors=throwaway.errors, error_examples=throwaway.error_examples)
        start = time.perf_counter()
        for i in range(samples):
            if limits.expired():
                timing.skipped += samples - i
                tick(samples - i)
                break
            await _timed_turn(driver, conv_uid, text.user(f"{tag} h{h} t{i}"), timing, ledger, limits, 0)
            tick(1)
        timing.elapsed = time.perf_counter() - start
        stored += 2 * (warmup + samples)
        points.append({"history": h, "prefill_s": prefill_s, **summarize(timing)})
    return {"conv_uid": conv_uid, "samples": samples, "warmup": warmup, "points": points}
