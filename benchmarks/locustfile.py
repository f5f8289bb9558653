"""Open-loop multi-turn sessions under Locust, for load beyond one machine.

The session model of ``python -m benchmarks load``: each Locust user is an
arrival process starting sessions at ``CCB_RATE`` per second (so the total
is ``CCB_RATE`` × users), each session ``CCB_TURNS`` streamed turns apart
by ``CCB_THINK`` seconds, latency timed from every turn's intended send
time. Each process keeps HDR histograms and ships them to the master with
its stats reports; the master adds them (never averages percentiles) and
writes the same report (terminal table, result.json, PNGs, report.html)
when it quits. When the test stops, each process reads back the
conversations it acknowledged (``GET …/conversations/{conv_uid}``); damage
sets exit code 1, a missed SLO exit code 4.

    pip install "convcore[bench]"
    convcore serve --store redis://127.0.0.1:6379/0 --api-key KEY &
    CCB_API_KEY=KEY CCB_RATE=2 CCB_SLO=ttft_p99=0.5,e2e_p95=5 \\
        locust -f benchmarks/locustfile.py --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:5670

Across machines: ``--master --expect-workers N`` on one, ``--worker
--master-host=…`` on the others (same file, same environment); on one
machine ``--processes N`` starts N workers. Settings (environment):
``CCB_RATE`` (sessions/s per user, 1), ``CCB_ARRIVAL`` (poisson, gamma,
constant), ``CCB_BURSTINESS`` (1), ``CCB_TURNS`` (3), ``CCB_THINK``
(exp:1), ``CCB_INPUT_WORDS`` (uniform:40,80), ``CCB_MAX_NEW_TOKENS`` (32),
``CCB_SLO`` (comma-separated, like ttft_p99=0.5), ``CCB_TIMEOUT`` (30),
``CCB_API_KEY``, ``CCB_MODEL``, ``CCB_CHAT_PATH`` (/api/v2/chat/completions),
``CCB_HISTORY`` (server or client), ``CCB_AUDIT`` (1; 0 skips the read-back),
``CCB_OUT`` (benchmarks/results).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

# This file's own package: `benchmarks` in a checkout, `convcore_bench` once installed.
_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))
_PACKAGE = _HERE.name


def _own(module: str) -> Any:
    """A module of this file's package, under whichever name it has here."""
    return importlib.import_module(f"{_PACKAGE}.{module}")


import gevent  # noqa: E402
import gevent.pool  # noqa: E402
import requests  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

Dist, plan_sessions = _own("arrivals").Dist, _own("arrivals").plan_sessions
RunAudit, content_checks = _own("audit").RunAudit, _own("audit").content_checks
TurnText = _own("driver").TurnText
TurnOutcome = _own("hdr").TurnOutcome
LocustTally = _own("locustmerge").LocustTally
Slo, limits_of = _own("slo").Slo, _own("slo").limits_of
apply_event, chat_body, error_kind = (
    getattr(_own("streams"), n) for n in ("apply_event", "chat_body", "error_kind")
)
SseSplitter = _own("wire").SseSplitter

API_KEY = os.environ.get("CCB_API_KEY", "")
MODEL = os.environ.get("CCB_MODEL", "convcore-local")
RATE = float(os.environ.get("CCB_RATE", "1"))
ARRIVAL = os.environ.get("CCB_ARRIVAL", "poisson")
BURSTINESS = float(os.environ.get("CCB_BURSTINESS", "1"))
TURNS = Dist.parse(os.environ.get("CCB_TURNS", "3"))
THINK = Dist.parse(os.environ.get("CCB_THINK", "exp:1"))
INPUT_WORDS = Dist.parse(os.environ.get("CCB_INPUT_WORDS", "uniform:40,80"))
MAX_NEW_TOKENS = int(os.environ.get("CCB_MAX_NEW_TOKENS", "32"))
SLOS = [Slo.parse(s) for s in os.environ.get("CCB_SLO", "").split(",") if s.strip()]
TIMEOUT = float(os.environ.get("CCB_TIMEOUT", "30"))
CHAT_PATH = os.environ.get("CCB_CHAT_PATH", "/api/v2/chat/completions")
HISTORY = os.environ.get("CCB_HISTORY", "server")
AUDIT = os.environ.get("CCB_AUDIT", "1") != "0"
OUT = Path(os.environ.get("CCB_OUT", "benchmarks/results"))

