"""Peak memory of the processes a run used, read from the OS.

The load process's peak (``ru_maxrss``) is a high-water mark for the whole
process so far, so a later target in one run includes the earlier ones;
a ``convcore serve`` target's server is measured on its own (Linux
``VmHWM``), and that is the figure that describes the service.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

__all__ = ["peak_memory"]


def _server_peak_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        return None
    return None


def peak_memory(target: Any) -> dict[str, float | None]:
    """``{"load_process_peak_mb", "server_peak_mb"}`` for ``target`` now."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_mb = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    server = getattr(target, "server", None)
    proc = getattr(server, "proc", None)
    return {
        "load_process_peak_mb": round(load_mb, 1),
        "server_peak_mb": _server_peak_mb(proc.pid) if proc is not None else None,
    }
