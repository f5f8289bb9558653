"""chat_flow and /api/v2/serve/awel/flows over HTTP: steps run in order,
each output feeding the next, each on its own model; only the final answer
is stored."""

from __future__ import annotations

import json
from typing import Any

import pytest

from convcore import LocalBackend, ModelSpec, PromptMessage
from tests.adapters.scenes_support import (
    CHAT,
    assert_envelope_error,
    client,
    harness,
    last_user,
    scripted,
    stream_text,
)
from tests.backends import Misbehaviour
from tests.backends.local import MisbehavingLocal

pytestmark = pytest.mark.anyio

FLOWS = "/api/v2/serve/awel/flows"


def _final(messages: tuple[PromptMessage, ...]) -> str:
    system = messages[0].content if messages[0].role == "system" else ""
    return f"FINAL[{system}|{last_user(messages)}]"


async def test_flow_crud() -> None:
    h = harness()
    async with client(h.app) as c:
        created = await c.post(
            FLOWS,
            json={
                "name": "summarise",
                "description": "two steps",
                "flow_data": ["Summarise: {input}", {"prompt": "Answer: {input}"}],
            },
        )
        assert created.status_code == 200, created.text
        flow = created.json()["data"]
        uid = flow["uid"]
        assert flow["label"] == "summarise" and flow["dag_id"].startswith("flow_dag_summarise_")
        assert [s["template"] for s in flow["steps"]] == ["Summarise: {input}", "Answer: {input}"]
        assert [n["data"]["name"] for n in flow["flow_data"]["nodes"]] == ["convcore_prompt_step"] * 2

        with_uid = await c.post(
            FLOWS, json={"uid": "fixed-uid", "name": "other", "flow_data": {"steps": [{"template": "x"}]}}
        )
        assert with_uid.json()["data"]["uid"] == "fixed-uid"

        listed = (await c.get(FLOWS)).json()["data"]
        assert listed["total_count"] == 2
        assert [f["uid"] for f in (await c.get(FLOWS, params={"name": "other"})).json()["data"]["items"]] == [
            "fixed-uid"
        ]
        assert (await c.get(f"{FLOWS}/{uid}")).json()["data"]["name"] == "summarise"

        updated = await c.put(f"{FLOWS}/{uid}", json={"description": "changed", "name": "renamed"})
        assert updated.json()["data"]["description"] == "changed"
        assert len(updated.json()["data"]["steps"]) == 2
        assert (
            await c.post(FLOWS, json={"name": "summarise", "flow_data": ["x"]})
        ).status_code == 200  # freed

        assert_envelope_error(
            await c.post(FLOWS, json={"name": "other", "flow_data": ["x"]}), 409
        )  # duplicate
        assert_envelope_error(
            await c.post(FLOWS, json={"uid": "fixed-uid", "name": "new", "flow_data": ["x"]}), 409
        )
        assert_envelope_error(await c.post(FLOWS, json={"name": "empty", "flow_data": []}), 400)
        assert_envelope_error(await c.post(FLOWS, json={"name": "bad", "flow_data": [{"model": "m"}]}), 400)
        assert_envelope_error(
            await c.post(FLOWS, json={"name": "loop", "flow_data": [{"scene": "chat_flow"}]}), 400
        )
        assert_envelope_error(await c.post(FLOWS, json={"flow_data": ["x"]}), 400)
        assert_envelope_error(await c.put(f"{FLOWS}/{uid}", json={"name": "other"}), 409)

        deleted = await c.delete(f"{FLOWS}/{uid}")
        assert deleted.json()["data"]["uid"] == uid
        assert_envelope_error(await c.get(f"{FLOWS}/{uid}"), 404)
        assert_envelope_error(await c.delete(f"{FLOWS}/{uid}"), 404)


