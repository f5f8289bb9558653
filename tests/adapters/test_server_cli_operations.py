"""``convcore serve``'s operations flags: limits, metrics, docs, logs, tracing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from convcore_server.cli import UsageError, parse_args


def test_operations_defaults() -> None:
    opts = parse_args(["--api-key", "a"], environ={})
    assert (opts.header_timeout, opts.body_timeout, opts.max_connections) == (10.0, 30.0, 1024)
    assert opts.metrics and opts.metrics_key is None and not opts.otel
    assert (opts.docs, opts.log_format, opts.ready_timeout) == ("public", "text", 2.0)


def test_operations_flags_and_the_metrics_key_from_the_environment() -> None:
    opts = parse_args(
        [
            "--api-key", "a", "--header-timeout", "2.5", "--body-timeout", "4", "--max-connections", "9",
            "--no-metrics", "--docs", "off", "--log-format", "json", "--otel", "--ready-timeout", "0.5",
        ],
        environ={"CONVCORE_METRICS_KEY": "scrape"},
    )  # fmt: skip
    assert (opts.header_timeout, opts.body_timeout, opts.max_connections) == (2.5, 4.0, 9)
    assert not opts.metrics and opts.metrics_key == "scrape" and opts.otel
    assert (opts.docs, opts.log_format, opts.ready_timeout) == ("off", "json", 0.5)


@pytest.mark.parametrize(
    "flag", ["--header-timeout", "--body-timeout", "--max-connections", "--ready-timeout"]
)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_limits_must_be_positive(flag: str, value: str) -> None:
    with pytest.raises(UsageError, match="must be positive"):
        parse_args(["--api-key", "a", flag, value], environ={})


def test_otel_sets_up_the_sdk_with_an_otlp_exporter() -> None:
    code = (
        "from convcore_server.tracing import install_sdk\n"
        "install_sdk()\n"
        "from opentelemetry import trace\n"
        "p = trace.get_tracer_provider()\n"
        "print(type(p).__name__, p.resource.attributes['service.name'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"OTEL_SERVICE_NAME": "chat-a"}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TracerProvider", "chat-a"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_startup_line_follows_the_log_format(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from convcore_server.cli import _banner

    _banner(parse_args(["--store", "memory://", "--no-auth", "--log-format", fmt]), "[m]")
    line = capsys.readouterr().err.strip()
    if fmt == "json":
        entry = json.loads(line)
        assert entry["message"].startswith("convcore serve: http://127.0.0.1:5670/api/v2 store=memory://")
        assert entry["level"] == "info" and entry["request_id"] == "-"
    else:
        assert line.startswith("convcore serve: http://127.0.0.1:5670/api/v2 store=memory://")
