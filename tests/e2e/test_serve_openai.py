"""``convcore serve`` as a real process on loopback, driven by the OpenAI SDK and httpx.

Uses a SQLite file store; skipped only while ``convcore_sql`` has no SQLStore.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.serve_support import KEYS, Server, serve, sql_store_available

pytestmark = pytest.mark.skipif(not sql_store_available(), reason="convcore_sql has no SQLStore yet")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("serve")) as s:
        yield s


def test_openai_sdk_sync_three_turns_stream_and_not(server: Server) -> None:
    with openai.OpenAI(base_url=server.api, api_key=KEYS[0]) as client:
        assert [m.id for m in client.models.list().data] == ["convcore-echo"]
        first = client.chat.completions.create(
            model="convcore-echo",
            messages=[{"role": "user", "content": "Hi, I am Ada."}],
            extra_body={"chat_mode": "chat_normal"},
        )
        conv_uid = (first.model_extra or {})["conv_uid"]
        assert first.choices[0].message.content == "You said: Hi, I am Ada."
        second = client.chat.completions.create(
            model="convcore-echo",
            messages=[{"role": "user", "content": "What is a window?"}],
            stream=True,
            max_tokens=256,
            extra_body={"conv_uid": conv_uid, "chat_mode": "chat_normal"},
        )
        text = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
        assert "earlier user messages: 1; first: 'Hi, I am Ada.'" in text
        third = client.chat.completions.create(
            model="convcore-echo",
            messages=[{"role": "user", "content": "What is my name?"}],
            extra_body={"conv_uid": conv_uid},
        )
        assert "earlier user messages: 2; first: 'Hi, I am Ada.'" in (third.choices[0].message.content or "")


@pytest.mark.anyio
async def test_openai_sdk_async_with_the_second_key(server: Server) -> None:
    async with openai.AsyncOpenAI(base_url=server.api, api_key=KEYS[1]) as client:
        reply = await client.chat.completions.create(
            model="convcore-echo", messages=[{"role": "user", "content": "async hello"}]
        )
        assert reply.choices[0].message.content == "You said: async hello"
        stream = await client.chat.completions.create(
            model="convcore-echo", messages=[{"role": "user", "content": "async stream"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == "You said: async stream"


def test_curl_style_httpx_stream_and_conversation_api(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}", "accept": "application/json"}
    with httpx.Client(base_url=server.base, headers=headers, timeout=10) as c:
        body = json.dumps(
            {"messages": "Hello", "model": "convcore-echo", "stream": True, "user_name": "curl"}
        )
        r = c.post("/api/v2/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200
        lines = [line for line in r.text.splitlines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
        chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
        assert all("usage" not in ch or isinstance(ch["usage"], dict) for ch in chunks)
        assert chunks[-1]["usage"]["total_tokens"] > 0
        conv_uid = r.headers["x-conv-uid"]
        assert chunks[-1]["conv_uid"] == conv_uid

        listed = c.get("/api/v2/conversations", params={"user_name": "curl"}).json()
        assert [x["conv_uid"] for x in listed["data"]] == [conv_uid]
        read = c.get(f"/api/v2/conversations/{conv_uid}").json()["data"]
        assert [m["role"] for m in read["messages"]] == ["user", "assistant"]
        assert c.get(f"/api/v2/conversations/{conv_uid}", params={"user_name": "eve"}).status_code == 403
        assert c.delete(f"/api/v2/conversations/{conv_uid}").status_code == 200
        assert c.get(f"/api/v2/conversations/{conv_uid}").status_code == 404

        bad = c.post(
            "/api/v2/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400 and bad.json()["success"] is False
        anon = httpx.post(f"{server.api}/chat/completions", json={"messages": "x"})
        assert anon.status_code == 401 and anon.json()["err_code"] == "invalid_api_key"
        assert httpx.get(f"{server.base}/healthz").json() == {"status": "ok"}


def test_client_leaving_mid_stream_stores_nothing(tmp_path: Path) -> None:
    # A paced local model (20 tokens/s), so the client can leave while it is still generating.
    with serve(tmp_path, "--local-tokens-per-second", "20") as slow:
        headers = {"Authorization": f"Bearer {KEYS[0]}"}
        with httpx.Client(base_url=slow.base, headers=headers, timeout=10) as c:
            body = {"messages": "please take your time answering", "stream": True, "user_name": "quitter"}
            with c.stream("POST", "/api/v2/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if '"content":"You"' in line:
                        break  # leave after the first word
            time.sleep(1.5)  # longer than the whole reply would take
            assert c.get("/api/v2/conversations", params={"user_name": "quitter"}).json()["data"] == []
            done = c.post("/api/v2/chat/completions", json={**body, "user_name": "stayer"})
            assert done.text.rstrip().endswith("data: [DONE]")
            stayed = c.get("/api/v2/conversations", params={"user_name": "stayer"}).json()["data"]
            assert [x["message_count"] for x in stayed] == [2]


def test_serve_includes_the_chat_modes_and_keeps_their_registries(tmp_path: Path) -> None:
    """`convcore serve` wires chat_app/chat_data/... and their APIs, and an
    app created over HTTP survives a restart (it lives in the store's file)."""
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    app = {"app_code": "poet", "app_name": "Poet", "prompt_template": "You answer in verse."}
    from convcore_scenes.secret_box import SecretBox

    keys = {"CONVCORE_SECRET_KEYS": SecretBox.generate_key()}
    with serve(tmp_path, "--sqlite-root", str(tmp_path), environ=keys) as srv:
        created = httpx.post(f"{srv.api}/serve/apps", json=app, headers=headers, timeout=10)
        assert created.status_code == 200, created.text
        assert created.json()["success"] is True
        ds = httpx.post(
            f"{srv.api}/serve/datasources",
            json={
                "db_type": "sqlite",
                "db_name": "notes",
                "db_path": str(tmp_path / "n.db"),
                "db_pwd": "s3cret!",
            },
            headers=headers,
            timeout=10,
        )
        assert ds.status_code == 200, ds.text
        assert "s3cret!" not in ds.text
        # The store's own file (every conversation, every password) is never a datasource.
        own = httpx.post(
            f"{srv.api}/serve/datasources",
            json={"db_type": "sqlite", "db_name": "own", "db_path": str(tmp_path / "convcore.db")},
            headers=headers,
            timeout=10,
        )
        assert own.status_code == 400 and own.json()["err_code"] == "invalid_request", own.text
    assert b"s3cret!" not in (tmp_path / "convcore.db").read_bytes()  # sealed at rest
    with serve(tmp_path) as srv:
        listed = httpx.get(f"{srv.api}/serve/apps", headers=headers, timeout=10)
        assert [a["app_code"] for a in listed.json()["data"]["app_list"]] == ["poet"]
        reply = httpx.post(
            f"{srv.api}/chat/completions",
            json={"messages": "hello", "chat_mode": "chat_app", "chat_param": "poet"},
            headers=headers,
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "You said: hello"
        unknown = httpx.post(
            f"{srv.api}/chat/completions",
            json={"messages": "hello", "chat_mode": "chat_app", "chat_param": "nobody"},
            headers=headers,
            timeout=10,
        )
        assert unknown.status_code == 400
        assert unknown.json()["err_msg"].startswith("chat_param")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_two_worker_processes_serve_one_port_and_one_store(tmp_path: Path) -> None:
    with serve(tmp_path, "--workers", "2") as server:
        workers = _children(server.process.pid)
        assert len([p for p in workers if Path(f"/proc/{p}/cmdline").read_bytes().count(b"spawn")]) == 2
        headers = {"Authorization": f"Bearer {KEYS[0]}"}
        conv_uid = "two-workers"
        for i in range(12):  # a fresh connection each: the kernel spreads them over both processes
            r = httpx.post(
                f"{server.api}/chat/completions",
                json={"messages": f"turn {i}", "conv_uid": conv_uid, "model": "convcore-local"},
                headers=headers,
                timeout=10,
            )
            assert r.status_code == 200, r.text
        read = httpx.get(f"{server.api}/conversations/{conv_uid}", headers=headers, timeout=10)
        messages = read.json()["data"]["messages"]
        assert [m["content"] for m in messages[::2]] == [f"turn {i}" for i in range(12)]
        assert "workers=2" in (tmp_path / "serve.log").read_text(errors="replace")


def _tcp(pid: int, port: int, status: str) -> int:
    """How many of process ``pid``'s TCP sockets on local ``port`` are in ``status``."""
    import psutil

    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.laddr and c.laddr.port == port and c.status == status)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel balances SO_REUSEPORT on Linux")
def test_two_workers_share_a_burst_of_connections(tmp_path: Path) -> None:
    with serve(tmp_path, "--workers", "2") as server:
        port = int(server.base.rsplit(":", 1)[1])
        workers = [
            p for p in _children(server.process.pid) if b"spawn" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        # At once, as a client that opens its pool when the service first answers
        # does: the other worker may still be starting, and takes its share all the same.
        request = f"GET /api/v2/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n\r\n"
        clients = [socket.socket() for _ in range(64)]
        try:
            for c in clients:  # all at once, as a client opening its pool does
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
            for c in clients:
                select.select([], [c], [], 10)
                c.settimeout(10)
            for c in clients:  # answered: the connection is held by the worker that accepted it
                c.sendall(request.encode())
            for c in clients:
                assert c.recv(12) == b"HTTP/1.1 200"
            held = [_tcp(p, port, "ESTABLISHED") for p in workers]
        finally:
            for c in clients:
                c.close()
    assert sum(held) == 64
    # An even share is 32 each; on one shared socket a burst went 47 to 58 of 64 to one process.
    assert min(held) >= 12, held


def test_workers_need_a_shared_store(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "convcore", "serve", "--no-auth", "--workers", "2", "--store", "memory://"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "memory:// is per process" in out.stderr
