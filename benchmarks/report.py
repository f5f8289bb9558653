"""What people see: a progress bar during the run, a summary table after it,
one JSON object per run (environment and versions included) and PNG plots.

Figures are ratios to the floor measured in the same run: ``throughput``
is target/floor turns per second (1.0 = as fast as the floor), latency
ratios are target/floor (1.0 = no slower). W2's ``scaling`` is the target's
median at the largest H over its median at the smallest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "Reporter",
    "annotate",
    "cpu_line",
    "damage_text",
    "environment",
    "fmt_ms",
    "json_safe",
    "verdicts",
]

_PACKAGES = [
    "convcore",
    "pydantic",
    "tiktoken",
    "redis",
    "sqlalchemy",
    "sqlmodel",
    "aiosqlite",
    "asyncpg",
    "aiomysql",
    "httpx",
    "fastapi",
    "starlette",
    "uvicorn",
    "sse-starlette",
    "rich",
    "matplotlib",
    "locust",
    "hdrhistogram",
    "psutil",
]


def environment() -> dict[str, Any]:
    """Where the run happened: machine, Python and the versions that matter."""
    versions = {}
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    commit = None
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = list(os.getloadavg())
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": load,
        "git_commit": commit,
        "versions": versions,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def annotate(record: dict[str, Any]) -> None:
    """Add ratios to the floor (and W2's scaling) to every result in ``record``."""
    for t in record["targets"]:
        for row in t.get("w1", []):
            tg, fl = row.get("target"), row.get("floor")
            if tg and fl:
                row["ratio"] = {
                    "throughput": _ratio(tg["turns_per_s"], fl["turns_per_s"]),
                    "p50": _ratio(tg["p50_s"], fl["p50_s"]),
                    "p95": _ratio(tg["p95_s"], fl["p95_s"]),
                    "p99": _ratio(tg["p99_s"], fl["p99_s"]),
                }
        w2 = t.get("w2")
        if w2:
            for role in ("target", "floor"):
                pts = [p for p in w2.get(role, {}).get("points", []) if not p.get("skipped")]
                if len(pts) >= 2:
                    w2.setdefault("scaling", {})[role] = {
                        "from_h": pts[0]["history"],
                        "to_h": pts[-1]["history"],
                        "median": _ratio(pts[-1]["p50_s"], pts[0]["p50_s"]),
                        "p95": _ratio(pts[-1]["p95_s"], pts[0]["p95_s"]),
                    }
            if "floor" in w2 and "target" in w2:
                floor_at = {p["history"]: p for p in w2["floor"]["points"] if not p.get("skipped")}
                for p in w2["target"]["points"]:
                    f = floor_at.get(p["history"])
                    if f and not p.get("skipped"):
                        p["ratio"] = {
                            "median": _ratio(p["p50_s"], f["p50_s"]),
                            "p95": _ratio(p["p95_s"], f["p95_s"]),
                        }
        w3 = t.get("w3")
        if w3 and "floor" in w3 and "target" in w3:
            w3["ratio"] = {
                "throughput": _ratio(w3["target"]["turns_per_s"], w3["floor"]["turns_per_s"]),
                "p50": _ratio(w3["target"]["p50_s"], w3["floor"]["p50_s"]),
            }


# W1 at S=64: throughput ÷ the floor of the same run, at least this much (see benchmarks/README.md).
W1_GOALS = {"redis": 0.6, "postgresql": 0.7, "sqlite": 1.5}
HTTP_W1_GOAL = 0.5  # ÷ the minimal ASGI app
W2_GOAL = 1.1  # median at the largest H ÷ at the smallest


def _goal_row(name: str, value: float | None, goal: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "met": met}


def verdicts(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance goals, checked wherever this run measured them."""
    out: list[dict[str, Any]] = []
    for t in record["targets"]:
        store = t.get("store") or ""
        kind = _database_of(store)
        w1_64 = [r for r in t.get("w1", []) if r["sessions"] == 64 and r.get("ratio")]
        if t.get("kind") == "library" and kind in W1_GOALS:
            for row in w1_64:
                value = row["ratio"]["throughput"]
                goal = W1_GOALS[kind]
                out.append(
                    _goal_row(
                        f"W1 S=64 turns/s ÷ floor, {t['name']}",
                        value,
                        f">= {goal}",
                        value is not None and value >= goal,
                    )
                )
        if t.get("kind") == "http":
            for row in w1_64:
                value = row["ratio"]["throughput"]
                out.append(
                    _goal_row(
                        f"HTTP W1 64 clients turns/s ÷ minimal ASGI app, {t['name']}",
                        value,
                        f">= {HTTP_W1_GOAL}",
                        value is not None and value >= HTTP_W1_GOAL,
                    )
                )
        scaling = t.get("w2", {}).get("scaling", {}).get("target")
        if scaling:
            value = scaling["median"]
            out.append(
                _goal_row(
                    f"W2 median H={scaling['to_h']:,} ÷ H={scaling['from_h']:,}, {t['name']}",
                    value,
                    f"<= {W2_GOAL}",
                    value is not None and value <= W2_GOAL,
                )
            )
        if "w3" in t and "audit" in t:
            out.append(
                _goal_row(
                    f"W3 (and whole run) zero damage, {t['name']}",
                    damage_text(t["audit"]),
                    "none",
                    bool(t["audit"]["ok"]),
                )
            )
    return out


def _database_of(store: str) -> str:
    """``redis``, ``postgresql``, ``sqlite``, … of a store URL (driver and options dropped)."""
    scheme = store.split("://", 1)[0].split("+", 1)[0].lower()
    return {"rediss": "redis", "postgres": "postgresql"}.get(scheme, scheme)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf as null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def damage_text(audit: dict[str, Any]) -> str:
    parts = [f"{k}={audit[k]}" for k in ("lost", "split", "duplicated", "misordered") if audit.get(k)]
    return " ".join(parts) or "none"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds * 1000:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


class Reporter:
    """Progress while running, then the summary and the files."""

    def __init__(self, *, progress: bool = True, console: Any = None) -> None:
        from rich.console import Console

        # Off a terminal (CI logs, files) rich would wrap at 80 columns: give the tables room.
        self.console = console or (Console() if sys.stdout.isatty() else Console(width=160))
        self.show_progress = progress
        self._progress: Any = None

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        if not self.show_progress:
            yield
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        with self._progress:
            yield
        self._progress = None

    @contextlib.contextmanager
    def task(self, target: str, label: str, total: int) -> Iterator[Callable[[int], None]]:
        if self._progress is None:
            yield lambda n: None
            return
        task_id = self._progress.add_task(f"{target} · {label}", total=total)
        try:
            yield lambda n: self._progress.advance(task_id, n)
        finally:
            self._progress.update(task_id, completed=total)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        task_id = self._progress.add_task(text, total=None)
        try:
            yield
        finally:
            self._progress.update(task_id, total=1, completed=1)

    def error(self, target: str, message: str) -> None:
        self.console.print(f"[red]{target}: {message}[/red]")

    def write(self, record: dict[str, Any], outdir: Path, *, plots: bool) -> dict[str, str]:
        """``result.json`` (one object), a line in ``../runs.jsonl``, and the plots."""
        files = {"json": str(outdir / "result.json")}
        if plots:
            from .plots import plot_run

            files.update(plot_run(record, outdir))
        record["files"] = files
        clean = json_safe(record)
        (outdir / "result.json").write_text(json.dumps(clean, indent=2, default=str) + "\n")
        with (outdir.parent / "runs.jsonl").open("a") as f:
            f.write(json.dumps(clean, default=str) + "\n")
        return files

    def summary(self, record: dict[str, Any]) -> None:
        from rich.table import Table

        c = self.console
        targets = record["targets"]
        w1 = Table(title="W1 throughput: S sessions × T turns (ratios to the floor of the same run)")
        for col in (
            "target",
            "S",
            "turns/s",
            "floor turns/s",
            "throughput ratio",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "p50 ratio",
            "errors",
        ):
            w1.add_column(col, justify="left" if col == "target" else "right")
        for t in targets:
            for row in t.get("w1", []):
                tg, fl, r = row.get("target", {}), row.get("floor", {}), row.get("ratio", {})
                w1.add_row(
                    t["name"],
                    str(row["sessions"]),
                    f"{tg.get('turns_per_s', float('nan')):.1f}",
                    f"{fl['turns_per_s']:.1f}" if fl else "-",
                    _x(r.get("throughput")),
                    fmt_ms(tg.get("p50_s")),
                    fmt_ms(tg.get("p95_s")),
                    fmt_ms(tg.get("p99_s")),
                    _x(r.get("p50")),
                    str(tg.get("errors", 0) + tg.get("skipped", 0)),
                )
        if w1.row_count:
            c.print(w1)
            for t in targets:
                for row in t.get("w1", []):
                    if line := cpu_line(row):
                        c.print(f"cpu {t['name']} S={row['sessions']}: {line}")
        w2 = Table(title="W2 history scaling: one conversation pre-filled with H messages")
        for col in (
            "target",
            "H",
            "median ms",
            "p95 ms",
            "floor median ms",
            "ratio to floor",
            "vs smallest H",
        ):
            w2.add_column(col, justify="left" if col == "target" else "right")
        for t in targets:
            data = t.get("w2") or {}
            pts = [p for p in data.get("target", {}).get("points", []) if not p.get("skipped")]
            floor_at = {
                p["history"]: p for p in data.get("floor", {}).get("points", []) if not p.get("skipped")
            }
            for p in pts:
                f = floor_at.get(p["history"])
                w2.add_row(
                    t["name"],
                    f"{p['history']:,}",
                    fmt_ms(p["p50_s"]),
                    fmt_ms(p["p95_s"]),
                    fmt_ms(f["p50_s"]) if f else "-",
                    _x(p.get("ratio", {}).get("median")),
                    _x(_ratio(p["p50_s"], pts[0]["p50_s"])),
                )
        if w2.row_count:
            c.print(w2)
        w3 = Table(title="W3 contention: C writers on one conv_uid × K turns")
        for col in ("target", "C×K", "turns/s", "throughput ratio", "p50 ms", "p99 ms", "errors"):
            w3.add_column(col, justify="left" if col == "target" else "right")
        for t in targets:
            data = t.get("w3")
            if data and "target" in data:
                tg = data["target"]
                w3.add_row(
                    t["name"],
                    f"{tg['writers']}×{tg['turns_each']}",
                    f"{tg['turns_per_s']:.1f}",
                    _x(data.get("ratio", {}).get("throughput")),
                    fmt_ms(tg["p50_s"]),
                    fmt_ms(tg["p99_s"]),
                    str(tg["errors"] + tg["skipped"]),
                )
        if w3.row_count:
            c.print(w3)
        audit = Table(title="Audit: every conversation read back")
        for col in (
            "target",
            "conversations",
            "messages",
            "acknowledged",
            "lost",
            "split",
            "duplicated",
            "misordered",
            "result",
        ):
            audit.add_column(col, justify="left" if col == "target" else "right")
        for t in targets:
            a = t.get("audit")
            if a is None:
                audit.add_row(t["name"], *["-"] * 7, f"[red]not run: {t.get('error', '?')}[/red]")
                continue
            colour = "green" if a["status"] == "ok" else "yellow" if a["status"] == "unaudited" else "red"
            audit.add_row(
                t["name"],
                str(a["conversations"]),
                str(a["messages"]),
                str(a["acknowledged"]),
                str(a["lost"]),
                str(a["split"]),
                str(a["duplicated"]),
                str(a["misordered"]),
                f"[{colour}]{a['status']}[/{colour}]",
            )
        c.print(audit)
        for t in targets:
            mem = t.get("memory")
            if mem:
                server = f"server peak RSS {mem['server_peak_mb']} MiB; " if mem.get("server_peak_mb") else ""
                c.print(
                    f"memory {t['name']}: {server}load process peak RSS {mem['load_process_peak_mb']} MiB"
                )
        for t in targets:
            a = t.get("audit")
            if a and not a["ok"]:
                c.print(f"[red bold]AUDIT FAILED[/red bold] {t['name']}: {damage_text(a)}")
                for problem in a["problems"][:10]:
                    c.print(f"  - {problem}")
        if record.get("verdicts"):
            v = Table(title="Performance goals")
            for col in ("target", "value", "goal", "met"):
                v.add_column(col)
            for item in record["verdicts"]:
                value = item["value"]
                shown = f"{value:.2f}" if isinstance(value, float) else str(value)
                met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[item["met"]]
                v.add_row(item["target"], shown, item["goal"], met)
            c.print(v)
        for name, path in record.get("files", {}).items():
            c.print(f"{name}: {path}")
        c.print(f"exit code {record['exit_code']}")


def cpu_line(row: dict[str, Any]) -> str | None:
    """A W1 row's CPU per turn (load process, server) for target and floor, and the
    machine's busy cores, when a server was measured; None otherwise."""
    parts = []
    for role in ("target", "floor"):
        cpu = (row.get(role) or {}).get("cpu") or {}
        if cpu.get("server_ms_per_turn") is None:
            continue
        parts.append(
            f"{role} server {cpu['server_ms_per_turn']:.2f} + load process {cpu['load_ms_per_turn']:.2f} "
            f"ms/turn, {cpu['machine_busy_cores']} of {cpu['cores']} cores busy"
        )
    return "; ".join(parts) or None
