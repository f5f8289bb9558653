"""DB-GPT's own Python client (dbgpt-client 0.8.2), every public call, against
a real ``convcore serve`` process on loopback.

The client runs in a venv of its own (``make clients`` builds
``.venv-clients/dbgpt``; this module builds it on first use) through
``clients/dbgpt_driver.py``, which reports what each call returned; the tests
here assert on that content, and check the server's side with httpx.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.backends.fake_upstream import get_upstream
from tests.e2e.serve_support import KEYS, Server, serve, sql_store_available

pytestmark = pytest.mark.skipif(not sql_store_available(), reason="convcore_sql has no SQLStore yet")

ROOT = Path(__file__).resolve().parents[2]
CLIENT_PYTHON = ROOT / ".venv-clients" / "dbgpt" / "bin" / "python"
DRIVER = Path(__file__).parent / "clients" / "dbgpt_driver.py"
MODEL = "convcore-local"
FAILING = "breaks-mid-stream"
QUESTION = "How many vacation days do engineers get?"
HANDBOOK = """# Team handbook

## Vacation
Engineers get twenty-five vacation days per year. Unused vacation days carry
over until the end of March.

## Equipment
Every engineer receives a laptop and a second monitor on the first day.
"""


def _client_python() -> Path:
    """The client venv's python, building the venv with ``make clients`` if it is missing."""
    if not (CLIENT_PYTHON.parent.parent / ".installed").exists():
        built = subprocess.run(
            ["make", "clients"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
        if built.returncode != 0:
            message = f"cannot build DB-GPT's client venv (make clients): {built.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return CLIENT_PYTHON


@dataclass
class Run:
    server: Server
    report: dict[str, Any]
    upload: Path

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(
            f"{self.server.api}{path}", params=params, headers={"Authorization": f"Bearer {KEYS[0]}"}
        )
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    python = _client_python()
    tmp = tmp_path_factory.mktemp("dbgpt-client")
    data = tmp / "data"
    data.mkdir()
    with sqlite3.connect(data / "pets.db") as db:
        db.execute("CREATE TABLE pets (name TEXT, legs INTEGER)")
        db.executemany("INSERT INTO pets VALUES (?, ?)", [("Rex", 4), ("Tweety", 2), ('Say "hi" & <go>', 0)])
    db.close()
    upload = tmp / "handbook.md"
    upload.write_text(HANDBOOK, encoding="utf-8")
    models = [
        {"name": MODEL, "backend": "local", "context_window": 8192},
        {
            "name": FAILING,
            "backend": "openai",
            "base_url": get_upstream().base_url,
            "api_key": "fake",
            "upstream": "echo;drop=3",
            "context_window": 8192,
            "max_retries": 0,
        },
    ]
    (tmp / "models.json").write_text(json.dumps({"models": models}))
    with serve(tmp, "--sqlite-root", str(data), "--models", str(tmp / "models.json")) as server:
        plan = {
            "api": server.api,
            "key": KEYS[0],
            "model": MODEL,
            "failing_model": FAILING,
            "sqlite_path": str(data / "pets.db"),
            "upload_path": str(upload),
            "question": QUESTION,
            "app_code": "poet",
            "out": str(tmp / "report.json"),
        }
        done = subprocess.run(
            [str(python), str(DRIVER)],
            input=json.dumps(plan),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=tmp,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        yield Run(server, json.loads((tmp / "report.json").read_text(encoding="utf-8")), upload)


def _ok(report: dict[str, Any], name: str) -> Any:
    value = report[name]
    assert not (isinstance(value, dict) and "raised" in value), f"{name}: {value}"
    return value


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks)


# -- chat and stream ------------------------------------------------------------


def test_chat_answers_a_chat_completion(run: Run) -> None:
    chat = _ok(run.report, "chat")
    assert chat["_type"] == "ChatCompletionResponse"
    assert chat["model"] == MODEL
    message = chat["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", "You said: Hello from DB-GPT")
    assert chat["choices"][0]["finish_reason"] == "stop"
    usage = chat["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_continues_a_conversation_under_the_clients_own_conv_uid(run: Run) -> None:
    _ok(run.report, "chat_own_conv_1")
    second = _ok(run.report, "chat_own_conv_2")["choices"][0]["message"]["content"]
    assert second == "You said: Turn 2 (earlier user messages: 1; first: 'Turn 1')"
    assert run.get("/conversations/dbgpt-own")["data"]["conversation"]["message_count"] == 4


def test_stream_chunk_ids_are_the_conv_uid_and_the_conversation_continues(run: Run) -> None:
    stream = run.report["chat_stream"]
    assert "raised" not in stream, stream
    chunks = stream["chunks"]
    assert _text(chunks) == "You said: Tell me about streams"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    conv_uid = ids.pop()
    conversation = run.get(f"/conversations/{conv_uid}")
    contents = [m["content"] for m in conversation["data"]["messages"]]
    assert contents[:2] == ["Tell me about streams", "You said: Tell me about streams"]
    # The DB-GPT client continued it with the id it read from the stream.
    continued = _ok(run.report, "chat_continued")["choices"][0]["message"]["content"]
    assert continued == "You said: And then? (earlier user messages: 1; first: 'Tell me about streams')"
    assert contents[2:] == ["And then?", continued]


def test_incremental_false_sends_the_whole_text_so_far(run: Run) -> None:
    stream = run.report["chat_stream_cumulative"]
    assert "raised" not in stream, stream
    texts = [c["choices"][0]["delta"]["content"] for c in stream["chunks"]]
    assert texts[-1] == "You said: Count with me"
    assert len(texts) > 3
    assert all(later.startswith(earlier or "") for earlier, later in itertools.pairwise(texts))


def test_a_mid_stream_backend_failure_raises_in_dbgpt_client(run: Run) -> None:
    failed = run.report["chat_stream_failure"]
    assert failed.get("raised") == "Exception", failed
    assert "backend_error" in failed["message"] and "mid-reply" in failed["message"]
    # It got some text first, and never a successful stop.
    assert failed["chunks"] and all(c["choices"][0]["finish_reason"] is None for c in failed["chunks"])


def test_a_mid_stream_backend_failure_raises_in_the_openai_sdk(run: Run) -> None:
    pieces = []
    with openai.OpenAI(base_url=run.server.api, api_key=KEYS[0], max_retries=0) as client:
        stream = client.chat.completions.create(
            model=FAILING, messages=[{"role": "user", "content": "Break please"}], stream=True
        )
        with pytest.raises(openai.APIError) as raised:
            for chunk in stream:
                assert chunk.choices[0].finish_reason is None
                pieces.append(chunk.choices[0].delta.content or "")
    assert "mid-reply" in str(raised.value) and "".join(pieces)


# -- apps and datasources ---------------------------------------------------------


def test_apps_get_list_and_chat(run: Run) -> None:
    assert run.report["app_created_status"] == 200
    app = _ok(run.report, "get_app")
    assert app["_type"] == "AppModel" and app["app_code"] == "poet" and app["app_name"] == "Poet"
    assert [a["app_code"] for a in _ok(run.report, "list_app")] == ["poet"]
    reply = _ok(run.report, "chat_app")["choices"][0]["message"]["content"]
    assert reply == "You said: Write one"


def test_datasources_round_trip_without_the_password(run: Run) -> None:
    created = _ok(run.report, "create_datasource")
    assert created["_type"] == "DatasourceModel"
    assert (created["db_type"], created["db_name"], created["comment"]) == ("sqlite", "pets_db", "pets")
    assert created["db_path"].endswith("pets.db") and created["db_pwd"] == ""
    assert _ok(run.report, "get_datasource")["id"] == created["id"]
    assert [d["db_name"] for d in _ok(run.report, "list_datasource")] == ["pets_db"]
    assert _ok(run.report, "update_datasource")["comment"] == "pet shop"
    assert _ok(run.report, "delete_datasource")["id"] == created["id"]
    assert _ok(run.report, "list_datasource_after_delete") == []


def test_chat_data_answers_a_chart_view_when_vis_is_on_and_a_table_otherwise(run: Run) -> None:
    vis = _ok(run.report, "chat_data_vis")["choices"][0]["message"]["content"]
    head, _, tag = vis.partition("<chart-view content=")
    assert head.startswith("You said: ```sql") and tag.endswith(" />")
    payload = json.loads(html.unescape(tag.removesuffix(" />").strip('"')))
    assert payload["type"] == "response_table"
    assert payload["sql"] == "SELECT name, legs FROM pets ORDER BY name"
    assert payload["data"] == [
        {"name": "Rex", "legs": 4},
        {"name": 'Say "hi" & <go>', "legs": 0},
        {"name": "Tweety", "legs": 2},
    ]
    table = _ok(run.report, "chat_data_table")["choices"][0]["message"]["content"]
    assert "<chart-view" not in table and "| name | legs |" in table and "| Rex | 4 |" in table


# -- spaces, documents, retrieval, evaluation ------------------------------------------


def test_spaces_round_trip(run: Run) -> None:
    space = _ok(run.report, "create_space")
    assert space["_type"] == "SpaceModel" and space["name"] == "handbook" and space["owner"] == "ada"
    assert isinstance(space["id"], int)
    assert _ok(run.report, "get_space")["desc"] == "Team handbook"
    assert [s["name"] for s in _ok(run.report, "list_space")] == ["handbook"]
    assert _ok(run.report, "update_space")["desc"] == "The handbook"
    assert _ok(run.report, "delete_space")["id"] == space["id"]


def test_documents_upload_sync_and_delete(run: Run) -> None:
    space_id = str(_ok(run.report, "create_space")["id"])
    note = _ok(run.report, "create_document")
    assert note["_type"] == "DocumentModel"
    assert (note["doc_name"], note["content"], note["space_id"]) == (
        "note",
        "Lunch is served at noon.",
        space_id,
    )
    upload = run.report["upload"]["data"]
    got = _ok(run.report, "get_document")
    assert got["id"] == upload["id"] and got["doc_name"] == "handbook.md" and got["doc_type"] == "MD"
    assert got["content"] == HANDBOOK and got["space_id"] == space_id and got["doc_source"] == "handbook.md"
    assert sorted(d["doc_name"] for d in _ok(run.report, "list_document")) == ["handbook.md", "note"]
    assert _ok(run.report, "sync_document") == [upload["id"]]
    assert _ok(run.report, "get_document_after_sync")["content"] == HANDBOOK
    # The sync split the file again with the chunk size it asked for.
    assert upload["chunk_size"] == 200 and upload["chunk_count"] == 1
    synced = run.report["upload_after_sync"]["data"]
    assert synced["chunk_size"] == 40 and synced["chunk_overlap"] == 0 and synced["chunk_count"] > 1
    assert _ok(run.report, "delete_document")["doc_name"] == "note"
    assert [d["doc_name"] for d in _ok(run.report, "list_document_after_delete")] == ["handbook.md"]


def test_chat_knowledge_retrieves_from_the_uploaded_file(run: Run) -> None:
    reply = _ok(run.report, "chat_knowledge")["choices"][0]["message"]["content"]
    assert reply.startswith(f"You said: {QUESTION}")
    sources = reply.rpartition("\n\nSources: ")[2].split(", ")
    assert sources and sources[0].startswith("doc 'handbook.md' chunk ")


def test_retriever_evaluation_hit_rate_and_mrr(run: Run) -> None:
    rows = _ok(run.report, "run_evaluation")
    assert len(rows) == 2 and all(len(row) == 2 for row in rows)
    hit, mrr = rows[0]
    assert (hit["metric_name"], mrr["metric_name"]) == ("RetrieverHitRateMetric", "RetrieverMRRMetric")
    assert hit["query"] == QUESTION and hit["score"] == 1.0 and hit["passing"] is True
    assert mrr["score"] == 1.0  # the vacation chunk ranks first
    assert any("twenty-five vacation days" in p for p in hit["prediction"])
    miss_hit, miss_mrr = rows[1]
    assert miss_hit["score"] == 0.0 and miss_mrr["score"] == 0.0 and miss_hit["prediction"] == []


# -- flows -------------------------------------------------------------------------


def test_flows_round_trip_in_flowpanel_shape_with_their_label(run: Run) -> None:
    created = _ok(run.report, "create_flow")
    assert created["_type"] == "FlowPanel"
    assert created["label"] == "Handbook Q&A" and created["name"] == "handbook_qa"
    nodes = created["flow_data"]["nodes"]
    assert [n["data"]["name"] for n in nodes] == ["convcore_prompt_step", "convcore_scene_step"]
    assert created["flow_data"]["viewport"] == {"x": 10.0, "y": 20.0, "zoom": 0.8}
    assert len(created["flow_data"]["edges"]) == 1
    got = _ok(run.report, "get_flow")
    assert got["uid"] == created["uid"] and got["label"] == "Handbook Q&A"
    assert got["flow_data"] == created["flow_data"]
    assert [f["uid"] for f in _ok(run.report, "list_flow")] == [created["uid"]]
    updated = _ok(run.report, "update_flow")
    assert updated["description"] == "Asks the team handbook" and updated["label"] == "Handbook Q&A"
    assert _ok(run.report, "delete_flow")["uid"] == created["uid"]
    assert _ok(run.report, "list_flow_after_delete") == []


def test_run_flow_cmd_runs_the_flow(run: Run) -> None:
    assert run.report["run_flow_cmd"] is None  # the client's run returns nothing; output went to the callback
    output = run.report["run_flow_output"]
    assert "You said:" in output and "Sources: doc 'handbook.md' chunk " in output
