"""``convcore bench`` (``python -m benchmarks`` in the repository): load benchmarks of concurrent sessions.

Examples::

    convcore bench w1 --store memory:// --sessions 1,8,64 --turns 10
    convcore bench w2 --store redis://127.0.0.1:6379/0 --history 100,1000,10000,100000
    convcore bench w3 --serve sqlite:///bench.db --writers 16 --writer-turns 10
    convcore bench w1 --url http://host:5670/api/v2 --api-key KEY --model MODEL
    convcore bench load --serve sqlite:///bench.db --rate 1,2,4 --slo ttft_p99=0.5

``load`` is the open-loop session benchmark (``convcore bench load --help``).

Exit codes: 0 clean, 1 the audit found damage, 2 bad arguments, 3 turns
failed or a target could not be run (but nothing was damaged).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# The bench extra, imported up front: without it `convcore bench` names the
# extra to install (through its entry point) instead of failing mid-run.
import httpx  # noqa: F401
import rich  # noqa: F401

from .cli_help import DefaultsOnce, command_typed
from .faults import FAULTS
from .runner import RunConfig, run

__all__ = ["build_parser", "main"]

_WORKLOADS = ("w1", "w2", "w3")
_CAPS = {"sessions": 1024, "turns": 10_000, "history": 1_000_000, "writers": 1024, "writer_turns": 10_000}


def _count(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = 1
    if text.endswith("k"):
        text, scale = text[:-1], 1000
    value = int(float(text) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _counts(text: str) -> list[int]:
    try:
        return [_count(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts like 1,8,64: {exc}") from exc


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog=prog or command_typed(),
        description="Load benchmarks of convcore: W1 throughput, W2 history scaling, W3 contention; "
        "results as ratios to a floor measured in the same run, and an audit of every conversation.",
        formatter_class=DefaultsOnce,
    )
    p.add_argument(
        "workloads",
        nargs="*",
        metavar="WORKLOAD",
        help="w1, w2, w3 or all (default: all); `load …` runs the open-loop session benchmark instead",
    )
    t = p.add_argument_group("targets (repeat --store/--serve; memory:// when none is given)")
    t.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="URL",
        help="a store URL, loaded through the library in this process",
    )
    t.add_argument(
        "--serve",
        action="append",
        default=[],
        metavar="STORE_URL",
        help="start a real `convcore serve` on this store and load it over HTTP",
    )
    t.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument passed to `convcore serve`",
    )
    t.add_argument("--url", help="an external chat/completions endpoint (DB-GPT or OpenAI style)")
    t.add_argument(
        "--api-key",
        default=os.environ.get("CONVCORE_BENCH_API_KEY"),
        help="Bearer key for --url (default: $CONVCORE_BENCH_API_KEY)",
    )
    t.add_argument("--model", help="model name sent to --url")
    t.add_argument(
        "--history-mode",
        choices=["server", "client"],
        default=d.history_mode,
        help="--url keeps history by conv_uid (server) or needs it resent (client)",
    )
    w = p.add_argument_group("workload sizes")
    w.add_argument(
        "--sessions", type=_counts, default=d.sessions, help="W1: concurrent sessions S, one or more"
    )
    w.add_argument("--turns", type=_count, default=d.turns, help="W1: sequential turns T per session")
    w.add_argument("--history", type=_counts, default=d.histories, help="W2: history lengths H in messages")
    w.add_argument("--samples", type=_count, default=d.samples, help="W2: timed turns per H")
    w.add_argument("--warmup", type=int, default=d.warmup, help="W2: untimed turns per H first")
    w.add_argument(
        "--writers", type=_count, default=d.writers, help="W3: concurrent writers C on one conv_uid"
    )
    w.add_argument("--writer-turns", type=_count, default=d.writer_turns, help="W3: turns K per writer")
    m = p.add_argument_group("turns")
    m.add_argument("--latency", type=float, default=d.latency, help="local backend: seconds before the reply")
    m.add_argument(
        "--tokens-per-second",
        type=float,
        default=d.tokens_per_second,
        help="local backend: token rate (0 = instant)",
    )
    m.add_argument("--max-new-tokens", type=_count, default=d.max_new_tokens, help="reply budget per turn")
    m.add_argument("--serialize", action="store_true", help="ask for serialised turns per conversation")
    m.add_argument("--input-words", type=_count, default=d.input_words, help="words per user message")
    m.add_argument(
        "--history-tokens",
        type=_count,
        default=d.history_tokens,
        help="W2: tokens per pre-filled message (enough to fill the window at H=100)",
    )
    m.add_argument(
        "--prefill-batch", type=_count, default=d.prefill_batch, help="W2: messages per pre-fill append"
    )
    m.add_argument("--connections", type=_count, default=d.connections, help="HTTP: connection pool size")
    r = p.add_argument_group("run")
    r.add_argument("--no-floor", dest="floor", action="store_false", help="skip the floors (no ratios)")
    r.add_argument("--out", type=Path, default=d.out, help="results folder")
    r.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    r.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--turn-timeout", type=float, default=d.turn_timeout, help="seconds before a turn fails")
    r.add_argument(
        "--max-seconds",
        type=float,
        default=d.max_seconds,
        help="the whole run's deadline; turns not started by then are skipped",
    )
    r.add_argument("--run-id", help="the run's id (default: random); names keys, tables and files")
    r.add_argument(
        "--fault",
        choices=sorted(FAULTS),
        help="self-check: wrap library stores in a broken one, so the audit must fail the run",
    )
    r.add_argument("--fault-every", type=_count, default=d.fault_every, help="--fault hits every Nth append")
    return p


def _config(ns: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> RunConfig:
    asked = ns.workloads or ["all"]
    unknown = sorted(set(asked) - {*_WORKLOADS, "all"})
    if unknown:
        parser.error(f"unknown workload {', '.join(unknown)}: choose from w1, w2, w3, all")
    chosen = [w for w in _WORKLOADS if w in asked or "all" in asked]
    for name, values in {
        "sessions": ns.sessions,
        "history": ns.history,
        "writers": [ns.writers],
        "turns": [ns.turns],
        "writer_turns": [ns.writer_turns],
    }.items():
        if max(values) > _CAPS[name]:
            parser.error(f"--{name.replace('_', '-')} is capped at {_CAPS[name]:,}")
    if ns.run_id and not ns.run_id.replace("-", "").isalnum():
        parser.error("--run-id must be letters, digits and dashes")
    if ns.max_seconds <= 0 or ns.max_seconds > 86_400 or ns.turn_timeout <= 0:
        parser.error("--max-seconds must be in (0, 86400] and --turn-timeout positive")
    if ns.fault and not (ns.store or not (ns.serve or ns.url)):
        parser.error("--fault wraps library stores: give --store (or no target for memory://)")
    if (ns.api_key or ns.model) and not ns.url and ns.api_key != os.environ.get("CONVCORE_BENCH_API_KEY"):
        parser.error("--api-key and --model go with --url")
    return RunConfig(
        workloads=chosen,
        stores=ns.store,
        serve=ns.serve,
        url=ns.url,
        api_key=ns.api_key if ns.url else None,
        model=ns.model,
        history_mode=ns.history_mode,
        sessions=sorted(set(ns.sessions)),
        turns=ns.turns,
        # Pre-fill alternates user/assistant, so each H is a whole number of rounds.
        histories=sorted({h + h % 2 for h in ns.history}),
        samples=ns.samples,
        warmup=max(ns.warmup, 0),
        writers=ns.writers,
        writer_turns=ns.writer_turns,
        latency=ns.latency,
        tokens_per_second=ns.tokens_per_second,
        max_new_tokens=ns.max_new_tokens,
        serialize=ns.serialize,
        floor=ns.floor,
        input_words=ns.input_words,
        history_tokens=ns.history_tokens,
        prefill_batch=ns.prefill_batch,
        connections=ns.connections,
        turn_timeout=ns.turn_timeout,
        max_seconds=ns.max_seconds,
        fault=ns.fault,
        fault_every=ns.fault_every,
        out=ns.out,
        plots=ns.plots,
        progress=ns.progress and sys.stdout.isatty(),
        run_id=ns.run_id,
        serve_args=ns.serve_arg,
        argv=argv,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the arguments describe; the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "load":
        from .loadcli import main as load_main

        return load_main(args[1:])
    parser = build_parser()
    ns = parser.parse_args(args)
    config = _config(ns, args, parser)
    try:
        record = asyncio.run(run(config))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    code: int = record["exit_code"]
    return code