async def test_chat_flow_runs_steps_in_order_and_stores_only_the_answer() -> None:
    summariser = scripted(lambda m: f"SUMMARY({last_user(m)})")
    h = harness(
        scripted(_final),
        more_models=[ModelSpec("summariser", summariser, context_window=2048, max_new_tokens=64)],
    )
    async with client(h.app) as c:
        r = await c.post(
            FLOWS,
            json={
                "name": "two-step",
                "flow_data": [
                    {"template": "Summarise: {input}", "model": "summariser", "system": "Be short."},
                    {"template": "Question was {question}. Use: {input}", "temperature": 0.1},
                ],
            },
        )
        uid = r.json()["data"]["uid"]
        chat = await c.post(
            CHAT, json={"messages": "why is the sky blue?", "chat_mode": "chat_flow", "chat_param": uid}
        )
        assert chat.status_code == 200, chat.text
        answer = chat.json()["choices"][0]["message"]["content"]
        assert answer == (
            "FINAL[Question was why is the sky blue?. Use: SUMMARY(Summarise: why is the sky blue?)|why is the sky blue?]"
        )
        step1 = summariser.requests[-1]
        assert [m.role for m in step1.messages] == ["system", "user"] and step1.messages[
            0
        ].content == "Be short."
        assert h.backend.requests[-1].temperature == 0.1
        messages = await h.engine.read_messages(chat.json()["conv_uid"])
        assert [(m.role, m.content) for m in messages] == [
            ("user", "why is the sky blue?"),
            ("assistant", answer),
        ]

        streamed = await c.post(
            CHAT,
            json={
                "messages": "and at night?",
                "chat_mode": "chat_flow",
                "chat_param": uid,
                "stream": True,
                "conv_uid": chat.json()["conv_uid"],
            },
        )
        text, _ = stream_text(streamed.text)
        assert text.startswith("FINAL[Question was and at night?. Use: SUMMARY(Summarise: and at night?)")
        assert len(await h.engine.read_messages(chat.json()["conv_uid"])) == 4

        unknown = await c.post(
            CHAT, json={"messages": "x", "chat_mode": "chat_flow", "chat_param": "no-such-flow"}
        )
        assert unknown.status_code == 400


async def test_flow_with_scene_steps() -> None:
    h = harness(scripted(_final))
    async with client(h.app) as c:
        await c.post("/api/v2/serve/knowledge/spaces", json={"name": "facts"})
        await c.post(
            "/api/v2/serve/knowledge/documents",
            json={
                "space_name": "facts",
                "doc_name": "sky",
                "content": "The sky looks blue because of Rayleigh scattering.",
            },
        )
        await c.post(
            "/api/v2/serve/apps", json={"app_code": "poet", "app_name": "Poet", "prompt_template": "Rhyme."}
        )
        last_scene = await c.post(
            FLOWS,
            json={
                "name": "rewrite-then-retrieve",
                "flow_data": [
                    {"template": "sky scattering {input}"},
                    {"scene": "chat_knowledge", "param": "facts"},
                ],
            },
        )
        uid = last_scene.json()["data"]["uid"]
        for stream in (False, True):
            r = await c.post(
                CHAT,
                json={"messages": "why blue", "chat_mode": "chat_flow", "chat_param": uid, "stream": stream},
            )
            assert r.status_code == 200, r.text
            content = stream_text(r.text)[0] if stream else r.json()["choices"][0]["message"]["content"]
            assert content.endswith("Sources: doc 'sky' chunk 0")  # the scene's finish ran
            sent = h.backend.requests[-1].messages
            assert "Input from the previous step:" in sent[0].content
            assert any("Rayleigh" in m.content for m in sent if m.role == "system")

        middle_scene = await c.post(
            FLOWS,
            json={
                "name": "app-in-the-middle",
                "flow_data": [{"scene": "chat_app", "param": "poet"}, {"template": "Polish: {input}"}],
            },
        )
        r = await c.post(
            CHAT,
            json={
                "messages": "sing",
                "chat_mode": "chat_flow",
                "chat_param": middle_scene.json()["data"]["uid"],
            },
        )
        assert r.json()["choices"][0]["message"]["content"] == "FINAL[Polish: FINAL[Rhyme.|sing]|sing]"

        broken = await c.post(FLOWS, json={"name": "broken", "flow_data": [{"scene": "chat_nowhere"}, "x"]})
        assert "chat_nowhere" in assert_envelope_error(broken, 400)["err_msg"]
    assert len(await h.store.list_conversations()) == 3  # the failed turn stored nothing


