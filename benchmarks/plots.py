"""PNG plots of a run, drawn with matplotlib's Agg backend (no display needed).

- ``latency_vs_history.png``: W2 median turn latency against H for each
  target (solid) and its floor (dashed), and the same medians divided by the
  median at the smallest H, with the 1.5× target line.
- ``throughput_vs_sessions.png``: W1 turns/s against S for each target and
  floor, and the ratio target/floor, with the 0.5× target line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_run"]


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(record: dict[str, Any], outdir: Path) -> dict[str, str]:
    """Draw what ``record`` measured into ``outdir``; the files written, by name."""
    files: dict[str, str] = {}
    targets = record["targets"]
    if any(t.get("w2") for t in targets):
        files["latency_vs_history"] = str(_latency_vs_history(targets, outdir / "latency_vs_history.png"))
    if any(t.get("w1") for t in targets):
        files["throughput_vs_sessions"] = str(
            _throughput_vs_sessions(targets, outdir / "throughput_vs_sessions.png")
        )
    return files


def _ticks(ax: Any, values: set[int]) -> None:
    """Label a log axis at the measured values, in plain numbers."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    if values:
        ax.set_xticks(sorted(values))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v):,}"))


def _points(w2: dict[str, Any], role: str) -> tuple[list[int], list[float]]:
    pts = [p for p in w2.get(role, {}).get("points", []) if not p.get("skipped") and p.get("turns")]
    return [p["history"] for p in pts], [p["p50_s"] * 1000 for p in pts]


def _latency_vs_history(targets: list[dict[str, Any]], path: Path) -> Path:
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, t in enumerate(targets):
        w2 = t.get("w2")
        if not w2:
            continue
        colour = f"C{i % 10}"
        h, ms = _points(w2, "target")
        if h:
            left.plot(h, ms, "o-", color=colour, label=t["name"])
            right.plot(h, [m / ms[0] for m in ms], "o-", color=colour, label=t["name"])
        fh, fms = _points(w2, "floor")
        if fh:
            left.plot(fh, fms, "s--", color=colour, alpha=0.6, label=f"{t.get('floor')} ({t['name']})")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="history H (messages)",
        ylabel="median turn latency (ms)",
        title="W2: latency vs history length",
    )
    right.axhline(1.5, color="red", linestyle=":", label="target 1.5×")
    right.set(
        xscale="log",
        xlabel="history H (messages)",
        ylabel="median ÷ median at smallest H",
        title="W2: scaling",
    )
    hs = {p["history"] for t in targets for p in (t.get("w2") or {}).get("target", {}).get("points", [])}
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        _ticks(ax, hs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput_vs_sessions(targets: list[dict[str, Any]], path: Path) -> Path:
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, t in enumerate(targets):
        rows = [r for r in t.get("w1", []) if r.get("target", {}).get("turns")]
        if not rows:
            continue
        colour = f"C{i % 10}"
        s = [r["sessions"] for r in rows]
        left.plot(s, [r["target"]["turns_per_s"] for r in rows], "o-", color=colour, label=t["name"])
        if all(r.get("floor", {}).get("turns") for r in rows):
            left.plot(
                s,
                [r["floor"]["turns_per_s"] for r in rows],
                "s--",
                color=colour,
                alpha=0.6,
                label=f"{t.get('floor')} ({t['name']})",
            )
        ratios = [(r["sessions"], r.get("ratio", {}).get("throughput")) for r in rows]
        ratios = [(x, y) for x, y in ratios if y is not None]
        if ratios:
            right.plot(*zip(*ratios, strict=True), "o-", color=colour, label=t["name"])
    left.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sessions S",
        ylabel="turns/s",
        title="W1: throughput vs sessions",
    )
    right.axhline(0.5, color="red", linestyle=":", label="target 0.5× (Redis)")
    right.set(
        xscale="log",
        xlabel="concurrent sessions S",
        ylabel="turns/s ÷ floor turns/s",
        title="W1: ratio to the floor",
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
