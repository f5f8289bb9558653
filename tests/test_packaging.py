"""The wheel: what it installs at the top level of site-packages, and that
the benchmarks work from it under their installed name."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheel(into: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(ROOT),
            "-w",
            str(into),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = into.glob("convcore-*.whl")
    return wheel


def test_the_wheel_installs_no_generic_top_level_package(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {
        "convcore",
        "convcore_bench",
        "convcore_openai",
        "convcore_redis",
        "convcore_scenes",
        "convcore_server",
        "convcore_sql",
    }
    assert "benchmarks" not in top
    assert not any("/results/" in n for n in names)
    assert "convcore_bench/cli.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert "bench = convcore_bench.cli:main [bench]" in z.read(entry_points).decode()


def test_the_installed_benchmarks_run_under_their_own_name(tmp_path: Path) -> None:
    """From the installed wheel alone (no checkout on the path, ``-S``: no
    editable install), ``python -m convcore_bench`` answers and the
    Locust file finds its modules as ``convcore_bench``."""
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(_wheel(tmp_path)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert not (site / "benchmarks").exists()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert run("-m", "convcore_bench", "--help").startswith("usage: python -m convcore_bench ")
    locustfile = site / "convcore_bench" / "locustfile.py"
    out = run(
        "-c",
        "from gevent import monkey; monkey.patch_all()\n"
        "import runpy, sys\n"
        f"g = runpy.run_path({str(locustfile)!r})\n"
        "print(g['SseSplitter'].__module__, 'benchmarks' in sys.modules)",
    )
    assert out.split() == ["convcore_bench.wire", "False"]
