"""Distributed multi-turn sessions against the HTTP service, with Locust.

Each simulated user holds a conversation for ``CCB_TURNS`` sequential turns
(DB-GPT style: the new message and the conv_uid in the body), then starts a
new one. When the test stops, every process reads back the conversations it
acknowledged (``GET /api/v2/conversations/{conv_uid}``) and sets a non-zero
exit code if any turn is lost, duplicated or split.

    pip install "convcore[bench]"           # brings locust
    convcore serve --store redis://127.0.0.1:6379/0 --api-key KEY &
    CCB_API_KEY=KEY locust -f benchmarks/locustfile.py --headless \
        -u 64 -r 16 -t 60s --host http://127.0.0.1:5670

Across machines: ``--master`` on one, ``--worker --master-host=…`` on the
others (same file). Settings come from the environment: ``CCB_API_KEY``,
``CCB_MODEL`` (default convcore-local), ``CCB_TURNS`` (10),
``CCB_MAX_NEW_TOKENS`` (256), ``CCB_CHAT_PATH`` (/api/v2/chat/completions),
``CCB_AUDIT`` (1; 0 skips the read-back).
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any
from urllib.parse import quote

from locust import HttpUser, events, task

API_KEY = os.environ.get("CCB_API_KEY", "")
MODEL = os.environ.get("CCB_MODEL", "convcore-local")
TURNS = int(os.environ.get("CCB_TURNS", "10"))
MAX_NEW_TOKENS = int(os.environ.get("CCB_MAX_NEW_TOKENS", "256"))
CHAT_PATH = os.environ.get("CCB_CHAT_PATH", "/api/v2/chat/completions")
AUDIT = os.environ.get("CCB_AUDIT", "1") != "0"

_acked: dict[str, list[str]] = {}  # conv_uid -> acknowledged user messages, in order
_lock = threading.Lock()


class ConversationUser(HttpUser):
    """One user: a conversation of ``TURNS`` turns at a time, no think time."""

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.conv_uid = f"ccb-locust-{uuid.uuid4().hex}"
        self.turn = 0

    @task
    def chat_turn(self) -> None:
        text = f"{self.conv_uid} t{self.turn}: how does the window fit the budget?"
        body = {
            "model": MODEL,
            "messages": text,
            "conv_uid": self.conv_uid,
            "max_new_tokens": MAX_NEW_TOKENS,
            "stream": False,
            "user_name": "ccbench-locust",
        }
        with self.client.post(CHAT_PATH, json=body, name="chat turn", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            data: dict[str, Any] = response.json()
            choices = data.get("choices") or [{}]
            if not isinstance(choices[0].get("message", {}).get("content"), str):
                response.failure("no choices[0].message.content in the answer")
                return
            if data.get("conv_uid") not in (None, self.conv_uid):
                response.failure(f"answered for conv_uid {data.get('conv_uid')!r}")
                return
            with _lock:
                _acked.setdefault(self.conv_uid, []).append(text)
        self.turn += 1
        if self.turn >= TURNS:
            self._new_conversation()


@events.test_stop.add_listener
def audit(environment: Any, **_: Any) -> None:
    """Read back what this process acknowledged; lost/duplicated/split fail the run."""
    if not AUDIT or not _acked or not environment.host:
        return
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    api = environment.host.rstrip("/") + CHAT_PATH.removesuffix("/chat/completions")
    damage = {"lost": 0, "duplicated": 0, "split": 0, "unreadable": 0}
    with httpx.Client(headers=headers, timeout=30) as client:
        for conv_uid, texts in list(_acked.items()):
            rows: list[dict[str, Any]] = []
            start: int | None = 1
            while start is not None:
                r = client.get(f"{api}/conversations/{quote(conv_uid, safe='')}",
                               params={"start_seq": start, "limit": 1000})  # fmt: skip
                if r.status_code != 200:
                    damage["unreadable"] += 1
                    break
                data = r.json().get("data") or {}
                rows += data.get("messages") or []
                start = data.get("next_start_seq")
            pairs = [(m.get("role"), m.get("content")) for m in rows]
            for text in texts:
                where = [i for i, (role, content) in enumerate(pairs) if role == "user" and content == text]
                if not where:
                    damage["lost"] += 1
                    continue
                damage["duplicated"] += len(where) - 1
                if where[0] + 1 >= len(pairs) or pairs[where[0] + 1][0] != "assistant":
                    damage["split"] += 1
    turns = sum(len(t) for t in _acked.values())
    print(f"convcore audit: {len(_acked)} conversations, {turns} acknowledged turns, damage {damage}")
    if damage["lost"] or damage["duplicated"] or damage["split"]:
        environment.process_exit_code = 1
