"""Flows in DB-GPT's FlowPanel shape: ``flow_data`` as nodes, edges and a viewport.

DB-GPT draws a flow as operator nodes joined by edges (``FlowData``); its
client sends and validates that shape. convcore runs a flow as an ordered
list of steps (:class:`~.flows.FlowStep`). This module converts both ways:

- a step is one operator node: ``convcore_prompt_step`` (a prompt template)
  or ``convcore_scene_step`` (a chat scene), its settings in the node's
  ``parameters`` (a prompt step's ``template`` and ``system``, a scene
  step's ``scene`` and ``param``; either's ``model``, ``temperature``,
  ``max_new_tokens``); the edges chain the nodes in order;
- :func:`steps_from_flow_data` reads such a graph back into steps, refusing
  operators convcore cannot run and graphs that are not one chain;
- :func:`flow_data_from_steps` draws steps as a graph (for flows created
  with the step list), and :func:`node_catalog` lists the two operators as
  DB-GPT's ``/awel/nodes`` does, for editors that build flows.

A flow created from a graph keeps that graph as sent (positions, labels,
handles), so reading it back returns it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from .flows import FlowStep

__all__ = [
    "PROMPT_OPERATOR",
    "SCENE_OPERATOR",
    "FlowGraph",
    "FlowMetadata",
    "FlowTrigger",
    "NodeIO",
    "NodeMetadata",
    "NodeParameter",
    "flow_data_from_steps",
    "flow_metadata",
    "node_catalog",
    "steps_from_flow_data",
]

PROMPT_OPERATOR = "convcore_prompt_step"
SCENE_OPERATOR = "convcore_scene_step"

_STR = ("str", "builtins.str")
_PARAMS: dict[str, tuple[tuple[str, str, tuple[str, str], bool, str], ...]] = {
    # name, label, (type_name, type_cls), optional, description
    PROMPT_OPERATOR: (
        (
            "template",
            "Template",
            _STR,
            False,
            "The prompt; {input} is the previous output, {question} the user's",
        ),
        ("system", "System", _STR, True, "A system message for this step"),
        ("model", "Model", _STR, True, "The model of this step (default: the request's)"),
        ("temperature", "Temperature", ("float", "builtins.float"), True, "Sampling temperature, 0 to 2"),
        ("max_new_tokens", "Max new tokens", ("int", "builtins.int"), True, "The reply budget of this step"),
    ),
    SCENE_OPERATOR: (
        ("scene", "Scene", _STR, False, "A chat mode: chat_knowledge, chat_data, chat_app, chat_normal"),
        ("param", "Param", _STR, True, "The scene's chat_param (a space, a datasource, an app code)"),
        ("model", "Model", _STR, True, "The model of this step (default: the request's)"),
        ("temperature", "Temperature", ("float", "builtins.float"), True, "Sampling temperature, 0 to 2"),
        ("max_new_tokens", "Max new tokens", ("int", "builtins.int"), True, "The reply budget of this step"),
    ),
}
_ABOUT = {
    PROMPT_OPERATOR: ("Prompt step", "llm", "LLM", "Fills a prompt template and asks the model"),
    SCENE_OPERATOR: (
        "Scene step",
        "common",
        "Common",
        "Runs a chat scene (knowledge, data, app) on its input",
    ),
}


class NodeIO(BaseModel):
    """An operator's input or output (DB-GPT's IOField)."""

    label: str
    name: str
    description: str
    type_name: str
    type_cls: str
    is_list: bool


class NodeParameter(BaseModel):
    """A setting of an operator (DB-GPT's Parameter); in a node drawn from a
    flow's steps it also carries its value."""

    label: str
    name: str
    type_name: str
    type_cls: str
    category: str
    optional: bool
    default: None
    description: str


class NodeMetadata(BaseModel):
    """An operator a flow may use (DB-GPT's ViewMetadata), as ``/awel/nodes`` lists it."""

    label: str
    name: str
    description: str
    category: str
    category_label: str
    flow_type: str
    id: str
    operator_type: str
    version: str
    type_name: str
    type_cls: str
    inputs: list[NodeIO]
    outputs: list[NodeIO]
    parameters: list[NodeParameter]


class FlowGraph(BaseModel):
    """DB-GPT's FlowData: the node graph as the client sent it, or the flow's
    steps drawn as nodes, edges and a viewport (by flow_data_from_steps)."""

    model_config = ConfigDict(extra="allow")

    nodes: list[dict[str, Any]] = Field(min_length=1, description="Operator nodes, chained by the edges")


class FlowTrigger(BaseModel):
    trigger_type: str
    path: str = Field(description="The flow's run route")
    methods: list[str]


class FlowMetadata(BaseModel):
    """DB-GPT's flow metadata: the run route as the flow's HTTP trigger."""

    triggers: list[FlowTrigger]
    sse_output: bool
    streaming_output: bool


def _operator_id(name: str) -> str:
    return f"operator_{name}___$$___{_ABOUT[name][1]}___$$___v1"


def _io(name: str, label: str) -> dict[str, Any]:
    return {
        "label": label,
        "name": name,
        "description": f"The step's {name} text",
        "type_name": _STR[0],
        "type_cls": _STR[1],
        "is_list": False,
    }


def _metadata(name: str, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``data`` of a node of operator ``name`` (DB-GPT's ViewMetadata)."""
    label, category, category_label, description = _ABOUT[name]
    parameters = []
    for pname, plabel, (type_name, type_cls), optional, pdesc in _PARAMS[name]:
        param: dict[str, Any] = {
            "label": plabel,
            "name": pname,
            "type_name": type_name,
            "type_cls": type_cls,
            "category": "common",
            "optional": optional,
            "default": None,
            "description": pdesc,
        }
        if values is not None:
            param["value"] = values.get(pname)
        parameters.append(param)
    return {
        "label": label,
        "name": name,
        "description": description,
        "category": category,
        "category_label": category_label,
        "flow_type": "operator",
        "id": _operator_id(name),
        "operator_type": "map",
        "version": "v1",
        "type_name": "FlowStep",
        "type_cls": "convcore_scenes.flows.FlowStep",
        "inputs": [_io("input", "Input")],
        "outputs": [_io("output", "Output")],
        "parameters": parameters,
    }


def node_catalog() -> list[dict[str, Any]]:
    """The operators a flow may use, as DB-GPT lists nodes."""
    return [_metadata(PROMPT_OPERATOR), _metadata(SCENE_OPERATOR)]


def flow_data_from_steps(steps: Sequence[FlowStep]) -> dict[str, Any]:
    """``steps`` drawn left to right as a chain of nodes."""
    nodes = []
    for i, step in enumerate(steps):
        name = SCENE_OPERATOR if step.scene is not None else PROMPT_OPERATOR
        values = step.model_dump(exclude={"name"}, exclude_none=True)
        data = _metadata(name, values)
        if step.name:
            data["label"] = step.name
        position = {"x": 360.0 * i, "y": 0.0, "zoom": 0.0}
        nodes.append(
            {
                "width": 320,
                "height": 360,
                "id": f"{_operator_id(name)}_{i}",
                "position": position,
                "position_absolute": dict(position),
                "type": "customNode",
                "data": data,
            }
        )
    edges = [
        {
            "source": nodes[i]["id"],
            "source_order": 0,
            "target": nodes[i + 1]["id"],
            "target_order": 0,
            "id": f"edge_{i}",
            "type": "buttonedge",
        }
        for i in range(len(nodes) - 1)
    ]
    return {"nodes": nodes, "edges": edges, "viewport": {"x": 0.0, "y": 0.0, "zoom": 1.0}}


def _parameter_values(node: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = node.get("parameters")
    if not isinstance(params, list):
        raise ValueError(f"{where}: data.parameters must be a list")
    values: dict[str, Any] = {}
    for p in params:
        if not isinstance(p, Mapping) or not isinstance(p.get("name"), str):
            raise ValueError(f"{where}: each parameter needs a name")
        value = p.get("value", p.get("default"))
        if value is not None and value != "":
            values[p["name"]] = value
    return values


def _chain(ids: list[str], edges: Sequence[Any]) -> list[str]:
    """The node ids in edge order; ValueError unless the edges make one chain."""
    nxt: dict[str, str] = {}
    has_in: set[str] = set()
    for j, edge in enumerate(edges):
        if not isinstance(edge, Mapping):
            raise ValueError(f"edges[{j}] must be an object")
        source, target = edge.get("source"), edge.get("target")
        if source not in ids or target not in ids:
            raise ValueError(f"edges[{j}] joins a node that is not in nodes")
        if source in nxt or target in has_in or source == target:
            raise ValueError("the nodes must form one chain (each step feeds the next)")
        nxt[str(source)] = str(target)
        has_in.add(str(target))
    starts = [i for i in ids if i not in has_in]
    if len(starts) != 1:
        raise ValueError("the nodes must form one chain (each step feeds the next)")
    order = [starts[0]]
    while order[-1] in nxt:
        order.append(nxt[order[-1]])
    if len(order) != len(ids):
        raise ValueError("the nodes must form one chain (each step feeds the next)")
    return order


def steps_from_flow_data(flow_data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The steps a node graph describes, in chain order (raw, for FlowStep)."""
    nodes = flow_data.get("nodes")
    edges = flow_data.get("edges") or []
    if not isinstance(nodes, list) or not nodes:
        raise ValueError("nodes must hold at least one node")
    if not isinstance(edges, list):
        raise ValueError("edges must be a list")
    by_id: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(nodes):
        where = f"nodes[{i}]"
        if not isinstance(node, Mapping) or not isinstance(node.get("id"), str):
            raise ValueError(f"{where} needs a string id")
        data = node.get("data")
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} needs data")
        name = data.get("name")
        if not isinstance(name, str) or name not in _PARAMS:
            raise ValueError(
                f"{where} is operator {name!r}, which convcore cannot run; "
                f"a flow is a chain of {PROMPT_OPERATOR!r} and {SCENE_OPERATOR!r} nodes"
            )
        known = {p[0] for p in _PARAMS[str(name)]}
        step = {k: v for k, v in _parameter_values(data, where).items() if k in known}
        if isinstance(data.get("label"), str) and data["label"] != _ABOUT[str(name)][0]:
            step["name"] = data["label"]
        if node["id"] in by_id:
            raise ValueError(f"{where}: node id {node['id']!r} is used twice")
        by_id[node["id"]] = step
    order = _chain(list(by_id), edges)
    return [by_id[i] for i in order]


def flow_metadata(run_path: str) -> dict[str, Any]:
    """DB-GPT's flow metadata: one HTTP trigger, streaming OpenAI-style SSE."""
    trigger = FlowTrigger(trigger_type="http", path=run_path, methods=["POST"])
    return FlowMetadata(triggers=[trigger], sse_output=True, streaming_output=True).model_dump()
