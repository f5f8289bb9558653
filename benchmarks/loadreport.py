"""The load run's report: a terminal table, ``result.json``, PNG plots and one HTML page.

- ``result.json``: environment and versions, the configuration, and per
  target and rate the schedule (asked, scheduled and achieved rates), every
  latency summary (p50 … p99.9), the HDR histograms themselves (encoded, so
  runs can be merged later), the SLO verdict, goodput and the audit;
- ``latency_vs_rate.png``: TTFT, ITL, TPOT and E2E p50/p99 against the
  requested rate, with the SLO limits and the knee;
- ``latency_distributions.png``: the TTFT and ITL percentile spectra per step;
- ``goodput_vs_rate.png``: goodput and throughput against rate, and the
  achieved session rate against the requested one;
- ``report.html``: all of it on one self-contained page (plots inlined).
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from .report import damage_text, fmt_ms, json_safe

__all__ = ["print_load_summary", "write_load_report"]

_COLUMNS = (
    "target",
    "rate/s",
    "started/s",
    "ok/req",
    "errors",
    "TTFT p50",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "TPOT p50",
    "E2E p50",
    "E2E p99",
    "goodput/s",
    "tok/s out",
    "SLOs",
    "audit",
)


def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def rows(record: dict[str, Any]) -> list[list[str]]:
    """One row per target and rate, the columns of :data:`_COLUMNS`."""
    out = []
    for t in record["targets"]:
        if "error" in t:
            out.append([t["name"], *["-"] * (len(_COLUMNS) - 2), f"not run: {t['error']}"])
            continue
        for step in t["steps"]:
            s, lat = step["summary"], step["summary"]["latency"]
            errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_kind"].items())) or "0"
            passed = step["verdict"]["passed"]
            out.append(
                [
                    t["name"],
                    _num(step["rate"], "g"),
                    _num(step["achieved_rate"]),
                    f"{s['ok']}/{s['requests']}",
                    errors + (f" (+{s['skipped']} skipped)" if s["skipped"] else ""),
                    fmt_ms(lat["ttft"].get("p50")),
                    fmt_ms(lat["ttft"].get("p99")),
                    fmt_ms(lat["itl"].get("p50")),
                    fmt_ms(lat["itl"].get("p99")),
                    fmt_ms(lat["tpot"].get("p50")),
                    fmt_ms(lat["e2e"].get("p50")),
                    fmt_ms(lat["e2e"].get("p99")),
                    _num(s["goodput_rps"]),
                    _num(s["tokens_out_per_s"], ".0f"),
                    {True: "pass", False: "FAIL", None: "-"}[passed],
                    step["audit"]["status"]
                    + ("" if step["audit"]["ok"] else f" ({damage_text(step['audit'])})"),
                ]
            )
    return out


def knee_lines(record: dict[str, Any]) -> list[str]:
    lines = []
    slos = record["config"].get("slos") or []
    for t in record["targets"]:
        k = t.get("knee")
        if k is None:
            continue
        if k["rate"] is None:
            lines.append(f"knee {t['name']}: none, the lowest rate missed {', '.join(slos)}")
        else:
            above = f", {k['first_failing_rate']:g}/s missed" if k["first_failing_rate"] is not None else ""
            lines.append(
                f"knee {t['name']}: {k['rate']:g} sessions/s ({_num(k['throughput_rps'])} requests/s, "
                f"goodput {_num(k['goodput_rps'])}/s) meets {', '.join(slos)}{above}"
            )
    return lines


def print_load_summary(record: dict[str, Any], console: Any = None) -> None:
    """The summary table, knees, failed checks and file names, on the terminal."""
    from rich.console import Console
    from rich.table import Table

    c = console or (Console() if sys.stdout.isatty() else Console(width=200))
    table = Table(
        title="Open-loop session load: rates in sessions/s, "
        "latency in ms from each request's intended send time"
    )
    for col in _COLUMNS:
        table.add_column(col, justify="left" if col == "target" else "right")
    for row in rows(record):
        table.add_row(*row)
    c.print(table)
    for line in knee_lines(record):
        c.print(line)
    for t in record["targets"]:
        for step in t.get("steps", []):
            for check in step["verdict"]["checks"]:
                if not check["met"]:
                    value = "none" if check["value"] is None else f"{check['value']:.4g}"
                    c.print(
                        f"  {t['name']} at {step['rate']:g}/s: {check['slo']} = {value} > {check['limit']:g}"
                    )
            if not step["audit"]["ok"]:
                c.print(f"[red bold]AUDIT FAILED[/red bold] {t['name']} at {step['rate']:g}/s")
                for problem in step["audit"]["problems"][:10]:
                    c.print(f"  - {problem}")
    for name, path in record.get("files", {}).items():
        c.print(f"{name}: {path}")
    c.print(f"exit code {record['exit_code']}")


def write_load_report(record: dict[str, Any], outdir: Path, *, plots: bool = True) -> dict[str, str]:
    """Write the JSON, the plots and the HTML page into ``outdir``; the files, by name."""
    files = {"json": str(outdir / "result.json")}
    if plots:
        from .loadplots import plot_load

        files.update(plot_load(record, outdir))
    files["html"] = str(outdir / "report.html")
    record["files"] = files
    clean = json_safe(record)
    (outdir / "result.json").write_text(json.dumps(clean, indent=2, default=str) + "\n")
    with (outdir.parent / "runs.jsonl").open("a") as f:
        f.write(json.dumps(_light(clean), default=str) + "\n")
    (outdir / "report.html").write_text(render_html(clean, outdir))
    return files


def _light(record: dict[str, Any]) -> dict[str, Any]:
    """The record without encoded histograms, for the one-line-per-run log."""
    out = json.loads(json.dumps(record, default=str))
    for t in out["targets"]:
        for step in t.get("steps", []):
            step["summary"].pop("hdr", None)
    return out


def render_html(record: dict[str, Any], outdir: Path) -> str:
    """One page, no external references: tables, knees, audit, plots inlined as data URIs."""
    e = html.escape
    env = record["environment"]
    head = "".join(f"<th>{e(c)}</th>" for c in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in rows(record))
    images = []
    for name, path in record.get("files", {}).items():
        if path.endswith(".png") and Path(path).exists():
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            images.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}"></figure>')
    config = json.dumps(record["config"], indent=2, default=str)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items()))
    knees = "".join(f"<li>{e(line)}</li>" for line in knee_lines(record)) or "<li>no SLOs given</li>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>convcore load {e(record["run_name"])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}th{{background:#f2f2f2}}
img{{max-width:100%;border:1px solid #ddd}}pre{{background:#f7f7f7;padding:1em;font-size:12px}}
</style></head><body>
<h1>convcore open-loop session load</h1>
<p>Run {e(record["run_name"])}, {e(record["started_at"])}; exit code {record["exit_code"]}.
Latency (ms) is measured from each request's intended send time; rates are sessions per second,
goodput and throughput requests per second.</p>
<h2>Summary</h2><table><tr>{head}</tr>{body}</table>
<h2>Knees</h2><ul>{knees}</ul>
<h2>Plots</h2>{"".join(images) or "<p>no plots</p>"}
<h2>Environment</h2>
<p>Python {e(str(env.get("python")))} on {e(str(env.get("platform")))}, {env.get("cpus")} CPUs,
load average at end {e(str(env.get("loadavg_at_end")))}, commit {e(str(env.get("git_commit")))}.</p>
<p>{e(versions)}</p><p>servers: {e(json.dumps(env.get("servers", {})))}</p>
<h2>Configuration</h2><pre>{e(config)}</pre>
</body></html>
"""