async def test_long_intermediate_output_is_fitted_to_the_next_model() -> None:
    verbose = scripted(lambda m: "word " * 3000)
    h = harness(
        scripted(_final),
        context_window=1024,
        max_new_tokens=128,
        more_models=[ModelSpec("verbose", verbose, context_window=8192, max_new_tokens=4000)],
    )
    async with client(h.app) as c:
        r = await c.post(
            FLOWS,
            json={
                "name": "long",
                "flow_data": [{"template": "{input}", "model": "verbose"}, "Condense: {input}"],
            },
        )
        chat = await c.post(
            CHAT, json={"messages": "go", "chat_mode": "chat_flow", "chat_param": r.json()["data"]["uid"]}
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["prompt_tokens"] + 128 <= 1024


async def test_a_step_whose_model_ignores_its_budget_passes_on_only_that_many_tokens() -> None:
    runaway = MisbehavingLocal(LocalBackend(reply=lambda m: "blah " * 400), Misbehaviour(ignore_budget=True))
    h = harness(
        scripted(_final),
        more_models=[ModelSpec("runaway", runaway, context_window=8192, max_new_tokens=64)],
    )
    async with client(h.app) as c:
        r = await c.post(
            FLOWS,
            json={
                "name": "runaway-step",
                "flow_data": [
                    {"template": "{input}", "model": "runaway", "max_new_tokens": 6},
                    {"template": "Use: {input}"},
                ],
            },
        )
        uid = r.json()["data"]["uid"]
        chat = await c.post(CHAT, json={"messages": "go", "chat_mode": "chat_flow", "chat_param": uid})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == f"FINAL[Use: {'blah ' * 5}blah|go]"


# -- DB-GPT's FlowPanel shape ---------------------------------------------------------


def _graph(steps: list[dict[str, object]], catalog: list[dict[str, object]]) -> dict[str, object]:
    """A FlowData graph of ``steps`` (``operator`` plus parameter values), built
    from the server's node catalog as an editor would."""
    by_name = {n["name"]: n for n in catalog}
    nodes = []
    for i, step in enumerate(steps):
        data = json.loads(json.dumps(by_name[step["operator"]]))
        for p in data["parameters"]:
            p["value"] = step.get(p["name"])
        pos = {"x": 10.0 * i, "y": 5.0, "zoom": 0.0}
        nodes.append(
            {
                "width": 300,
                "height": 200,
                "id": f"n{i}",
                "position": pos,
                "position_absolute": pos,
                "data": data,
            }
        )
    edges = [
        {"source": f"n{i}", "target": f"n{i + 1}", "source_order": 0, "target_order": 0, "id": f"e{i}"}
        for i in range(len(nodes) - 1)
    ]
    return {"nodes": nodes, "edges": edges, "viewport": {"x": 1.0, "y": 2.0, "zoom": 0.5}}


async def test_a_label_sent_on_creation_is_kept() -> None:
    h = harness()
    async with client(h.app) as c:
        r = await c.post(
            FLOWS, json={"name": "labelled", "label": "My Labelled Flow", "flow_data": ["x {input}"]}
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"]["label"] == "My Labelled Flow"
        uid = r.json()["data"]["uid"]
        assert (await c.get(f"{FLOWS}/{uid}")).json()["data"]["label"] == "My Labelled Flow"
        renamed = await c.put(f"{FLOWS}/{uid}", json={"label": "Renamed"})
        assert renamed.json()["data"]["label"] == "Renamed"


async def test_a_flowpanel_graph_round_trips_and_runs_in_chain_order() -> None:
    h = harness(scripted(_final))
    async with client(h.app) as c:
        catalog = (await c.get("/api/v2/serve/awel/nodes")).json()["data"]
        assert [n["name"] for n in catalog] == ["convcore_prompt_step", "convcore_scene_step"]
        graph = _graph(
            [
                {"operator": "convcore_prompt_step", "template": "First: {input}"},
                {"operator": "convcore_prompt_step", "template": "Then: {input}", "temperature": 0.3},
            ],
            catalog,
        )
        # The edges, not the order of the nodes, say which step runs first.
        graph["nodes"] = list(reversed(graph["nodes"]))
        panel = {
            "uid": "panel-1",
            "label": "Two steps",
            "name": "two_steps",
            "flow_category": "common",
            "flow_data": graph,
            "state": "initializing",
            "source": "DBGPT-WEB",
            "version": "0.1.1",
            "define_type": "json",
            "authors": ["ada"],
        }
        created = await c.post(FLOWS, json=panel)
        assert created.status_code == 200, created.text
        data = created.json()["data"]
        assert data["flow_data"] == graph
        assert [s["template"] for s in data["steps"]] == ["First: {input}", "Then: {input}"]
        assert (data["label"], data["source"], data["version"], data["authors"]) == (
            "Two steps",
            "DBGPT-WEB",
            "0.1.1",
            ["ada"],
        )
        trigger = data["metadata"]["triggers"][0]
        assert trigger == {"trigger_type": "http", "path": f"{FLOWS}/panel-1/run", "methods": ["POST"]}

        ran = await c.post(f"{FLOWS}/panel-1/run", json={"messages": "hi", "stream": False})
        assert ran.status_code == 200, ran.text
        assert ran.json()["choices"][0]["message"]["content"] == "FINAL[Then: FINAL[|First: hi]|hi]"
        assert h.backend.requests[-1].temperature == 0.3
        streamed = await c.post(f"{FLOWS}/panel-1/run", json={"messages": "hi"})
        text, chunks = stream_text(streamed.text)
        assert text == "FINAL[Then: FINAL[|First: hi]|hi]"
        assert {ch["id"] for ch in chunks} == {streamed.headers["x-conv-uid"]}

        # Updating with a step list replaces the graph by a drawing of the steps.
        updated = await c.put(f"{FLOWS}/panel-1", json={"flow_data": ["Only: {input}"]})
        nodes = updated.json()["data"]["flow_data"]["nodes"]
        assert [n["data"]["parameters"][0]["value"] for n in nodes] == ["Only: {input}"]
        assert updated.json()["data"]["authors"] == ["ada"]

        assert_envelope_error(await c.post(f"{FLOWS}/nope/run", json={"messages": "hi"}), 404)
        wrong_mode = await c.post(f"{FLOWS}/panel-1/run", json={"messages": "hi", "chat_mode": "chat_app"})
        assert "chat_mode" in assert_envelope_error(wrong_mode, 400)["err_msg"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda g: g["nodes"][0]["data"].update(name="llm_operator"), "operator 'llm_operator'"),
        (lambda g: g.update(edges=[]), "one chain"),
        (lambda g: g["edges"].append({"source": "n1", "target": "n0", "id": "back"}), "one chain"),
        (lambda g: g["edges"][0].update(target="n9"), "not in nodes"),
        (lambda g: g.update(nodes=[]), "at least one node"),
        (lambda g: g["nodes"][0]["data"]["parameters"][0].update(value=None), "exactly one of"),
    ],
)
async def test_a_graph_convcore_cannot_run_is_refused_and_not_stored(change: Any, reason: str) -> None:
    h = harness()
    async with client(h.app) as c:
        catalog = (await c.get("/api/v2/serve/awel/nodes")).json()["data"]
        graph = _graph(
            [
                {"operator": "convcore_prompt_step", "template": "A {input}"},
                {"operator": "convcore_scene_step", "scene": "chat_knowledge", "param": "docs"},
            ],
            catalog,
        )
        change(graph)
        r = await c.post(FLOWS, json={"name": "bad", "label": "Bad", "flow_data": graph})
        body = assert_envelope_error(r, 400)
        assert reason in body["err_msg"] and body["err_msg"].startswith("flow_data")
        assert (await c.get(FLOWS)).json()["data"]["items"] == []


@pytest.mark.parametrize(("field", "value"), [("state", "bogus"), ("flow_category", "chat_everything")])
async def test_state_and_category_outside_dbgpts_values_are_refused(field: str, value: str) -> None:
    h = harness()
    async with client(h.app) as c:
        r = await c.post(FLOWS, json={"name": "f", "flow_data": ["x"], field: value})
        assert field in assert_envelope_error(r, 400)["err_msg"]
        assert (await c.get(FLOWS)).json()["data"]["items"] == []
