"""``python -m benchmarks load``: open-loop session load, rate by rate, audited.

For each target and each requested session rate, a seeded plan of sessions
(arrivals, turns, think times, input lengths) is run open-loop
(:mod:`benchmarks.openloop`) with streamed turns, its latencies kept in HDR
histograms, its SLOs judged, and every conversation it wrote read back by
the audit. A step that damaged data fails the run, whatever its latency.

Targets: the library on a store URL; a ``convcore serve`` started on a free
loopback port; any DB-GPT/OpenAI-compatible URL; and the floor, a minimal
ASGI app that streams ``max_new_tokens`` tokens at a set first-token delay
and pace, which measures the harness itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .arrivals import Dist, plan_sessions
from .audit import RunAudit, audit_run
from .cpu import server_cpu_seconds
from .driver import ReadBack, TurnText
from .faults import FAULTS
from .floors import FIRST_TOKEN_ENV, TOKENS_PER_S_ENV
from .hdr import LoadMetrics
from .namespaces import Namespace, scheme_of, server_version
from .openloop import run_open_loop
from .report import environment
from .serve import floor_command
from .slo import Slo, knee, limits_of, verdict
from .streams import EngineStreamer, SseStreamer
from .targets import (
    CHAT_PATH,
    EndpointTarget,
    LibraryTarget,
    ServerProcess,
    ServiceTarget,
    free_port,
    mask_url,
)
from .workloads import Ledger

__all__ = ["EXIT_SLO", "FloorTarget", "LoadConfig", "run_load"]

EXIT_OK, EXIT_DAMAGE, EXIT_ERRORS, EXIT_SLO = 0, 1, 3, 4
PRECISE_SPIN = 0.0015  # seconds: covers asyncio's millisecond timer rounding


@dataclass
class LoadConfig:
    """Everything a load run needs; ``python -m benchmarks load`` fills it from its flags."""

    stores: list[str] = field(default_factory=list)
    serve: list[str] = field(default_factory=list)
    url: str | None = None
    api_key: str | None = None
    model: str | None = None
    history_mode: str = "server"
    floor: bool = False  # load the streaming floor (the harness's own cost)
    rates: list[float] = field(default_factory=lambda: [2.0])  # sessions per second
    arrival: str = "poisson"
    burstiness: float = 1.0
    duration: float = 10.0  # seconds of arrivals per rate
    sessions: int | None = None  # instead of duration
    turns: Dist = field(default_factory=lambda: Dist("const", 3))
    think: Dist = field(default_factory=lambda: Dist("exp", 1.0))
    input_words: Dist = field(default_factory=lambda: Dist("uniform", 40, 80))
    max_new_tokens: int = 32
    first_token_delay: float = 0.0  # local backend / floor: seconds before the first token
    tokens_per_second: float = 0.0  # local backend / floor: pace (0 = unpaced)
    slos: list[Slo] = field(default_factory=list)
    seed: int = 1
    connections: int = 256
    max_concurrency: int | None = None
    turn_timeout: float = 30.0
    drain: float = 60.0
    precise: bool = False  # spin out each send's last 1.5 ms (CPU for timing)
    warmup: int = 8  # sessions run (and audited) before the first step, not measured
    fault: str | None = None  # self-check: library stores wrapped in a broken one
    fault_every: int = 5
    out: Path = Path("benchmarks/results")
    plots: bool = True
    run_id: str | None = None
    serve_args: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            out=str(self.out),
            stores=[mask_url(u) for u in self.stores],
            serve=[mask_url(u) for u in self.serve],
            api_key="***" if self.api_key else None,
            turns=str(self.turns),
            think=str(self.think),
            input_words=str(self.input_words),
            slos=[str(s) for s in self.slos],
        )
        return data

    def count_at(self, rate: float) -> int:
        return self.sessions if self.sessions else max(2, round(rate * self.duration))


class FloorTarget:
    """The streaming floor: :func:`benchmarks.floors.fixed_completion_app` in its own
    uvicorn process, paced by ``first_token_delay`` and ``tokens_per_second``."""

    kind = "floor"
    name = "floor: minimal ASGI app (streaming)"

    def __init__(self, *, logs: Path, first_token_delay: float, tokens_per_second: float) -> None:
        self.logs = logs
        self.env = {FIRST_TOKEN_ENV: repr(first_token_delay), TOKENS_PER_S_ENV: repr(tokens_per_second)}
        self.server: ServerProcess | None = None

    async def __aenter__(self) -> FloorTarget:
        port = free_port()
        self.server = ServerProcess(floor_command(port), port, self.logs / f"floor-{port}.log", self.env)
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        return None

    async def forget(self, conv_uids: list[str]) -> None:
        return None


class _Audited:
    """What the audit reads through: the target, unless history was resent by
    the client, which leaves nothing on the server to read back."""

    def __init__(self, target: Any, client_history: bool) -> None:
        self.target = target
        self.client_history = client_history

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        return None if self.client_history else await self.target.read_back(conv_uid)


def _targets(config: LoadConfig, ns: Namespace, logs: Path) -> list[Any]:
    text = TurnText()
    common = {"namespace": ns, "text": text, "max_new_tokens": config.max_new_tokens}
    pace = {"latency": config.first_token_delay, "tokens_per_second": config.tokens_per_second}
    targets: list[Any] = []
    if config.floor:
        targets.append(
            FloorTarget(
                logs=logs,
                first_token_delay=config.first_token_delay,
                tokens_per_second=config.tokens_per_second,
            )
        )
    wrap = None
    if config.fault:
        fault, every = FAULTS[config.fault], config.fault_every

        def wrap(store: Any) -> Any:
            return fault(store, every)

    targets += [LibraryTarget(url, wrap=wrap, **pace, **common) for url in config.stores]
    targets += [
        ServiceTarget(
            url,
            logs=logs,
            connections=config.connections,
            turn_timeout=config.turn_timeout,
            serve_args=config.serve_args,
            **pace,
            **common,
        )
        for url in config.serve
    ]
    if config.url:
        targets.append(
            EndpointTarget(
                config.url,
                logs=logs,
                api_key=config.api_key,
                model=config.model,
                connections=config.connections,
                turn_timeout=config.turn_timeout,
                history=config.history_mode,
                **common,
            )
        )
    return targets


def _streamer(target: Any, config: LoadConfig) -> Any:
    if isinstance(target, LibraryTarget):
        return EngineStreamer(
            target.engine, max_new_tokens=config.max_new_tokens, timeout=config.turn_timeout
        )
    options: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "connections": config.connections,
        "timeout": config.turn_timeout,
    }
    if isinstance(target, EndpointTarget):
        return SseStreamer(
            target.client.chat_url,
            api_key=target.client.api_key,
            model=config.model,
            history=config.history_mode,
            **options,
        )
    assert target.server is not None
    api_key = getattr(target, "api_key", None)
    return SseStreamer(target.server.base_url + CHAT_PATH, api_key=api_key, **options)


async def _step(
    target: Any, streamer: Any, config: LoadConfig, rate: float, tag: str, seed: int, count: int
) -> tuple[dict[str, Any], Ledger]:
    plans = plan_sessions(
        rate=rate,
        count=count,
        process=config.arrival,
        burstiness=config.burstiness,
        turns=config.turns,
        think=config.think,
        input_words=config.input_words,
        seed=seed,
    )
    metrics = LoadMetrics(limits=limits_of(config.slos), max_new_tokens=config.max_new_tokens)
    ledger = Ledger()
    server_cpu0 = server_cpu_seconds(target)
    schedule = await run_open_loop(
        streamer,
        plans,
        tag=tag,
        metrics=metrics,
        ledger=ledger,
        drain=config.drain,
        max_concurrency=config.max_concurrency,
        spin=PRECISE_SPIN if config.precise else 0.0,
    )
    server_cpu1 = server_cpu_seconds(target)
    if server_cpu0 is not None and server_cpu1 is not None and metrics.requests:
        schedule["server_cpu_per_request_ms"] = 1000 * (server_cpu1 - server_cpu0) / metrics.requests
    summary = metrics.summary()
    return {
        "rate": rate,
        **schedule,
        "summary": summary,
        "verdict": verdict(summary, config.slos),
    }, ledger


async def _audit(target: Any, ledger: Ledger, client_history: bool) -> dict[str, Any]:
    audit: RunAudit = await audit_run(_Audited(target, client_history), ledger)  # type: ignore[arg-type]
    with contextlib.suppress(Exception):
        await target.forget(ledger.conversations())
    return audit.as_dict()


async def _run_target(target: Any, config: LoadConfig, index: int, say: Any) -> dict[str, Any]:
    ns: Namespace = getattr(target, "namespace", None) or Namespace()
    client_history = isinstance(target, EndpointTarget) and config.history_mode == "client"
    result: dict[str, Any] = {
        "name": target.name,
        "kind": target.kind,
        "store": mask_url(getattr(target, "store_url", "") or "") or None,
        "history": "client" if client_history else "server",
        "steps": [],
    }
    async with target:
        streamer = _streamer(target, config)
        try:
            base = f"ccb-{ns.run_id}-{index}"
            if config.warmup:
                say(f"{target.name}: warm-up, {config.warmup} sessions")
                warm, ledger = await _step(
                    target,
                    streamer,
                    config,
                    min(config.rates),
                    f"{base}-warm",
                    config.seed - 1,
                    config.warmup,
                )
                warm["audit"] = await _audit(target, ledger, client_history)
                result["warmup"] = {k: warm[k] for k in ("rate", "sessions", "audit")}
            for i, rate in enumerate(config.rates):
                count = config.count_at(rate)
                say(f"{target.name}: {rate:g} sessions/s, {count} sessions")
                step, ledger = await _step(
                    target, streamer, config, rate, f"{base}-r{i}", config.seed + i, count
                )
                step["audit"] = await _audit(target, ledger, client_history)
                result["steps"].append(step)
                say(_one_line(step))
        finally:
            await streamer.aclose()
    result["knee"] = knee(result["steps"])
    return result


def _one_line(step: dict[str, Any]) -> str:
    s = step["summary"]
    ttft = s["latency"]["ttft"]
    v = step["verdict"]["passed"]
    verdict_text = "" if v is None else (" SLOs met" if v else " SLOs missed")
    return (
        f"  {step['rate']:g}/s asked, {step['achieved_rate']:.3g}/s started; "
        f"{s['ok']}/{s['requests']} ok; TTFT p50 {_ms(ttft.get('p50'))} p99 {_ms(ttft.get('p99'))};"
        f" audit {step['audit']['status']}{verdict_text}"
    )


def _ms(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1000:.1f} ms"


def _exit_code(results: list[dict[str, Any]], config: LoadConfig) -> int:
    audits = [
        s["audit"] for r in results for s in [*r.get("steps", []), r.get("warmup") or {}] if "audit" in s
    ]
    if any(not a["ok"] for a in audits):
        return EXIT_DAMAGE
    if any("error" in r for r in results):
        return EXIT_ERRORS
    if config.slos:
        for r in results:
            k = r.get("knee")
            if k is None or k["rate"] is None:
                return EXIT_SLO
        return EXIT_OK
    failed = any(s["summary"]["errors"] or s["summary"]["skipped"] for r in results for s in r["steps"])
    return EXIT_ERRORS if failed else EXIT_OK


async def run_load(
    config: LoadConfig, *, say: Any = print, targets: list[Any] | None = None
) -> dict[str, Any]:
    """Run the load ``config`` describes; the run's JSON object, with ``exit_code`` and ``files``."""
    from .loadreport import write_load_report

    ns = Namespace(config.run_id) if config.run_id else Namespace()
    started = datetime.now(UTC)
    run_name = f"{started:%Y%m%d-%H%M%S}-{ns.run_id}-load"
    outdir = config.out / run_name
    outdir.mkdir(parents=True, exist_ok=True)
    if targets is None:
        if not (config.stores or config.serve or config.url or config.floor):
            config.stores = ["memory://"]
        targets = _targets(config, ns, outdir)
    urls = {u for u in [*config.stores, *config.serve] if scheme_of(u) != "memory"}
    servers = {mask_url(u): await server_version(u) for u in sorted(urls)}
    results = []
    clock0 = time.monotonic()
    for i, target in enumerate(targets):
        try:
            result = await _run_target(target, config, i, say)
        except Exception as exc:
            result = {
                "name": target.name,
                "kind": target.kind,
                "error": f"{type(exc).__name__}: {exc}",
                "steps": [],
            }
            say(f"{target.name}: could not run: {result['error']}")
        finally:
            store_url = getattr(target, "store_url", None)
            if store_url:
                with contextlib.suppress(Exception):
                    await ns.cleanup(store_url)
        results.append(result)
    record: dict[str, Any] = {
        "schema": "convcore-bench-load/1",
        "run_id": ns.run_id,
        "run_name": run_name,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "wall_s": time.monotonic() - clock0,
        "command": config.argv,
        "environment": {**environment(), "servers": servers},
        "config": config.public(),
        "targets": results,
        "exit_code": _exit_code(results, config),
    }
    record["files"] = write_load_report(record, outdir, plots=config.plots)
    return record
