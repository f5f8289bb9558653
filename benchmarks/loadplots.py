"""PNG plots of a load run (matplotlib, Agg backend): latency against rate,
TTFT and ITL distributions, goodput. See :mod:`benchmarks.loadreport`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .hdr import Histogram
from .plots import _figure

__all__ = ["plot_load"]

_METRICS = (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "E2E latency"))


def plot_load(record: dict[str, Any], outdir: Path) -> dict[str, str]:
    """Draw the run's plots into ``outdir``; the files written, by name."""
    targets = [t for t in record["targets"] if t.get("steps")]
    if not targets:
        return {}
    slos = record["config"].get("slos") or []
    return {
        "latency_vs_rate": str(_latency_vs_rate(targets, slos, outdir / "latency_vs_rate.png")),
        "latency_distributions": str(_distributions(targets, outdir / "latency_distributions.png")),
        "goodput_vs_rate": str(_goodput(targets, outdir / "goodput_vs_rate.png")),
    }


def _value(step: dict[str, Any], metric: str, q: str) -> float:
    v = step["summary"]["latency"][metric].get(q)
    return v * 1000 if isinstance(v, float) and math.isfinite(v) else math.nan


def _latency_vs_rate(targets: list[dict[str, Any]], slos: list[str], path: Path) -> Path:
    plt = _figure()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (metric, label) in zip(axes.flat, _METRICS, strict=True):
        for i, t in enumerate(targets):
            rates = [s["rate"] for s in t["steps"]]
            colour = f"C{i % 10}"
            ax.plot(
                rates,
                [_value(s, metric, "p50") for s in t["steps"]],
                "o-",
                color=colour,
                label=f"{t['name']} p50",
            )
            ax.plot(
                rates,
                [_value(s, metric, "p99") for s in t["steps"]],
                "s--",
                color=colour,
                label=f"{t['name']} p99",
            )
            k = t.get("knee")
            if k and k.get("rate") is not None:
                ax.axvline(k["rate"], color=colour, linestyle=":", alpha=0.7)
        for slo in slos:
            name, _, limit = slo.partition("<=")
            if name.startswith(metric + "_"):
                ax.axhline(float(limit) * 1000, color="red", linestyle=":", label=f"SLO {slo}")
        ax.set(
            xlabel="requested session rate (/s)",
            ylabel=f"{label} (ms)",
            title=f"{label} vs rate",
            yscale="log",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Latency percentiles against rate (dotted verticals: knee)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _distributions(targets: list[dict[str, Any]], path: Path) -> Path:
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric in zip(axes, ("ttft", "itl"), strict=True):
        n = 0
        for t in targets:
            for s in t["steps"]:
                h = Histogram.decode(s["summary"]["hdr"].get(metric, ""))
                spectrum = h.spectrum()
                if not spectrum:
                    continue
                xs = [1 / (1 - q / 100) for q, _ in spectrum]
                ax.plot(
                    xs,
                    [v * 1000 for _, v in spectrum],
                    color=f"C{n % 10}",
                    label=f"{t['name']} @ {s['rate']:g}/s",
                )
                n += 1
        ax.set_xscale("log")
        ticks = [1, 2, 10, 100, 1000, 10000]
        ax.set_xticks(ticks, ["0", "50", "90", "99", "99.9", "99.99"])
        ax.set(xlabel="percentile", ylabel="ms", title=f"{metric.upper()} distribution (HDR)", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _goodput(targets: list[dict[str, Any]], path: Path) -> Path:
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    top = 0.0
    for i, t in enumerate(targets):
        colour = f"C{i % 10}"
        rates = [s["rate"] for s in t["steps"]]
        top = max(top, *rates)
        left.plot(
            rates,
            [s["summary"]["throughput_rps"] for s in t["steps"]],
            "s--",
            color=colour,
            label=f"{t['name']} throughput",
        )
        left.plot(
            rates,
            [s["summary"]["goodput_rps"] for s in t["steps"]],
            "o-",
            color=colour,
            label=f"{t['name']} goodput",
        )
        right.plot(rates, [s["achieved_rate"] for s in t["steps"]], "o-", color=colour, label=t["name"])
        scheduled = [s.get("scheduled_rate") for s in t["steps"]]
        if all(v is not None for v in scheduled):
            right.plot(rates, scheduled, "x:", color=colour, alpha=0.6, label=f"{t['name']} (schedule)")
    right.plot([0, top], [0, top], color="grey", linestyle=":", label="achieved = requested")
    left.set(
        xlabel="requested session rate (/s)",
        ylabel="requests/s",
        title="Goodput (requests within every SLO) and throughput",
    )
    right.set(
        xlabel="requested session rate (/s)",
        ylabel="achieved session rate (/s)",
        title="Achieved vs requested arrival rate",
    )
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
