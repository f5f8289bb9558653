"""Drive every public call of DB-GPT's Python client against a server; report as JSON.

Runs inside ``.venv-clients/dbgpt`` (DB-GPT's client pins its own
dependencies), never in the repo's venv. Reads one JSON object on stdin::

    {"api": "http://127.0.0.1:PORT/api/v2", "key": "...", "model": "...",
     "failing_model": "...", "sqlite_path": "...", "upload_path": "...",
     "question": "...", "app_code": "...", "out": "report.json"}

and writes one JSON object to ``out``: for each call, what the client returned (as
plain JSON) or ``{"raised": type, "message": ...}``. A call that fails does
not stop the run, so one report shows every call. The few things the client
has no call for (creating an app, uploading a file, listing flow node types)
go through httpx, as DB-GPT's web UI does them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from dbgpt.core.awel.flow.flow_factory import FlowPanel
from dbgpt_client import Client
from dbgpt_client.app import get_app, list_app
from dbgpt_client.datasource import (
    create_datasource,
    delete_datasource,
    get_datasource,
    list_datasource,
    update_datasource,
)
from dbgpt_client.evaluation import EvaluateServeRequest, run_evaluation
from dbgpt_client.flow import create_flow, delete_flow, get_flow, list_flow, run_flow_cmd, update_flow
from dbgpt_client.knowledge import (
    create_document,
    create_space,
    delete_document,
    delete_space,
    get_document,
    get_space,
    list_document,
    list_space,
    sync_document,
    update_space,
)
from dbgpt_client.schema import DatasourceModel, DocumentModel, SpaceModel, SyncModel
from dbgpt_ext.rag.chunk_manager import ChunkParameters


def plain(value: Any) -> Any:
    """What the client returned, as JSON (pydantic models by their fields)."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, FlowPanel):
        data = value.model_dump()
        return json.loads(json.dumps({**data, "_type": "FlowPanel"}, default=str))
    if hasattr(value, "model_dump"):
        data = value.model_dump(exclude={"doc_file"} if "doc_file" in type(value).model_fields else None)
        return json.loads(json.dumps({**data, "_type": type(value).__name__}, default=str))
    return value


class Run:
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    async def call(self, name: str, coro: Any) -> Any:
        try:
            value = await coro
        except Exception as exc:  # recorded, and the run goes on
            self.results[name] = {"raised": type(exc).__name__, "message": str(exc)}
            return None
        self.results[name] = plain(value)
        return value


async def collect_stream(client: Client, **kwargs: Any) -> dict[str, Any]:
    chunks = []
    try:
        async for chunk in client.chat_stream(**kwargs):
            chunks.append(plain(chunk))
    except Exception as exc:
        return {"chunks": chunks, "raised": type(exc).__name__, "message": str(exc)}
    return {"chunks": chunks}


