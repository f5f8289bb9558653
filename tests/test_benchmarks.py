"""The load benchmarks: each workload on memory:// at tiny sizes, the CLI's
files, the audit failing runs on deliberately broken stores, and the HTTP
target against a real ``convcore serve`` subprocess."""

from __future__ import annotations

import json
import py_compile
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.audit import audit_run
from benchmarks.cli import main
from benchmarks.cpu import CpuMark, cpu_spent
from benchmarks.driver import TurnText
from benchmarks.faults import DroppingStore, SplittingStore
from benchmarks.namespaces import Namespace
from benchmarks.report import Reporter, cpu_line
from benchmarks.runner import EXIT_DAMAGE, EXIT_OK, RunConfig, run
from benchmarks.targets import HttpClient, LibraryTarget
from benchmarks.workloads import Ledger, Limits, run_w1, run_w2, run_w3

pytestmark = pytest.mark.anyio

TINY = ["--sessions", "1,3", "--turns", "3", "--history", "10,40", "--samples", "3", "--warmup", "1"]
TINY += ["--writers", "4", "--writer-turns", "3", "--quiet"]


def _library(**kw: Any) -> LibraryTarget:
    return LibraryTarget("memory://", namespace=Namespace(), text=TurnText(), **kw)


def _latest(out: Path) -> dict[str, Any]:
    (result,) = out.glob("*/result.json")
    data: dict[str, Any] = json.loads(result.read_text())
    return data


async def test_w1_counts_every_turn_and_the_audit_passes() -> None:
    ledger = Ledger()
    async with _library() as target:
        result = await run_w1(
            target, tag="t", sessions=3, turns=4, text=TurnText(), ledger=ledger, limits=Limits()
        )
        audit = await audit_run(target, ledger)
    assert (result["turns"], result["errors"], result["skipped"]) == (12, 0, 0)
    assert result["p50_s"] <= result["p95_s"] <= result["p99_s"]
    assert result["turns_per_s"] > 0
    assert audit.ok and audit.conversations == 3 and audit.acknowledged == 12 and audit.messages == 24


async def test_w2_prefills_to_each_history_length() -> None:
    ledger = Ledger()
    async with _library(prefill_batch=16) as target:
        result = await run_w2(
            target,
            tag="t",
            histories=[10, 50],
            samples=3,
            warmup=1,
            text=TurnText(),
            ledger=ledger,
            limits=Limits(),
        )
        stored = await target.engine.store.read_messages(result["conv_uid"])  # type: ignore[union-attr]
        audit = await audit_run(target, ledger)
    assert [p["history"] for p in result["points"]] == [10, 50]
    assert all(p["turns"] == 3 and p["errors"] == 0 for p in result["points"])
    assert len(stored) == 50 + 2 * 4  # pre-fill up to 50, plus the turns timed at 50
    assert audit.ok, audit.problems


async def test_w3_contention_on_one_conversation_is_clean() -> None:
    ledger = Ledger()
    async with _library() as target:
        result = await run_w3(
            target, tag="t", writers=6, turns=3, text=TurnText(), ledger=ledger, limits=Limits()
        )
        audit = await audit_run(target, ledger)
    assert result["turns"] == 18
    assert audit.ok and audit.conversations == 1 and audit.messages == 36


async def test_turns_past_the_deadline_are_skipped_not_run() -> None:
    async with _library() as target:
        result = await run_w1(
            target, tag="t", sessions=2, turns=3, text=TurnText(), ledger=None, limits=Limits(deadline=0.0)
        )
    assert (result["turns"], result["skipped"]) == (0, 6)


def test_cli_writes_json_and_plots(tmp_path: Path) -> None:
    assert main([*TINY, "--store", "memory://", "--out", str(tmp_path)]) == EXIT_OK
    record = _latest(tmp_path)
    assert record["exit_code"] == 0 and record["environment"]["versions"]["convcore"]
    (target,) = record["targets"]
    assert [row["sessions"] for row in target["w1"]] == [1, 3]
    assert all(row["ratio"]["throughput"] > 0 for row in target["w1"])
    assert [p["history"] for p in target["w2"]["target"]["points"]] == [10, 40]
    assert target["w3"]["target"]["turns"] == 12
    assert target["audit"]["ok"] and target["audit"]["acknowledged"] > 0
    for name in ("latency_vs_history", "throughput_vs_sessions"):
        png = Path(record["files"][name])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs.jsonl").read_text().count("\n") == 1


def test_python_dash_m_and_convcore_bench_are_the_same_entry(tmp_path: Path) -> None:
    from convcore.cli import main as convcore_main

    assert (
        convcore_main(
            [
                "bench",
                "w3",
                "--writers",
                "2",
                "--writer-turns",
                "2",
                "--quiet",
                "--no-plots",
                "--out",
                str(tmp_path),
            ]
        )
        == EXIT_OK
    )
    assert _latest(tmp_path)["config"]["workloads"] == ["w3"]


@pytest.mark.parametrize("fault", ["drop", "split"])
def test_audit_fails_the_run_of_a_broken_store(
    tmp_path: Path, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["w1", "w3", *TINY, "--fault", fault, "--fault-every", "3", "--no-plots", "--out", str(tmp_path)]
    )
    assert code == EXIT_DAMAGE
    audit = _latest(tmp_path)["targets"][0]["audit"]
    kind = "lost" if fault == "drop" else "split"
    assert audit[kind] > 0 and not audit["ok"]
    assert f"AUDIT FAILED library memory://: {kind}=" in capsys.readouterr().out


