"""The OpenAPI document is the contract: schemathesis against a real ``convcore serve``.

One ``convcore serve`` (SQLite store, scenes on, an API key) is started as a
child process; schemathesis reads its ``/openapi.json`` and runs every check
(server errors, status codes, response schemas, content types and headers,
schema-valid data accepted, schema-invalid data rejected, missing headers,
unsupported methods and ``Allow``, auth, use after delete, ...) in the
coverage, fuzzing and stateful phases. Its settings, and the one list of
exceptions with their reasons, are in ``schemathesis.toml`` next to this file.

The run is bounded (examples per operation, stateful scenarios and steps)
and reproducible (a fixed seed), and prints its size and every failure. Set
``CONVCORE_OPENAPI_PATHS`` to a regex of paths to check only those while
working on them; CI checks every operation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serve_process import KEY, ServeProcess

CONFIG = Path(__file__).with_name("schemathesis.toml")
HOOKS = Path(__file__).with_name("openapi_hooks.py")
RUN_TIMEOUT = 240.0


def _report(report_dir: Path) -> dict[str, Any]:
    reports = sorted(report_dir.glob("*.json"))
    assert reports, f"schemathesis wrote no JSON report into {report_dir}"
    data: dict[str, Any] = json.loads(reports[-1].read_text())
    return data


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_the_service_does_what_its_openapi_document_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = ServeProcess(f"sqlite:///{tmp_path / 'conformance.db'}", tmp_path)
    report_dir = tmp_path / "report"
    only = os.environ.get("CONVCORE_OPENAPI_PATHS")
    with service:
        command = [
            sys.executable, "-m", "schemathesis.cli",
            "--config-file", str(CONFIG),
            "run", f"{service.base}/openapi.json",
            "--header", f"Authorization: Bearer {KEY}",
            "--no-color",
            "--report", "json", "--report-dir", str(report_dir),
            *(("--include-path-regex", only) if only else ()),
        ]  # fmt: skip
        models = httpx.get(f"{service.base}/api/v2/models", headers=service.headers).json()["data"]
        window = min(m["context_window"] for m in models)
        started = time.monotonic()
        run = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=tmp_path,
            check=False,
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "CONVCORE_CONTEXT_WINDOW": str(window)},
        )
        seconds = time.monotonic() - started
    report = _report(report_dir)
    operations = report["operations"]
    cases = report["test_cases"]
    # Shown in every run, passing or not: how much of the document was checked.
    with capsys.disabled():
        print(
            f"\nschemathesis: {operations['tested']} of {operations['total']} operations, "
            f"{cases['generated']} cases, {cases['unique_failures']} unique failures, "
            f"{len(report['errors'])} errors, in {seconds:.0f} s"
        )
        for failure in report["failures"]:
            print(
                f"  {failure['code']} {failure['title']}: {failure['count']} in {', '.join(failure['operations'])}"
            )
    output = run.stdout + run.stderr
    assert operations["errored"] == 0 and not report["errors"], output[-20000:]
    assert operations["tested"] == operations["selected"], output[-20000:]
    assert cases["unique_failures"] == 0 and run.returncode == 0, output[-20000:]
