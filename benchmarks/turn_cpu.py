"""CPU time of one library turn, tree against tree, and where it goes.

W1 through the library on a store (the memory store unless ``--store``
names another; S sessions × T turns, the local echo model, no latency): the
process's CPU time (``time.process_time``) over the run divided by the
turns, so the figure is what a turn costs the engine, the store's client
and the model, not how long it waited (a database server's own CPU is not
in it). Each source tree
given (``--tree``, e.g. a ``git archive`` of an older commit, and the tree
this file is in) runs in a process of its own; trees take turns, round by
round, so they see the same machine load. ``--profile`` adds one profiled
run per tree: cProfile's own time per function, grouped by module, in µs a
turn (the profiler roughly doubles them). It is the event loop thread's CPU
time, so waiting on a driver's thread or the network costs nothing there,
and the drivers' threads' own work is not in it.

    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/turn_cpu.py --tree /tmp/before --tree . --rounds 3 --profile
    python benchmarks/turn_cpu.py --tree /tmp/before --tree . --store redis://127.0.0.1:6379/0
    python benchmarks/turn_cpu.py --tree /tmp/before --tree . --rounds 0 --sessions 32 --instructions
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def _child(tree: str, store: str, sessions: int, turns: int, repeats: int, profile: bool) -> dict[str, Any]:
    """In the child process: run W1 on ``tree``'s code ``repeats`` times,
    return the least µs of CPU a turn (what other load on the machine added
    least to)."""
    sys.path[:0] = [tree, str(Path(tree) / "adapters")]  # its core and its adapters
    import asyncio
    import cProfile
    import pstats
    import time

    from benchmarks.driver import TurnText
    from benchmarks.namespaces import Namespace
    from benchmarks.targets import LibraryTarget
    from benchmarks.workloads import Limits, run_w1

    async def run(tag: str) -> tuple[float, int]:
        namespace = Namespace()
        try:
            async with LibraryTarget(store, namespace=namespace, text=TurnText()) as target:
                cpu0 = time.process_time()
                result = await run_w1(
                    target,
                    tag=tag,
                    sessions=sessions,
                    turns=turns,
                    text=TurnText(),
                    ledger=None,
                    limits=Limits(),
                )
                cpu = time.process_time() - cpu0
        finally:
            await namespace.cleanup(store)  # the run's tables or keys, not left in the database
        if result["errors"]:
            raise SystemExit(f"turns failed: {result['error_examples']}")
        return cpu, result["turns"]

    asyncio.run(run("warm"))  # tokenizer loaded, code paths warm
    per_turn = []
    for i in range(repeats):
        cpu, done = asyncio.run(run(f"timed{i}"))
        per_turn.append(1e6 * cpu / done)
    out: dict[str, Any] = {"us_per_turn": min(per_turn), "runs": per_turn}
    if profile:
        profiler = cProfile.Profile(time.thread_time)  # CPU, not wall-clock time waiting counted as cost
        profiler.enable()
        _, done = asyncio.run(run("profiled"))
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        by_module: dict[str, float] = {}
        for (path, _line, func), (_cc, _nc, own, _cum, _callers) in stats.items():
            by_module[_module_of(path, func)] = by_module.get(_module_of(path, func), 0.0) + own
        out["profile_us"] = {k: 1e6 * v / done for k, v in sorted(by_module.items(), key=lambda kv: -kv[1])}
    return out


def _module_of(path: str, func: str) -> str:
    """``convcore/engine.py`` for the project's modules, the package for others."""
    p = Path(path)
    for anchor in ("convcore", "benchmarks"):
        if anchor in p.parts[:-1]:
            i = len(p.parts) - 1 - p.parts[::-1].index(anchor)
            return "/".join(p.parts[i:])
    if "site-packages" in p.parts:
        return p.parts[p.parts.index("site-packages") + 1].removesuffix(".py")
    if path == "~":
        return f"builtins: {func}"
    return p.stem if p.suffix else path


def _measure(tree: str, store: str, sessions: int, turns: int, repeats: int, profile: bool) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", tree, "--store", store]
    argv += ["--sessions", str(sessions), "--turns", str(turns)]
    argv += ["--repeats", str(repeats)]
    out = subprocess.run(
        [*argv, *(["--profile"] if profile else [])], check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _instructions(tree: str, store: str, sessions: int, turns: int) -> float:
    """Instructions a turn, counted by valgrind's callgrind: a count that a
    busy machine does not change, unlike CPU time. Two runs, of ``turns``
    and of 3 × ``turns`` turns a session, so that starting the process and
    its warm-up cancel out; each process runs W1 twice (warm-up, timed)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt install valgrind)")
    counts = []
    for t in (turns, 3 * turns):
        argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
        argv += ["--child", tree, "--store", store, "--sessions", str(sessions), "--turns", str(t)]
        argv += ["--repeats", "1"]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
        found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
        if found is None:
            raise SystemExit(f"valgrind printed no instruction count:\n{out.stderr[-2000:]}")
        counts.append(int(found.group(1).replace(",", "")))
    return (counts[1] - counts[0]) / (2 * sessions * 2 * turns)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], help="a source tree to measure (repeat)")
    p.add_argument(
        "--store", default="memory://", help="the store's URL (each run in a namespace of its own)"
    )
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="processes per tree, alternating")
    p.add_argument("--repeats", type=int, default=5, help="W1 runs per process; the least CPU counts")
    p.add_argument("--profile", action="store_true", help="one profiled run per tree, grouped by module")
    p.add_argument("--top", type=int, default=14, help="modules shown per profile")
    p.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions a turn under valgrind (the same on a busy machine; slow)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(
            json.dumps(
                _child(
                    str(Path(args.child).resolve()),
                    args.store,
                    args.sessions,
                    args.turns,
                    args.repeats,
                    args.profile,
                )
            )
        )
        return 0
    trees = [str(Path(t).resolve()) for t in args.tree or ["."]]
    runs: dict[str, list[float]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in trees:
            us = _measure(tree, args.store, args.sessions, args.turns, args.repeats, False)["us_per_turn"]
            runs[tree].append(us)
            print(f"round {r + 1}  {tree}: {us:.1f} µs CPU a turn", flush=True)
    base = statistics.median(runs[trees[0]]) if args.rounds else 0.0
    for tree in trees if args.rounds else ():
        med = statistics.median(runs[tree])
        print(f"{tree}: median {med:.1f} µs a turn, {med / base:.2f}× the first tree")
    if args.instructions:
        first = None
        for tree in trees:
            ir = _instructions(tree, args.store, args.sessions, args.turns)
            first = first or ir
            print(f"{tree}: {ir / 1e6:.3f} million instructions a turn, {ir / first:.2f}× the first tree")
    if args.profile:
        for tree in trees:
            prof = _measure(tree, args.store, args.sessions, args.turns, 1, True)["profile_us"]
            total = sum(prof.values())
            print(f"\nprofile of {tree} (µs a turn under cProfile, total {total:.0f}):")
            for name, us in list(prof.items())[: args.top]:
                print(f"  {us:7.1f}  {100 * us / total:4.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
