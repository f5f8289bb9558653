"""Latency accounting of the open-loop runner, over real HTTP and SSE, against a
fake endpoint whose delays are known: TTFT, ITL, TPOT and E2E come out as
configured, think time is honoured, failures are counted by kind, and under
overload latency is counted from the intended send time, so the client's own
queueing shows instead of hiding (coordinated omission)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from benchmarks.arrivals import Dist, SessionPlan, plan_sessions
from benchmarks.hdr import LoadMetrics, TurnOutcome
from benchmarks.openloop import run_open_loop
from benchmarks.streams import SseStreamer
from benchmarks.workloads import Ledger

pytestmark = pytest.mark.anyio

MS = 0.001


@dataclass
class Fake:
    """An SSE chat endpoint: ``tokens`` chunks, the first after ``ttft``, then one every ``gap``."""

    ttft: float = 0.03
    gap: float = 0.01
    tokens: int = 4
    script: list[str] = field(
        default_factory=list
    )  # per request, in order: "ok", "503", "error", "cut", "hang"
    received: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = json.loads(await reader.readexactly(length))
                self.received.append(body)
                how = self.script[len(self.received) - 1] if len(self.received) <= len(self.script) else "ok"
                if not await self._answer(writer, body, how):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, body: dict[str, Any], how: str) -> bool:
        if how == "drop":  # close the kept-alive connection without an answer
            return False
        if how == "503":
            text = b'{"error":"busy"}'
            writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
            await writer.drain()
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )

        def chunk(payload: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))

        def event(data: dict[str, Any]) -> None:
            chunk(b"data: " + json.dumps(data).encode() + b"\n\n")

        ident = {"id": f"turn-{len(self.received)}", "conv_uid": body.get("conv_uid")}
        await writer.drain()
        if how == "hang":
            await asyncio.sleep(1.5)
            return False
        await asyncio.sleep(self.ttft)
        for i in range(self.tokens):
            if i:
                await asyncio.sleep(self.gap)
            if how == "error" and i == 1:
                event({**ident, "error": {"message": "model failed", "code": 500}})
                break
            event({**ident, "choices": [{"index": 0, "delta": {"content": f" t{i}"}}]})
            await writer.drain()
            if how == "cut" and i == 1:
                writer.close()
                return False
        usage = {"prompt_tokens": 9, "completion_tokens": self.tokens, "total_tokens": 9 + self.tokens}
        event({**ident, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": usage})
        chunk(b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


@pytest.fixture
async def fake() -> AsyncIterator[tuple[Fake, str]]:
    f = Fake()
    server = await asyncio.start_server(f.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f, f"http://127.0.0.1:{port}/v1/chat/completions"
        server.close()


class Recorder:
    """A streamer wrapper that keeps every outcome, to check the schedule itself."""

    def __init__(self, inner: SseStreamer) -> None:
        self.inner = inner
        self.outcomes: list[TurnOutcome] = []

    async def turn(self, conv_uid: str, text: str, outcome: TurnOutcome) -> None:
        await self.inner.turn(conv_uid, text, outcome)
        self.outcomes.append(outcome)


def _plans(n: int, gap: float, turns: int = 1, think: float = 0.0) -> list[SessionPlan]:
    return [SessionPlan(i, i * gap, [5] * turns, [0.0] + [think] * (turns - 1)) for i in range(n)]


async def test_known_delays_give_known_ttft_itl_tpot_and_e2e(fake: tuple[Fake, str]) -> None:
    f, url = fake
    streamer = SseStreamer(url, max_new_tokens=4, timeout=5)
    metrics = LoadMetrics(max_new_tokens=4)
    ledger = Ledger()
    schedule = await run_open_loop(streamer, _plans(10, 0.02), tag="k", metrics=metrics, ledger=ledger)
    await streamer.aclose()
    s = metrics.summary()
    lat = s["latency"]
    assert s["ok"] == 10 and s["errors"] == 0 and s["full_replies"] == 10
    # Lower bounds are exact (the server sleeps at least this long); upper bounds allow a loaded machine.
    assert 30 * MS <= lat["ttft"]["p50"] < 45 * MS
    assert 10 * MS <= lat["itl"]["p50"] < 20 * MS and lat["itl"]["count"] == 30
    assert 10 * MS <= lat["tpot"]["p50"] < 20 * MS
    assert 60 * MS <= lat["e2e"]["p50"] < 85 * MS
    assert lat["send_lag"]["p50"] < 10 * MS
    assert s["tokens_out_per_s"] > 0 and metrics.tokens_in == 90 and metrics.tokens_out == 40
    assert schedule["achieved_rate"] == pytest.approx(50, rel=0.2)
    assert [b["conv_uid"] for b in f.received] == [f"k-s{i}" for i in range(10)]
    assert sum(len(v) for v in ledger.turns.values()) == 10


async def test_the_next_turn_waits_for_the_reply_and_the_think_time(fake: tuple[Fake, str]) -> None:
    f, url = fake
    rec = Recorder(SseStreamer(url, max_new_tokens=4, timeout=5))
    await run_open_loop(rec, _plans(1, 0.0, turns=3, think=0.05), tag="th", metrics=LoadMetrics())
    await rec.inner.aclose()
    first, second, third = rec.outcomes
    assert second.intended == pytest.approx(first.end + 0.05, abs=1e-9)
    assert third.intended == pytest.approx(second.end + 0.05, abs=1e-9)
    assert second.sent >= second.intended and third.sent >= third.intended
    assert len(f.received) == 3


async def test_under_overload_latency_counts_from_the_intended_send_time(fake: tuple[Fake, str]) -> None:
    """One connection, 50 ms per request, a request every 25 ms: request i waits
    about 25·i ms for the connection. Timed from when it was sent, every request
    would look like 50 ms; timed from when it was due, the queue shows."""
    f, url = fake
    f.ttft, f.tokens = 0.05, 1
    rec = Recorder(SseStreamer(url, max_new_tokens=1, connections=1, timeout=10))
    metrics = LoadMetrics()
    await run_open_loop(rec, _plans(12, 0.025), tag="o", metrics=metrics)
    await rec.inner.aclose()
    from_sent = sorted(o.token_times[0] - o.sent for o in rec.outcomes)
    from_intended = sorted(o.token_times[0] - o.intended for o in rec.outcomes)
    assert from_sent[-1] < 0.15, "each request itself is quick once sent"
    assert from_intended[-1] >= 0.05 + 11 * 0.025 - 0.005, "the last one waited behind eleven others"
    ttft = metrics.summary()["latency"]["ttft"]
    assert ttft["max"] == pytest.approx(from_intended[-1], rel=0.01)
    assert ttft["p50"] > 0.15 > from_sent[len(from_sent) // 2]
    assert metrics.summary()["latency"]["send_lag"]["max"] >= 11 * 0.025 - 0.005
    # What a closed-loop tool would report is kept, as a diagnostic, and hides the queue.
    assert metrics.summary()["latency"]["ttft_from_send"]["p99"] < 0.15


async def test_the_client_concurrency_cap_is_queueing_that_latency_shows(fake: tuple[Fake, str]) -> None:
    f, url = fake
    f.ttft, f.tokens = 0.04, 1
    streamer = SseStreamer(url, max_new_tokens=1, timeout=10)
    metrics = LoadMetrics()
    await run_open_loop(streamer, _plans(8, 0.0), tag="c", metrics=metrics, max_concurrency=2)
    await streamer.aclose()
    # Four waves of two: the last wave is due at 0 and answers after about 160 ms.
    assert metrics.summary()["latency"]["ttft"]["max"] >= 4 * 0.04 - 0.005


async def test_failures_are_counted_by_kind_and_never_as_latency(fake: tuple[Fake, str]) -> None:
    f, url = fake
    f.script = ["ok", "503", "error", "cut", "hang", "ok"]
    streamer = SseStreamer(url, max_new_tokens=4, timeout=0.5)
    metrics = LoadMetrics(max_new_tokens=4)
    ledger = Ledger()
    # One session, six turns, in order, so the script lines up with the turns.
    await run_open_loop(streamer, _plans(1, 0.0, turns=6), tag="e", metrics=metrics, ledger=ledger)
    await streamer.aclose()
    s = metrics.summary()
    assert s["errors_by_kind"] == {"http_503": 1, "stream_error": 1, "protocol": 1, "timeout": 1}
    assert s["ok"] == 2 and s["requests"] == 6 and s["error_rate"] == pytest.approx(4 / 6)
    assert s["latency"]["ttft"]["count"] == 2 and s["latency"]["e2e"]["count"] == 2
    assert sum(len(v) for v in ledger.turns.values()) == 2, "only acknowledged turns go to the audit"


async def test_turns_due_after_the_drain_are_skipped_not_run(fake: tuple[Fake, str]) -> None:
    _f, url = fake
    streamer = SseStreamer(url, max_new_tokens=4, timeout=5)
    metrics = LoadMetrics()
    await run_open_loop(streamer, _plans(2, 0.0, turns=3, think=5.0), tag="d", metrics=metrics, drain=0.5)
    await streamer.aclose()
    assert metrics.requests == 2 and metrics.skipped == 4


async def test_a_seeded_plan_runs_against_the_endpoint(fake: tuple[Fake, str]) -> None:
    f, url = fake
    f.ttft, f.gap = 0.005, 0.001
    plans = plan_sessions(
        rate=40, count=20, process="poisson", turns=Dist.parse("2"), think=Dist.parse("const:0.01"),
        input_words=Dist.parse("uniform:3,9"), seed=5,
    )  # fmt: skip
    streamer = SseStreamer(url, max_new_tokens=4, timeout=5)
    metrics = LoadMetrics(limits={"ttft": 10.0})
    await run_open_loop(streamer, plans, tag="p", metrics=metrics)
    await streamer.aclose()
    assert metrics.ok == 40 and metrics.good == 40
    assert {len(b["messages"].split(": ", 1)[1].split()) for b in f.received} <= set(range(3, 10))


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_once(fake: tuple[Fake, str]) -> None:
    f, url = fake
    f.script = ["ok", "drop", "ok", "ok"]
    streamer = SseStreamer(url, max_new_tokens=4, timeout=5)
    metrics = LoadMetrics()
    await run_open_loop(streamer, _plans(1, 0.0, turns=3), tag="r", metrics=metrics)
    await streamer.aclose()
    # The second turn met the dropped connection and went again on a new one.
    assert metrics.ok == 3 and not metrics.errors and len(f.received) == 4


async def test_a_new_connection_closed_without_an_answer_is_an_error(fake: tuple[Fake, str]) -> None:
    f, url = fake
    f.script = ["drop"]
    streamer = SseStreamer(url, max_new_tokens=4, timeout=5)
    metrics = LoadMetrics()
    await run_open_loop(streamer, _plans(1, 0.0), tag="n", metrics=metrics)
    await streamer.aclose()
    assert dict(metrics.errors) == {"protocol": 1} and len(f.received) == 1


async def test_a_precise_wait_returns_at_its_moment_never_before() -> None:
    import time

    from benchmarks.timing import sleep_until

    for spin in (0.0, 0.0015):
        for delay in (0.0, 0.003, 0.02):
            deadline = time.perf_counter() + delay
            await sleep_until(deadline, spin=spin)
            assert time.perf_counter() >= deadline


async def test_client_kept_history_is_resent_whole_each_turn(fake: tuple[Fake, str]) -> None:
    f, url = fake
    streamer = SseStreamer(url, max_new_tokens=4, history="client", model="m", timeout=5)
    metrics = LoadMetrics()
    await run_open_loop(streamer, _plans(1, 0.0, turns=3), tag="h", metrics=metrics)
    await streamer.aclose()
    assert metrics.ok == 3
    last = f.received[-1]
    assert "conv_uid" not in last and last["model"] == "m"
    assert [m["role"] for m in last["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert last["messages"][1]["content"] == " t0 t1 t2 t3", "the reply as it was streamed"
    assert [len(b["messages"]) for b in f.received] == [1, 3, 5]