TALLY = LocustTally(limits=limits_of(SLOS), max_new_tokens=MAX_NEW_TOKENS)  # this process's measurements
MERGED = LocustTally(limits=limits_of(SLOS), max_new_tokens=MAX_NEW_TOKENS)  # the master's sum of workers
_acked: dict[str, list[tuple[str | None, str, object]]] = {}  # conv_uid -> (turn_id, text, session)
_users = {"count": 0}  # users spawned in the whole test (the master's count when distributed)


@events.spawning_complete.add_listener
def _spawned(user_count: int, **_: Any) -> None:
    _users["count"] = max(_users["count"], user_count)


class SessionArrivals(User):
    """One arrival process: sessions start on schedule, whether or not earlier ones finished."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.http = requests.Session()
        if API_KEY:
            self.http.headers["Authorization"] = f"Bearer {API_KEY}"
        self.sessions = gevent.pool.Group()
        self.tag = f"ccb-locust-{uuid.uuid4().hex[:10]}"
        self.kept: dict[str, list[dict[str, str]]] = {}

    def on_stop(self) -> None:
        self.sessions.kill(block=True)
        self.http.close()

    @task
    def arrive(self) -> None:
        t0 = time.time() + 0.05
        block = 0
        while True:  # blocks of 1,000 sessions, back to back, until Locust stops the user
            plans = plan_sessions(
                rate=RATE,
                count=1000,
                process=ARRIVAL,
                burstiness=BURSTINESS,
                turns=TURNS,
                think=THINK,
                input_words=INPUT_WORDS,
                seed=random.getrandbits(32),
            )
            for plan in plans:
                gevent.sleep(max(0.0, t0 + plan.start - time.time()))
                self.sessions.spawn(
                    self._session, f"{self.tag}-b{block}-s{plan.index}", plan, t0 + plan.start
                )
            t0 += plans[-1].start + random.expovariate(RATE)
            block += 1

    def _session(self, conv_uid: str, plan: Any, intended: float) -> None:
        last_end = intended
        for k, words in enumerate(plan.input_words):
            if k:
                intended = last_end + plan.think[k]
            gevent.sleep(max(0.0, intended - time.time()))
            text = TurnText(input_words=words).user(f"{conv_uid} t{k}")
            outcome = TurnOutcome(intended=intended)
            self._turn(conv_uid, text, outcome)
            if k == 0:
                TALLY.session_started(outcome.sent)
            TALLY.metrics.record(outcome)
            self.environment.events.request.fire(
                request_type="SSE",
                name="chat turn",
                response_time=(outcome.end - intended) * 1000,
                response_length=len(outcome.content),
                context={},
                exception=None
                if outcome.error is None
                else RuntimeError(f"{outcome.error}: {outcome.detail}"),
            )
            if outcome.error is None:
                _acked.setdefault(outcome.conv_uid or conv_uid, []).append(
                    (outcome.turn_id, text, plan.index)
                )
            last_end = outcome.end

    def _turn(self, conv_uid: str, text: str, outcome: TurnOutcome) -> None:
        history = self.kept.get(conv_uid, []) if HISTORY == "client" else None
        body = chat_body(conv_uid, text, model=MODEL, max_new_tokens=MAX_NEW_TOKENS, history=history)
        outcome.conv_uid = conv_uid
        outcome.sent = time.time()
        try:
            with self.http.post(
                f"{self.host.rstrip('/')}{CHAT_PATH}",
                data=body,
                stream=True,
                timeout=TIMEOUT,
                headers={"Content-Type": "application/json"},
            ) as response:
                if response.status_code != 200:
                    outcome.error, outcome.detail = f"http_{response.status_code}", response.text[:200]
                else:
                    splitter, done = SseSplitter(), False
                    for data in response.iter_content(chunk_size=None):
                        now = time.time()
                        for payload in splitter.feed(data):
                            if payload == b"[DONE]":
                                done = True
                            else:
                                apply_event(json.loads(payload), outcome, now)
                    if outcome.error is None and not done and outcome.finish_reason is None:
                        outcome.error, outcome.detail = "incomplete", "the stream ended before [DONE]"
        except requests.Timeout as exc:
            outcome.error, outcome.detail = "timeout", str(exc)[:200]
        except requests.ConnectionError as exc:
            outcome.error, outcome.detail = "connect", str(exc)[:200]
        except Exception as exc:
            outcome.error, outcome.detail = error_kind(exc), f"{type(exc).__name__}: {exc}"[:200]
        outcome.end = time.time()
        if not outcome.tokens_out:
            outcome.tokens_out = len(outcome.token_times)
        if outcome.error is None and history is not None:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": outcome.content}]
            self.kept[conv_uid] = history


@events.test_stop.add_listener
def audit(environment: Any, **_: Any) -> None:
    """Read back what this process acknowledged; the damage goes into its tally."""
    if isinstance(environment.runner, MasterRunner) or not _acked:
        return
    report = RunAudit()
    if not AUDIT or HISTORY == "client" or not environment.host:
        report.conversations = report.unaudited = len(_acked)
    else:
        import httpx

        headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        api = environment.host.rstrip("/") + CHAT_PATH.removesuffix("/chat/completions")
        with httpx.Client(headers=headers, timeout=30) as client:
            for conv_uid, acked in list(_acked.items()):
                report.conversations += 1
                report.acknowledged += len(acked)
                rows: list[dict[str, Any]] | None = []
                start: int | None = 1
                while start is not None and rows is not None:
                    r = client.get(
                        f"{api}/conversations/{quote(conv_uid, safe='')}",
                        params={"start_seq": start, "limit": 1000},
                    )
                    if r.status_code != 200:
                        rows = None
                        break
                    data = r.json().get("data") or {}
                    rows += data.get("messages") or []
                    start = data.get("next_start_seq")
                if rows is None:
                    report.unaudited += 1
                    continue
                pairs = [
                    (str(m.get("role")), str(m.get("content"))) for m in rows if m.get("role") != "system"
                ]
                content_checks(report, conv_uid, pairs, acked, by_turn_id=False)
    TALLY.audit.update(
        {
            k: getattr(report, k)
            for k in (
                "lost",
                "split",
                "duplicated",
                "misordered",
                "conversations",
                "acknowledged",
                "unaudited",
            )
        }
    )
    _acked.clear()
    print(
        f"convcore audit: {report.conversations} conversations, {report.acknowledged} acknowledged turns, "
        f"damage {report.damage()}"
    )


@events.report_to_master.add_listener
def ship(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["ccb_load"] = TALLY.payload()


@events.worker_report.add_listener
def collect(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if "ccb_load" in data:
        MERGED.absorb(data["ccb_load"])


@events.quitting.add_listener
def report(environment: Any, **_: Any) -> None:
    """On the master (or a lone local runner): one report from the merged histograms."""
    if isinstance(environment.runner, WorkerRunner):
        return
    print_load_summary, write_load_report = (
        _own("loadreport").print_load_summary,
        _own("loadreport").write_load_report,
    )
    run_environment = _own("report").environment

    tally = MERGED if isinstance(environment.runner, MasterRunner) else TALLY
    if tally is TALLY:
        MERGED.absorb(TALLY.payload())
        tally = MERGED
    users = _users["count"] or 1
    settings = {
        "rate_per_user": RATE,
        "users": users,
        "arrival": ARRIVAL,
        "burstiness": BURSTINESS,
        "turns": str(TURNS),
        "think": str(THINK),
        "input_words": str(INPUT_WORDS),
        "max_new_tokens": MAX_NEW_TOKENS,
        "history_mode": HISTORY,
        "host": environment.host,
    }
    record = tally.record(
        host=environment.host or "?", rate=RATE * users, slos=SLOS, settings=settings, env=run_environment()
    )
    outdir = OUT / record["run_name"]
    outdir.mkdir(parents=True, exist_ok=True)
    record["files"] = write_load_report(record, outdir)
    print_load_summary(record)
    if record["exit_code"]:
        environment.process_exit_code = record["exit_code"]
