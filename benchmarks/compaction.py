"""What compaction costs: turns/s with it on, as a ratio to off, in one run.

``python -m benchmarks.compaction [--store URL] [--sessions S] [--turns T]
[--window N] [--repeats R]``: S conversations of T turns each, on a window
small enough that rounds leave it early, with the echo model; once without
compaction and once with it (a Compactor over the same storage's
records), alternated R times so both see the same machine load. Reports each
side's median turns/s, the ratio on/off, and how many summaries were made
(on: about one per ``min_rounds`` turns per conversation once the window is
full).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from convcore import Engine, LocalBackend, ModelRegistry, ModelSpec, open_store
from convcore.compaction import Compactor
from convcore.testing import RecordingBackend

__all__ = ["CompactionCost", "main", "measure"]


@dataclass(frozen=True)
class CompactionCost:
    off_turns_per_s: float
    on_turns_per_s: float
    summaries: int
    turns: int

    @property
    def ratio(self) -> float:
        return self.on_turns_per_s / self.off_turns_per_s


async def _once(store_url: str, sessions: int, turns: int, window: int, compact: bool) -> tuple[float, int]:
    backend = RecordingBackend(LocalBackend())
    spec = ModelSpec(name="m", backend=backend, context_window=window, max_new_tokens=64)
    store = open_store(store_url)
    compaction = Compactor(store.records, share=0.3, min_rounds=4, max_new_tokens=96) if compact else None
    engine = Engine(store, ModelRegistry([spec]), compaction=compaction)
    prefix = uuid.uuid4().hex[:8]

    async def session(s: int) -> None:
        for t in range(turns):
            text = f"session {s} turn {t}: tell me about item {t * 13 % 97} and its neighbours"
            await engine.chat({"messages": text, "conv_uid": f"ccc-{prefix}-{s}"})

    try:
        started = time.perf_counter()
        await asyncio.gather(*(session(s) for s in range(sessions)))
        elapsed = time.perf_counter() - started
        for s in range(sessions):
            await engine.delete_conversation(f"ccc-{prefix}-{s}")
    finally:
        await store.aclose()
    made = sum(1 for r in backend.requests if r.purpose == "summary")
    return sessions * turns / elapsed, made


async def measure(
    store_url: str = "memory://", *, sessions: int = 4, turns: int = 60, window: int = 600, repeats: int = 3
) -> CompactionCost:
    """Median turns/s off and on, alternated ``repeats`` times."""
    off: list[float] = []
    on: list[float] = []
    made = 0
    for _ in range(repeats):
        rate, _ = await _once(store_url, sessions, turns, window, compact=False)
        off.append(rate)
        rate, made = await _once(store_url, sessions, turns, window, compact=True)
        on.append(rate)
    return CompactionCost(statistics.median(off), statistics.median(on), made, sessions * turns)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compaction", description=__doc__)
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--window", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    cost = asyncio.run(
        measure(ns.store, sessions=ns.sessions, turns=ns.turns, window=ns.window, repeats=ns.repeats)
    )
    print(
        f"compaction off: {cost.off_turns_per_s:.1f} turns/s; on: {cost.on_turns_per_s:.1f} turns/s; "
        f"ratio on/off {cost.ratio:.2f}; {cost.summaries} summaries in {cost.turns} turns"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
