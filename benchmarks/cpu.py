"""Where a workload's CPU went: the load process, the server's processes, everyone else.

On a shared machine a throughput figure alone cannot say who was short of a
core: the server, the load generator beside it, or other jobs. Each W1 row
of an HTTP target therefore carries, for the floor and for the target, the
CPU milliseconds per turn of this (load) process and of the server's
process tree (every ``--workers`` process included), and how many of the
machine's cores were busy meanwhile, all read from the OS.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["CpuMark", "cpu_mark", "cpu_spent", "server_cpu_seconds"]


def server_cpu_seconds(owner: Any) -> float | None:
    """CPU seconds used so far by ``owner.server``'s process and its children
    (uvicorn's worker processes), or None when there is no server process here."""
    proc = getattr(getattr(owner, "server", None), "proc", None)
    if proc is None:
        return None
    try:
        import psutil

        root = psutil.Process(proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                times = p.cpu_times()
            except psutil.Error:
                continue  # a worker that just exited
            total += times.user + times.system
        return total
    except Exception:
        return None


def _machine_busy() -> float | None:
    """Seconds all cores together have been busy since boot (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuMark:
    wall: float
    load: float
    server: float | None
    machine: float | None


def cpu_mark(owner: Any) -> CpuMark:
    """The clocks now, for :func:`cpu_spent` after the workload."""
    return CpuMark(time.perf_counter(), time.process_time(), server_cpu_seconds(owner), _machine_busy())


def cpu_spent(before: CpuMark, after: CpuMark, turns: int) -> dict[str, float | None]:
    """CPU ms per turn of the load process and of the server; busy cores of the whole machine."""
    wall = max(after.wall - before.wall, 1e-9)
    per = 1000 / max(turns, 1)
    server = (
        (after.server - before.server) * per
        if after.server is not None and before.server is not None
        else None
    )
    busy = (
        (after.machine - before.machine) / wall
        if after.machine is not None and before.machine is not None
        else None
    )
    return {
        "load_ms_per_turn": round((after.load - before.load) * per, 3),
        "server_ms_per_turn": None if server is None else round(server, 3),
        "machine_busy_cores": None if busy is None else round(busy, 2),
        "cores": os.cpu_count(),
    }
