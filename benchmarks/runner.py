"""One benchmark run: every target, its floor, the workloads, the audit, the cleanup.

For each target the floor on the same store is entered first and each
workload runs on the floor and then on the target with the same shape, so
every figure has its ratio from the same minute. The run's conversations
are read back and audited, deleted, and the run's keys or tables dropped.

Exit codes: 0 clean; 1 the audit found damage (lost, split, duplicated or
misordered turns); 3 no damage, but turns failed, timed out or a target
could not be run.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convcore import count_message, default_registry, get_tokenizer

from .audit import RunAudit, audit_run
from .cpu import cpu_mark, cpu_spent
from .driver import TurnText, prefill_content
from .faults import FAULTS
from .memory import peak_memory
from .namespaces import Namespace, scheme_of, server_version
from .report import Reporter, annotate, environment, verdicts
from .targets import EndpointTarget, LibraryTarget, ServiceTarget, mask_url
from .workloads import Ledger, Limits, run_w1, run_w2, run_w3

__all__ = ["EXIT_DAMAGE", "EXIT_ERRORS", "EXIT_OK", "RunConfig", "run"]

EXIT_OK, EXIT_DAMAGE, EXIT_ERRORS = 0, 1, 3


@dataclass
class RunConfig:
    """Everything a run needs; the CLI fills it from its flags."""

    workloads: list[str] = field(default_factory=lambda: ["w1", "w2", "w3"])
    stores: list[str] = field(default_factory=list)  # library targets
    serve: list[str] = field(default_factory=list)  # `convcore serve` targets, by store URL
    url: str | None = None  # an external endpoint
    api_key: str | None = None
    model: str | None = None
    history_mode: str = "server"
    sessions: list[int] = field(default_factory=lambda: [1, 8, 64])
    turns: int = 10
    histories: list[int] = field(default_factory=lambda: [100, 1_000, 10_000, 100_000])
    samples: int = 30
    warmup: int = 3
    writers: int = 16
    writer_turns: int = 10
    latency: float = 0.0
    tokens_per_second: float = 0.0
    max_new_tokens: int = 256
    serialize: bool = False
    floor: bool = True
    input_words: int = 12
    history_tokens: int = 120
    prefill_batch: int = 500
    connections: int = 64
    turn_timeout: float = 30.0
    max_seconds: float = 1800.0
    fault: str | None = None
    fault_every: int = 5
    out: Path = Path("benchmarks/results")
    plots: bool = True
    progress: bool = True
    run_id: str | None = None
    serve_args: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["stores"] = [mask_url(u) for u in self.stores]
        data["serve"] = [mask_url(u) for u in self.serve]
        data["api_key"] = "***" if self.api_key else None
        return data


def _targets(config: RunConfig, ns: Namespace, logs: Path, wrap: Any) -> list[Any]:
    text = TurnText(config.input_words, config.history_tokens)
    if config.fault and wrap is None:
        fault = FAULTS[config.fault]
        every = config.fault_every

        def wrap(store: Any) -> Any:
            return fault(store, every)

    common = {"namespace": ns, "text": text, "max_new_tokens": config.max_new_tokens}
    targets: list[Any] = [
        LibraryTarget(
            url,
            latency=config.latency,
            tokens_per_second=config.tokens_per_second,
            serialize=config.serialize,
            prefill_batch=config.prefill_batch,
            wrap=wrap,
            **common,
        )
        for url in config.stores
    ]
    targets += [
        ServiceTarget(
            url,
            logs=logs,
            latency=config.latency,
            tokens_per_second=config.tokens_per_second,
            connections=config.connections,
            turn_timeout=config.turn_timeout,
            serialize=config.serialize,
            prefill_batch=config.prefill_batch,
            serve_args=config.serve_args,
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


def window_messages(config: RunConfig) -> int:
    """How many pre-filled messages the engine's window holds: the floor reads as many."""
    spec = default_registry().get(None)
    tok = get_tokenizer(spec.encoding)
    per = count_message(tok, "user", prefill_content("x" * 10, 12345, config.history_tokens)[1])
    return max(2, (spec.context_window - config.max_new_tokens) // max(per, 1))


async def _run_target(target: Any, config: RunConfig, rep: Reporter, limits: Limits) -> dict[str, Any]:
    ns: Namespace = target.namespace
    tail = window_messages(config)
    result: dict[str, Any] = {
        "name": target.name,
        "kind": target.kind,
        "store": mask_url(getattr(target, "store_url", "") or "") or None,
        "floor": None,
    }
    ledger = Ledger()
    floor_cm = target.floor(tail) if config.floor else contextlib.nullcontext(None)
    async with target, floor_cm as floor:
        result["floor"] = floor.name if floor is not None else None
        result["floor_tail_messages"] = tail if floor is not None else None
        result["store_options"] = getattr(target, "store_options", {})
        runs = [(floor, "f", None), (target, "t", ledger)]
        runs = [r for r in runs if r[0] is not None]
        base = f"ccb-{ns.run_id}"
        text = TurnText(config.input_words, config.history_tokens)
        if "w1" in config.workloads:
            rows = []
            for s in config.sessions:
                row: dict[str, Any] = {"sessions": s}
                for driver, role, led in runs:
                    label = f"W1 S={s} {'floor' if role == 'f' else 'target'}"
                    owner = target if role == "t" else driver
                    with rep.task(target.name, label, s * config.turns) as tick:
                        before = cpu_mark(owner)
                        measured = await run_w1(
                            driver,
                            tag=f"{base}-{role}w1s{s}",
                            sessions=s,
                            turns=config.turns,
                            text=text,
                            ledger=led,
                            limits=limits,
                            tick=tick,
                        )
                        measured["cpu"] = cpu_spent(before, cpu_mark(owner), s * config.turns)
                        row["floor" if role == "f" else "target"] = measured
                rows.append(row)
            result["w1"] = rows
        if "w2" in config.workloads:
            w2: dict[str, Any] = {}
            for driver, role, led in runs:
                label = f"W2 H≤{max(config.histories):,} {'floor' if role == 'f' else 'target'}"
                total = len(config.histories) * (config.samples + config.warmup)
                with rep.task(target.name, label, total) as tick:
                    w2["floor" if role == "f" else "target"] = await run_w2(
                        driver,
                        tag=f"{base}-{role}w2",
                        histories=config.histories,
                        samples=config.samples,
                        warmup=config.warmup,
                        text=text,
                        ledger=led,
                        limits=limits,
                        tick=tick,
                    )
            result["w2"] = w2
        if "w3" in config.workloads:
            w3: dict[str, Any] = {}
            for driver, role, led in runs:
                label = f"W3 C={config.writers} {'floor' if role == 'f' else 'target'}"
                with rep.task(target.name, label, config.writers * config.writer_turns) as tick:
                    w3["floor" if role == "f" else "target"] = await run_w3(
                        driver,
                        tag=f"{base}-{role}w3",
                        writers=config.writers,
                        turns=config.writer_turns,
                        text=text,
                        ledger=led,
                        limits=limits,
                        tick=tick,
                    )
            result["w3"] = w3
        result["memory"] = peak_memory(target)
        with rep.status(f"{target.name}: auditing {len(ledger.turns)} conversations"):
            audit: RunAudit = await audit_run(target, ledger)
        result["audit"] = audit.as_dict()
        with contextlib.suppress(Exception):
            await target.forget(ledger.conversations())
    return result


def _turn_errors(result: dict[str, Any]) -> int:
    n = 0
    for row in result.get("w1", []):
        n += sum(row[k]["errors"] + row[k]["skipped"] for k in ("floor", "target") if k in row)
    for role in ("floor", "target"):
        if role in result.get("w2", {}):
            n += sum(p.get("errors", 0) + p.get("skipped", 0) for p in result["w2"][role]["points"])
        if role in result.get("w3", {}):
            n += result["w3"][role]["errors"] + result["w3"][role]["skipped"]
    return n


async def run(config: RunConfig, *, wrap: Any = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run the benchmark ``config`` describes; the run's JSON object, with ``exit_code``."""
    ns = Namespace(config.run_id) if config.run_id else Namespace()
    started = datetime.now(UTC)
    run_name = f"{started:%Y%m%d-%H%M%S}-{ns.run_id}"
    outdir = config.out / run_name
    outdir.mkdir(parents=True, exist_ok=True)
    rep = reporter or Reporter(progress=config.progress)
    limits = Limits(turn_timeout=config.turn_timeout, deadline=time.monotonic() + config.max_seconds)
    if not (config.stores or config.serve or config.url):
        config.stores = ["memory://"]
    targets = _targets(config, ns, outdir, wrap)
    urls = {u for u in [*config.stores, *config.serve] if scheme_of(u) != "memory"}
    servers = {mask_url(u): await server_version(u) for u in sorted(urls)}
    results = []
    with rep.live():
        for target in targets:
            try:
                result = await _run_target(target, config, rep, limits)
            except Exception as exc:
                result = {"name": target.name, "kind": target.kind, "error": f"{type(exc).__name__}: {exc}"}
                rep.error(target.name, result["error"])
            finally:
                store_url = getattr(target, "store_url", None)
                if store_url:
                    with contextlib.suppress(Exception):
                        cleaned = await ns.cleanup(store_url)
                        result["cleanup"] = cleaned
            results.append(result)
    damaged = any(not r.get("audit", {}).get("ok", True) for r in results)
    failed = any("error" in r or _turn_errors(r) for r in results)
    exit_code = EXIT_DAMAGE if damaged else EXIT_ERRORS if failed else EXIT_OK
    record: dict[str, Any] = {
        "schema": "convcore-bench/1",
        "run_id": ns.run_id,
        "run_name": run_name,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "command": config.argv,
        "environment": {**environment(), "servers": servers},
        "config": config.public(),
        "targets": results,
        "exit_code": exit_code,
    }
    annotate(record)
    record["verdicts"] = verdicts(record)
    record["files"] = rep.write(record, outdir, plots=config.plots)
    rep.summary(record)
    return record
