"""Open-loop multi-turn sessions: the schedule decides when, never the server.

Sessions start at the times their plan says, whether or not earlier ones
have finished. Within a session a user reads the reply and thinks, so turn
*k+1* is meant to go ``think`` seconds after turn *k*'s reply arrived. Every
latency is measured from that *intended* time, not from when the request
actually left: if the event loop was late, or a connection had to be waited
for, the wait counts, so a saturated client or server cannot hide its
queueing (coordinated omission). The lateness itself is kept as
``send_lag``, and the rate the sessions really started at is reported next
to the one asked for.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from .arrivals import SessionPlan
from .driver import TurnText
from .hdr import LoadMetrics, TurnOutcome
from .timing import sleep_until
from .workloads import Ledger

__all__ = ["Streamer", "rate_of", "run_open_loop"]

_EARLY = 0.005  # seconds a session's task is created before its first turn is due


class Streamer(Protocol):
    async def turn(self, conv_uid: str, text: str, outcome: TurnOutcome) -> None: ...


def rate_of(times: list[float]) -> float:
    """Events per second over the span of ``times`` (n-1 gaps); NaN with fewer than two."""
    if len(times) < 2:
        return math.nan
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else math.inf


async def run_open_loop(
    streamer: Streamer,
    plans: list[SessionPlan],
    *,
    tag: str,
    metrics: LoadMetrics,
    ledger: Ledger | None = None,
    drain: float = 60.0,
    max_concurrency: int | None = None,
    lead: float = 0.05,
    spin: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Run ``plans`` against ``streamer``; what the schedule did (the metrics fill ``metrics``).

    Turns whose intended time falls more than ``drain`` seconds after the
    last session's arrival are skipped (counted, not run), which bounds the
    step. ``max_concurrency`` caps requests in flight; a turn waiting for a
    slot is late, and its latency says so. ``spin`` (seconds) trades CPU for
    sends on time to the microsecond (see :mod:`benchmarks.timing`)."""
    t0 = clock() + lead
    last_arrival = t0 + (plans[-1].start if plans else 0.0)
    deadline = last_arrival + drain
    first_sends: list[float] = []
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    cpu0 = time.process_time()

    async def session(plan: SessionPlan) -> None:
        conv_uid = f"{tag}-s{plan.index}"
        intended = last_end = t0 + plan.start
        for k, words in enumerate(plan.input_words):
            if k:
                intended = last_end + plan.think[k]
            if intended > deadline:
                metrics.skipped += len(plan.input_words) - k
                return
            await sleep_until(intended, clock=clock, spin=spin)
            text = TurnText(input_words=words).user(f"{tag} s{plan.index} t{k}")
            outcome = TurnOutcome(intended=intended)
            if slots is None:
                await streamer.turn(conv_uid, text, outcome)
            else:
                async with slots:
                    await streamer.turn(conv_uid, text, outcome)
            if k == 0:
                first_sends.append(outcome.sent)
            metrics.record(outcome)
            if outcome.error is None and ledger is not None:
                ledger.add(outcome.conv_uid or conv_uid, outcome.turn_id, text, plan.index)
            last_end = outcome.end

    async with asyncio.TaskGroup() as tg:
        for plan in plans:
            # Start the task a little early; it sleeps to its own intended time,
            # so creating it is not part of its send lag.
            delay = t0 + plan.start - _EARLY - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tg.create_task(session(plan))
    cpu = time.process_time() - cpu0
    scheduled = [p.start for p in plans]
    return {
        "sessions": len(plans),
        "turns_planned": sum(len(p.input_words) for p in plans),
        "scheduled_rate": rate_of(scheduled),
        "achieved_rate": rate_of(first_sends),
        # How closely the sends followed the schedule (a random schedule's own rate varies).
        "achieved_vs_scheduled": rate_of(first_sends) / rate_of(scheduled) if len(plans) > 1 else math.nan,
        "arrival_span_s": scheduled[-1] if scheduled else 0.0,
        "client_cpu_s": cpu,
        "client_cpu_per_request_ms": 1000 * cpu / metrics.requests if metrics.requests else math.nan,
    }
