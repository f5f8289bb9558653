"""``python -m benchmarks load`` / ``convcore bench load``: open-loop session load with SLOs.

Examples::

    python -m benchmarks load --store memory:// --rate 2
    python -m benchmarks load --serve sqlite:////tmp/ccb.db --rate 1,2,4,8 \\
        --slo ttft_p99=0.5 --slo e2e_p95=5
    python -m benchmarks load --floor --first-token-delay 0.02 --rate 50 --arrival constant
    python -m benchmarks load --url http://host:8000/v1 --history-mode client --model M --rate 1

Exit codes: 0 clean (and, with --slo, a knee was found for every target),
1 the audit found damage, 2 bad arguments, 3 a target could not run (or,
without --slo, requests failed), 4 even the lowest rate missed an SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .arrivals import ARRIVALS, Dist
from .cli_help import DefaultsOnce, command_typed
from .faults import FAULTS
from .load import LoadConfig, run_load
from .slo import Slo

__all__ = ["build_parser", "main"]

_MAX_RATE, _MAX_SESSIONS = 100_000.0, 1_000_000


def _rates(text: str) -> list[float]:
    try:
        rates = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected rates like 1,2,4 (sessions per second), got {text!r}"
        ) from None
    if not rates or any(not (0 < r <= _MAX_RATE) or math.isnan(r) for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be in (0, {_MAX_RATE:g}]")
    return rates


def _dist(text: str) -> Dist:
    try:
        return Dist.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _slo(text: str) -> Slo:
    try:
        return Slo.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type = float) -> object:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be zero or more, not {text}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = LoadConfig()
    p = argparse.ArgumentParser(
        prog=prog or command_typed("load"),
        description="Open-loop multi-turn session load: arrivals at a set rate, streamed turns timed from "
        "their intended send time (TTFT, ITL, TPOT, E2E in HDR histograms), SLO verdicts and goodput, "
        "a rate sweep's knee, and the audit of every conversation.",
        formatter_class=DefaultsOnce,
    )
    t = p.add_argument_group("targets (memory:// through the library when none is given)")
    t.add_argument("--store", action="append", default=[], metavar="URL", help="the library on this store")
    t.add_argument(
        "--serve", action="append", default=[], metavar="STORE_URL", help="start `convcore serve` on it"
    )
    t.add_argument(
        "--serve-arg", action="append", default=[], metavar="ARG", help="extra `convcore serve` argument"
    )
    t.add_argument("--url", help="a DB-GPT or OpenAI-compatible chat/completions endpoint (or its base URL)")
    t.add_argument(
        "--api-key",
        default=os.environ.get("CONVCORE_BENCH_API_KEY"),
        help="Bearer key for --url (default $CONVCORE_BENCH_API_KEY)",
    )
    t.add_argument("--model", help="model name sent to --url")
    t.add_argument(
        "--history-mode",
        choices=["server", "client"],
        default=d.history_mode,
        help="--url keeps history by conv_uid (server) or gets it resent each turn (client)",
    )
    t.add_argument(
        "--floor",
        action="store_true",
        help="load the minimal streaming ASGI app: what the harness itself sustains",
    )
    a = p.add_argument_group("arrivals and sessions")
    a.add_argument("--rate", type=_rates, default=d.rates, help="sessions per second; several for a sweep")
    a.add_argument("--arrival", choices=ARRIVALS, default=d.arrival, help="arrival process")
    a.add_argument(
        "--burstiness",
        type=_positive(),
        default=d.burstiness,
        help="gamma shape: 1 is Poisson, below 1 burstier (CV = 1/sqrt(burstiness))",
    )
    a.add_argument("--duration", type=_positive(), default=d.duration, help="seconds of arrivals per rate")
    a.add_argument("--sessions", type=_positive(int), help="sessions per rate (instead of --duration)")
    a.add_argument("--turns", type=_dist, default=d.turns, help="turns per session: N or a distribution")
    a.add_argument(
        "--think",
        type=_dist,
        default=d.think,
        help="seconds from a reply to the next turn: const:S, exp:MEAN, uniform:A,B, lognormal:MEDIAN,SIGMA",
    )
    a.add_argument("--input-words", type=_dist, default=d.input_words, help="words per user message")
    a.add_argument("--seed", type=int, default=d.seed, help="seed of the plan (same seed, same load)")
    m = p.add_argument_group("replies (local backend and floor)")
    m.add_argument(
        "--max-new-tokens", type=_positive(int), default=d.max_new_tokens, help="reply budget per turn"
    )
    m.add_argument(
        "--first-token-delay",
        type=_non_negative,
        default=d.first_token_delay,
        help="seconds before the first token",
    )
    m.add_argument("--tokens-per-second", type=_non_negative, default=d.tokens_per_second, help="0 = unpaced")
    s = p.add_argument_group("SLOs and limits")
    s.add_argument(
        "--slo",
        type=_slo,
        action="append",
        default=[],
        metavar="METRIC_pQ=SECONDS",
        help="e.g. ttft_p99=0.5, e2e_p95=5, itl_p99=0.1, tpot_p50=0.05, error_rate=0.01; repeat",
    )
    s.add_argument(
        "--connections", type=_positive(int), default=d.connections, help="HTTP connections at most"
    )
    s.add_argument(
        "--max-concurrency", type=_positive(int), help="requests in flight at most (queued beyond)"
    )
    s.add_argument(
        "--turn-timeout", type=_positive(), default=d.turn_timeout, help="seconds before a turn fails"
    )
    s.add_argument(
        "--drain",
        type=_non_negative,
        default=d.drain,
        help="seconds after the last arrival that turns may still start",
    )
    s.add_argument(
        "--precise",
        action="store_true",
        help="send on time to the microsecond, spinning out each wait's last 1.5 ms "
        "(asyncio's timers wake up to 1 ms late); costs that CPU per request: for calibration at low rates",
    )
    s.add_argument("--warmup", type=int, default=d.warmup, help="sessions run (and audited) before measuring")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, default=d.out, help="results folder")
    r.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    r.add_argument("--run-id", help="the run's id (default: random)")
    r.add_argument(
        "--fault",
        choices=sorted(FAULTS),
        help="self-check: wrap library stores in a broken one, so the audit must fail the run",
    )
    r.add_argument(
        "--fault-every", type=_positive(int), default=d.fault_every, help="--fault hits every Nth append"
    )
    return p


def config_from(argv: Sequence[str]) -> LoadConfig:
    """The :class:`LoadConfig` for ``argv``; exits 2 with a message on bad arguments."""
    args = list(argv)
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.sessions is not None and ns.sessions > _MAX_SESSIONS:
        parser.error(f"--sessions is capped at {_MAX_SESSIONS:,}")
    if ns.sessions is None and max(ns.rate) * ns.duration > _MAX_SESSIONS:
        parser.error(f"--rate × --duration would start more than {_MAX_SESSIONS:,} sessions")
    if ns.run_id and not ns.run_id.replace("-", "").isalnum():
        parser.error("--run-id must be letters, digits and dashes")
    if ns.history_mode == "client" and not ns.url:
        parser.error("--history-mode client goes with --url")
    if (ns.model or (ns.api_key and ns.api_key != os.environ.get("CONVCORE_BENCH_API_KEY"))) and not ns.url:
        parser.error("--api-key and --model go with --url")
    if ns.fault and (ns.serve or ns.url or ns.floor) and not ns.store:
        parser.error("--fault wraps library stores: give --store")
    if ns.warmup < 0:
        parser.error("--warmup must be zero or more")
    return LoadConfig(
        stores=ns.store,
        serve=ns.serve,
        url=ns.url,
        api_key=ns.api_key if ns.url else None,
        model=ns.model,
        history_mode=ns.history_mode,
        floor=ns.floor,
        rates=ns.rate,
        arrival=ns.arrival,
        burstiness=ns.burstiness,
        duration=ns.duration,
        sessions=ns.sessions,
        turns=ns.turns,
        think=ns.think,
        input_words=ns.input_words,
        max_new_tokens=ns.max_new_tokens,
        first_token_delay=ns.first_token_delay,
        tokens_per_second=ns.tokens_per_second,
        slos=ns.slo,
        seed=ns.seed,
        connections=ns.connections,
        max_concurrency=ns.max_concurrency,
        turn_timeout=ns.turn_timeout,
        drain=ns.drain,
        precise=ns.precise,
        warmup=ns.warmup,
        out=ns.out,
        plots=ns.plots,
        run_id=ns.run_id,
        serve_args=ns.serve_arg,
        fault=ns.fault,
        fault_every=int(ns.fault_every),
        argv=["load", *args],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load the arguments describe; the exit code."""
    from .loadreport import print_load_summary

    config = config_from(list(sys.argv[1:] if argv is None else argv))
    try:
        record = asyncio.run(run_load(config, say=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_load_summary(record)
    code: int = record["exit_code"]
    return code
