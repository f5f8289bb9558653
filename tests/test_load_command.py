"""``python -m benchmarks load`` end to end, small and bounded: the library on
memory://, the streaming floor and a real ``convcore serve`` over HTTP, the
report files, a damaging run failing whatever its latency, bad arguments, and
Locust's distributed mode writing one report from merged histograms."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.cli import main
from benchmarks.load import EXIT_SLO
from benchmarks.runner import EXIT_DAMAGE, EXIT_OK
from benchmarks.serve import floor_command
from benchmarks.targets import free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--turns", "2", "--think", "const:0.02", "--input-words", "uniform:20,40", "--warmup", "1"]


def _start_floor(env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """The floor's process on a free port, once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen(floor_command(port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the floor did not start")


def _record(out: Path) -> dict[str, Any]:
    (result,) = out.glob("*/result.json")
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def test_a_sweep_on_the_library_finds_the_knee_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["load", "--store", "memory://", "--rate", "4,8", "--sessions", "6", *SMALL,
                 "--max-new-tokens", "8", "--slo", "ttft_p99=5", "--slo", "e2e_p95=5", "--out", str(out)])  # fmt: skip
    record = _record(out)
    assert code == EXIT_OK
    (target,) = record["targets"]
    assert [s["rate"] for s in target["steps"]] == [4.0, 8.0] and target["knee"]["rate"] == 8.0
    for step in target["steps"]:
        s = step["summary"]
        assert s["ok"] == 12 and s["errors"] == 0 and step["audit"]["status"] == "ok"
        assert step["audit"]["acknowledged"] == 12 and step["verdict"]["passed"] is True
        assert s["full_replies"] == 12, "the echo of 20+ words fills an 8-token budget"
        assert set(s["latency"]["ttft"]) >= {"p50", "p90", "p95", "p99", "p99.9"}
    assert record["environment"]["versions"]["hdrhistogram"]
    page = (Path(record["files"]["html"])).read_text()
    assert page.count("data:image/png;base64,") == 3 and "<link" not in page and 'src="http' not in page
    for name in ("latency_vs_rate", "latency_distributions", "goodput_vs_rate"):
        assert Path(record["files"][name]).stat().st_size > 10_000


def test_a_run_that_damages_data_fails_whatever_its_latency(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["load", "--store", "memory://", "--rate", "20", "--sessions", "10", *SMALL, "--fault", "drop",
                 "--fault-every", "3", "--slo", "ttft_p99=10", "--out", str(out), "--no-plots"])  # fmt: skip
    (target,) = _record(out)["targets"]
    assert code == EXIT_DAMAGE
    assert target["steps"][0]["verdict"]["passed"] is True and target["steps"][0]["audit"]["lost"] > 0


def test_missing_the_slo_at_every_rate_is_exit_4(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["load", "--store", "memory://", "--rate", "5", "--sessions", "3", *SMALL,
                 "--first-token-delay", "0.02", "--slo", "ttft_p50=0.001", "--out", str(out), "--no-plots"])  # fmt: skip
    (target,) = _record(out)["targets"]
    assert code == EXIT_SLO and target["knee"]["rate"] is None
    check = target["steps"][0]["verdict"]["checks"][0]
    assert check["met"] is False and check["value"] >= 0.02


def test_the_floor_streams_at_its_configured_first_token_delay(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["load", "--floor", "--arrival", "constant", "--rate", "40", "--sessions", "20", "--turns", "1",
                 "--first-token-delay", "0.02", "--max-new-tokens", "4", "--warmup", "2", "--out", str(out),
                 "--no-plots"])  # fmt: skip
    (target,) = _record(out)["targets"]
    step = target["steps"][0]
    ttft = step["summary"]["latency"]["ttft"]
    assert code == EXIT_OK and step["summary"]["ok"] == 20
    assert 0.02 <= ttft["p50"] < 0.04
    assert step["achieved_rate"] == pytest.approx(40, rel=0.1)
    assert step["client_cpu_per_request_ms"] > 0 and step["server_cpu_per_request_ms"] >= 0
    assert step["audit"]["status"] == "unaudited"


def test_a_real_convcore_serve_is_loaded_and_audited(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["load", "--serve", f"sqlite:///{tmp_path / 'load.db'}", "--rate", "10", "--sessions", "5",
                 *SMALL, "--first-token-delay", "0.01", "--out", str(out), "--no-plots"])  # fmt: skip
    (target,) = _record(out)["targets"]
    step = target["steps"][0]
    assert code == EXIT_OK, target.get("error") or step["summary"]["error_examples"]
    assert (
        step["summary"]["ok"] == 10
        and step["audit"]["status"] == "ok"
        and step["audit"]["acknowledged"] == 10
    )
    assert step["summary"]["latency"]["ttft"]["p50"] >= 0.01
    assert step["summary"]["tokens_in_per_s"] > 0, "usage from the server's last chunk"


def test_any_endpoint_by_url_with_client_kept_history(tmp_path: Path) -> None:
    """An OpenAI-style server (here the floor) by URL: history resent by the
    client, so there is nothing to read back and the run says so."""
    floor, port = _start_floor()
    try:
        out = tmp_path / "out"
        code = main(["load", "--url", f"http://127.0.0.1:{port}/v1", "--history-mode", "client", "--model", "m",
                     "--rate", "10", "--sessions", "4", *SMALL, "--max-new-tokens", "5", "--out", str(out),
                     "--no-plots"])  # fmt: skip
    finally:
        floor.terminate()
        floor.wait(timeout=10)
    (target,) = _record(out)["targets"]
    step = target["steps"][0]
    assert code == EXIT_OK, target.get("error") or step["summary"]["error_examples"]
    assert target["kind"] == "endpoint" and target["history"] == "client"
    assert step["summary"]["ok"] == 8 and step["summary"]["mean_tokens_out"] == 5
    assert step["audit"]["status"] == "unaudited"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slo", "latency_p99=1"], "unknown metric"),
        (["--rate", "0"], "rates must be"),
        (["--think", "gauss:1"], "unknown distribution"),
        (["--history-mode", "client"], "goes with --url"),
        (["--serve", "memory://", "--fault", "drop"], "--fault wraps library stores"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["load", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_locust_workers_histograms_merge_into_one_report(tmp_path: Path) -> None:
    """Master and two worker processes against the floor; the master's report holds
    every worker's requests, from merged histograms."""
    floor, port = _start_floor({**os.environ, "CCB_FLOOR_FIRST_TOKEN_S": "0.005"})
    try:
        env = {**os.environ, "CCB_RATE": "4", "CCB_TURNS": "2", "CCB_THINK": "const:0.05", "CCB_AUDIT": "0",
               "CCB_MAX_NEW_TOKENS": "4", "CCB_SLO": "ttft_p99=5", "CCB_OUT": str(tmp_path / "out")}  # fmt: skip
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless",
             "--processes", "2", "-u", "2", "-r", "2", "-t", "4s", "--host", f"http://127.0.0.1:{port}",
             "--only-summary", "--loglevel", "WARNING"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        floor.terminate()
        floor.wait(timeout=10)
    assert run.returncode == 0, run.stderr[-2000:]
    record = _record(tmp_path / "out")
    (target,) = record["targets"]
    step = target["steps"][0]
    assert target["kind"] == "locust" and target["processes"] >= 2
    assert step["rate"] == 8.0, "4 sessions/s per user × 2 users"
    assert step["summary"]["ok"] >= 10 and step["summary"]["errors"] == 0
    assert step["sessions"] >= 5 and step["verdict"]["passed"] is True
    assert Path(record["files"]["html"]).exists()