def flow_nodes(catalog: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """A FlowData graph of ``steps``, nodes made from the server's node catalog."""
    by_name = {n["name"]: n for n in catalog}
    nodes = []
    for i, step in enumerate(steps):
        meta = json.loads(json.dumps(by_name[step["operator"]]))
        for p in meta["parameters"]:
            p["value"] = step.get(p["name"])
        position = {"x": 400.0 * i, "y": 50.0, "zoom": 0.0}
        nodes.append(
            {
                "width": 300,
                "height": 400,
                "id": f"{meta['id']}_{i}",
                "position": position,
                "position_absolute": position,
                "type": "customNode",
                "data": meta,
            }
        )
    edges = [
        {
            "source": nodes[i]["id"],
            "source_order": 0,
            "target": nodes[i + 1]["id"],
            "target_order": 0,
            "id": f"edge_{i}",
            "source_handle": f"{nodes[i]['id']}|outputs|0",
            "target_handle": f"{nodes[i + 1]['id']}|inputs|0",
            "type": "buttonedge",
        }
        for i in range(len(nodes) - 1)
    ]
    return {"nodes": nodes, "edges": edges, "viewport": {"x": 10.0, "y": 20.0, "zoom": 0.8}}


async def main(plan: dict[str, Any]) -> dict[str, Any]:
    client = Client(api_base=plan["api"], api_key=plan["key"], timeout=60)
    serve = f"{plan['api']}/serve"
    web = httpx.AsyncClient(headers={"Authorization": f"Bearer {plan['key']}"}, timeout=60)
    run = Run()
    r = run.results
    model = plan["model"]
    try:
        # -- chat and stream ---------------------------------------------------
        await run.call("chat", client.chat(model=model, messages="Hello from DB-GPT"))
        for i in (1, 2):
            await run.call(
                f"chat_own_conv_{i}", client.chat(model=model, messages=f"Turn {i}", conv_uid="dbgpt-own")
            )
        r["chat_stream"] = await collect_stream(client, model=model, messages="Tell me about streams")
        conv_uid = r["chat_stream"]["chunks"][0]["id"] if r["chat_stream"]["chunks"] else None
        await run.call("chat_continued", client.chat(model=model, messages="And then?", conv_uid=conv_uid))
        r["chat_stream_cumulative"] = await collect_stream(
            client, model=model, messages="Count with me", incremental=False
        )
        r["chat_stream_failure"] = await collect_stream(client, model=plan["failing_model"], messages="Break")

        # -- apps -------------------------------------------------------------
        created_app = await web.post(
            f"{serve}/apps",
            json={"app_code": plan["app_code"], "app_name": "Poet", "prompt_template": "You write haiku."},
        )
        r["app_created_status"] = created_app.status_code
        await run.call("get_app", get_app(client, plan["app_code"]))
        await run.call("list_app", list_app(client))
        await run.call(
            "chat_app",
            client.chat(model=model, messages="Write one", chat_mode="chat_app", chat_param=plan["app_code"]),
        )

        # -- datasources ------------------------------------------------------
        ds = await run.call(
            "create_datasource",
            create_datasource(
                client,
                DatasourceModel(
                    db_type="sqlite", db_name="pets_db", db_path=plan["sqlite_path"], comment="pets"
                ),
            ),
        )
        ds_id = str(ds.id) if ds is not None else "0"
        await run.call("get_datasource", get_datasource(client, ds_id))
        await run.call("list_datasource", list_datasource(client))
        await run.call(
            "update_datasource",
            update_datasource(
                client,
                DatasourceModel(
                    id=int(ds_id),
                    db_type="sqlite",
                    db_name="pets_db",
                    db_path=plan["sqlite_path"],
                    comment="pet shop",
                ),
            ),
        )
        sql = "```sql\nSELECT name, legs FROM pets ORDER BY name\n```"
        await run.call(
            "chat_data_vis",
            client.chat(model=model, messages=sql, chat_mode="chat_data", chat_param="pets_db"),
        )
        await run.call(
            "chat_data_table",
            client.chat(
                model=model, messages=sql, chat_mode="chat_data", chat_param="pets_db", enable_vis=False
            ),
        )
        await run.call("delete_datasource", delete_datasource(client, ds_id))
        await run.call("list_datasource_after_delete", list_datasource(client))

        # -- spaces and documents ----------------------------------------------
        space = await run.call(
            "create_space",
            create_space(
                client, SpaceModel(name="handbook", vector_type="BM25", desc="Team handbook", owner="ada")
            ),
        )
        space_id = str(space.id) if space is not None else "0"
        await run.call("get_space", get_space(client, space_id))
        await run.call("list_space", list_space(client))
        await run.call(
            "update_space",
            update_space(
                client,
                SpaceModel(
                    id=int(space_id), name="handbook", vector_type="BM25", desc="The handbook", owner="ada"
                ),
            ),
        )
        note = await run.call(
            "create_document",
            create_document(
                client,
                DocumentModel(
                    doc_name="note", doc_type="TEXT", content="Lunch is served at noon.", space_id=space_id
                ),
            ),
        )
        upload = Path(plan["upload_path"])
        uploaded = await web.post(
            f"{serve}/knowledge/documents",
            data={"space_id": space_id},
            files={"doc_file": (upload.name, upload.read_bytes(), "text/markdown")},
        )
        r["upload"] = uploaded.json()
        file_doc_id = str(uploaded.json()["data"]["id"]) if uploaded.status_code == 200 else "0"
        await run.call("get_document", get_document(client, file_doc_id))
        await run.call("list_document", list_document(client))
        await run.call(
            "sync_document",
            sync_document(
                client,
                SyncModel(
                    doc_id=file_doc_id,
                    space_id=space_id,
                    chunk_parameters=ChunkParameters(chunk_size=40, chunk_overlap=0),
                ),
            ),
        )
        await run.call("get_document_after_sync", get_document(client, file_doc_id))
        r["upload_after_sync"] = (await web.get(f"{serve}/knowledge/documents/{file_doc_id}")).json()
        await run.call(
            "chat_knowledge",
            client.chat(
                model=model, messages=plan["question"], chat_mode="chat_knowledge", chat_param="handbook"
            ),
        )

        # -- evaluation -------------------------------------------------------------
        await run.call(
            "run_evaluation",
            run_evaluation(
                client,
                EvaluateServeRequest(
                    scene_key="recall",
                    scene_value=space_id,
                    context={"top_k": 3},
                    evaluate_metrics=["RetrieverHitRateMetric", "RetrieverMRRMetric"],
                    datasets=[
                        {"query": plan["question"], "doc_name": upload.name},
                        {"query": "zebra quantum saxophone", "doc_name": upload.name},
                    ],
                ),
            ),
        )

        # -- flows ------------------------------------------------------------------
        catalog = (await web.get(f"{serve}/awel/nodes")).json()["data"]
        graph = flow_nodes(
            catalog,
            [
                {"operator": "convcore_prompt_step", "template": "Rephrase as a question: {input}"},
                {
                    "operator": "convcore_scene_step",
                    "scene": "chat_knowledge",
                    "param": "handbook",
                    "template": "{question}",
                },
            ],
        )
        panel = FlowPanel(
            label="Handbook Q&A", name="handbook_qa", description="Asks the handbook", flow_data=graph
        )
        flow = await run.call("create_flow", create_flow(client, panel))
        uid = flow.uid if flow is not None else panel.uid
        await run.call("get_flow", get_flow(client, uid))
        await run.call("list_flow", list_flow(client, name="handbook_qa"))
        if flow is not None:
            changed = FlowPanel(**{**flow.model_dump(), "description": "Asks the team handbook"})
            await run.call("update_flow", update_flow(client, changed))
        pieces: list[str] = []
        await run.call(
            "run_flow_cmd",
            run_flow_cmd(
                client,
                uid=uid,
                data={"messages": plan["question"], "model": model},
                streaming_callback=pieces.append,
            ),
        )
        r["run_flow_output"] = "".join(pieces)
        await run.call("delete_flow", delete_flow(client, uid))
        await run.call("list_flow_after_delete", list_flow(client))

        # -- clean up -----------------------------------------------------------
        note_id = str(note.id) if note is not None else "0"
        await run.call("delete_document", delete_document(client, note_id))
        await run.call("list_document_after_delete", list_document(client))
        await run.call("delete_space", delete_space(client, space_id))
    finally:
        await web.aclose()
        await client.aclose()
    return r


if __name__ == "__main__":
    request = json.load(sys.stdin)
    report = asyncio.run(main(request))
    # A file, not stdout: DB-GPT's modules print to stdout as they load.
    Path(request["out"]).write_text(json.dumps(report), encoding="utf-8")