async def test_a_store_that_silently_drops_appends_is_caught(tmp_path: Path) -> None:
    """The test suite's own broken store, passed in as the run's store wrapper."""
    config = RunConfig(workloads=["w1"], sessions=[2], turns=5, out=tmp_path, plots=False, progress=False)
    record = await run(
        config, wrap=lambda store: DroppingStore(store, every=4), reporter=Reporter(progress=False)
    )
    assert record["exit_code"] == EXIT_DAMAGE
    audit = record["targets"][0]["audit"]
    assert audit["lost"] == 10 // 4 and audit["split"] == audit["duplicated"] == 0
    assert any("acknowledged turns are missing" in p for p in audit["problems"])


async def test_a_split_turn_is_caught_on_one_conversation() -> None:
    ledger = Ledger()
    async with _library(wrap=lambda store: SplittingStore(store, every=2)) as target:
        await run_w3(target, tag="t", writers=3, turns=2, text=TurnText(), ledger=ledger, limits=Limits())
        audit = await audit_run(target, ledger)
    assert audit.split > 0 and audit.lost == 0 and not audit.ok


def test_the_locustfile_compiles() -> None:
    py_compile.compile(str(Path(__file__).parents[1] / "benchmarks" / "locustfile.py"), doraise=True)


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_http_target_against_a_real_convcore_serve(tmp_path: Path, store: str) -> None:
    """A shared store is audited directly; memory:// lives in the server and
    is read back (and pre-filled) over HTTP."""
    url = f"sqlite:///{tmp_path / 'http.db'}" if store == "sqlite" else "memory://"
    code = main(
        ["w1", "w3", "--sessions", "4", "--turns", "3", "--writers", "4", "--writer-turns", "3", "--quiet",
         "--no-plots", "--serve", url, "--out", str(tmp_path / "out")]
    )  # fmt: skip
    record = _latest(tmp_path / "out")
    (target,) = record["targets"]
    assert code == EXIT_OK, target.get("error") or target.get("audit")
    assert target["kind"] == "http" and target["floor"] == "floor:minimal ASGI app"
    assert target["w1"][0]["target"]["turns"] == 12 and target["w1"][0]["ratio"]["throughput"] > 0
    assert target["audit"]["ok"] and target["audit"]["acknowledged"] == 24
    assert target["memory"]["server_peak_mb"] > 10, "the server's own peak RSS is reported"
    # CPU per turn of both server processes is read. The OS counts it in
    # 10 ms ticks: the floor's few turns, and a dozen turns on the memory
    # store, may round to none; a dozen SQLite turns (and their schema) do not.
    cpu = {role: target["w1"][0][role]["cpu"] for role in ("target", "floor")}
    assert cpu["target"]["server_ms_per_turn"] is not None and cpu["floor"]["server_ms_per_turn"] is not None
    assert cpu["target"]["server_ms_per_turn"] > 0 or store == "memory", cpu
    assert cpu["target"]["load_ms_per_turn"] > 0 and cpu["target"]["cores"] >= 1


def test_cpu_per_turn_is_split_between_the_load_process_and_the_server() -> None:
    before = CpuMark(wall=10.0, load=1.0, server=5.0, machine=100.0)
    after = CpuMark(wall=12.0, load=1.5, server=7.0, machine=103.0)
    spent = cpu_spent(before, after, turns=1000)
    assert spent["load_ms_per_turn"] == 0.5 and spent["server_ms_per_turn"] == 2.0
    assert spent["machine_busy_cores"] == 1.5
    no_server = cpu_spent(CpuMark(0.0, 0.0, None, None), CpuMark(1.0, 0.2, None, None), turns=100)
    assert no_server["server_ms_per_turn"] is None and no_server["machine_busy_cores"] is None
    assert cpu_line({"sessions": 1, "target": {"cpu": no_server}}) is None


async def test_the_http_client_reports_a_refused_turn_with_its_status(tmp_path: Path) -> None:
    """Turns go over the harness's own keep-alive pool; a non-200 answer is an error with its body."""
    import asyncio

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"error": "no"}'
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, HttpClient(f"http://127.0.0.1:{port}/api/v2") as client:
        with pytest.raises(RuntimeError, match=r"HTTP 429: \{\"error\": \"no\"\}"):
            await client.post_turn("c1", "hello")


def test_the_stream_ttfb_benchmark_runs_and_reports_each_latency() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "stream_ttfb.py"
    out = subprocess.run(
        [sys.executable, str(script), "--latency", "0,0.02", "--samples", "2", "--rounds", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.splitlines()
    assert out[0].startswith("latency") and len(out) == 3
    # One tree: no growth against itself; its backend's TTFT is the latency asked.
    latency, _, ttfb, _, text, _, ttft, *_ = out[2].split()
    assert latency == "0.020" and float(ttfb) <= float(text), out
    ttft = float(ttft)
    assert 15 < ttft < 200, out


async def test_compaction_cost_runs_both_sides_and_makes_summaries() -> None:
    from benchmarks.compaction import measure

    cost = await measure("memory://", sessions=2, turns=25, window=600, repeats=1)
    assert cost.turns == 50 and cost.off_turns_per_s > 0 and cost.on_turns_per_s > 0
    assert cost.summaries >= 2


def test_turn_cpu_measures_a_tree_on_a_sql_store_and_leaves_no_tables(tmp_path: Path) -> None:
    db = tmp_path / "cpu.db"
    argv = ["--tree", ".", "--store", f"sqlite:///{db}", "--rounds", "1", "--repeats", "1"]
    out = subprocess.run(
        [sys.executable, "benchmarks/turn_cpu.py", *argv, "--sessions", "2", "--turns", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert "µs CPU a turn" in out.stdout
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert tables == [], "the run's tables were dropped"
