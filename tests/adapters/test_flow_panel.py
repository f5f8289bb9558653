"""Steps <-> DB-GPT's FlowData graph: drawing steps and reading the graph back
gives the same steps, whatever order the nodes come in."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from convcore_scenes.flow_panel import flow_data_from_steps, node_catalog, steps_from_flow_data
from convcore_scenes.flows import FlowStep

_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
_common = {
    "model": st.none() | st.sampled_from(["m1", "m2"]),
    "temperature": st.none() | st.floats(min_value=0, max_value=2, allow_nan=False),
    "max_new_tokens": st.none() | st.integers(min_value=1, max_value=4096),
    "name": st.none() | _text,
}
_prompt = st.fixed_dictionaries({"template": _text}, optional={"system": _text, **_common})
_scene = st.fixed_dictionaries(
    {"scene": st.sampled_from(["chat_knowledge", "chat_data", "chat_app", "chat_normal"])},
    optional={"param": _text, **_common},
)


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(_prompt | _scene, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_steps_survive_a_drawing_and_a_shuffle_of_its_nodes(
    steps: list[dict[str, object]], seed: int
) -> None:
    parsed = [FlowStep.model_validate(s) for s in steps]
    graph = flow_data_from_steps(parsed)
    random.Random(seed).shuffle(graph["nodes"])
    random.Random(seed + 1).shuffle(graph["edges"])
    back = [FlowStep.model_validate(s) for s in steps_from_flow_data(graph)]
    assert back == parsed


def test_the_catalog_matches_the_nodes_drawn() -> None:
    catalog = {n["name"]: n for n in node_catalog()}
    graph = flow_data_from_steps([FlowStep(template="x"), FlowStep(scene="chat_normal")])
    for node in graph["nodes"]:
        meta = catalog[node["data"]["name"]]
        assert [p["name"] for p in node["data"]["parameters"]] == [p["name"] for p in meta["parameters"]]
        assert node["data"]["id"] == meta["id"] and node["data"]["flow_type"] == "operator"
