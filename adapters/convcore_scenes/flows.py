"""chat_flow: flows of steps. chat_param is the flow's uid.

A flow's ``flow_data`` is an ordered list of steps; each is either a prompt
template (``"Summarise: {input}"``, with its own model, system text,
temperature) or a scene reference (``{"scene": "chat_knowledge", "param":
"docs"}``); DB-GPT's node graph (``nodes``/``edges``) of such steps is
accepted too (:mod:`.flow_panel`). ``{input}`` is the previous step's
output (the user's input for the first step) and ``{question}`` the user's
input; other braces are left alone. A turn runs the steps in order:

- every step but the last runs inside ``prepare``, through the model
  registry's backends (a scene step runs that scene's prepare, the model,
  and its finish), each prompt fitted to its model's window;
- the last step becomes the turn's own generation: its rendered template
  is the system prompt and its model the default (a last scene step hands
  over its plan), so the answer streams and only it is stored as the
  assistant's reply.

A flow belongs to its creator's ``user_name`` / ``sys_code`` (see
:mod:`convcore.owners`). Its scene steps act for the turn's caller, so a
flow reaches only the datasources, spaces and apps the caller could name
directly.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from convcore.answer_schema import SENT_WHOLE
from convcore.errors import BackendError, ConflictError, ConvcoreError, InvalidRequestError, UnknownModelError
from convcore.generation import GenerationRequest, PromptMessage
from convcore.models import Conversation
from convcore.owners import OPERATOR, Caller
from convcore.records import RecordStore
from convcore.registry import ModelSpec
from convcore.reply_budget import ReplyMeter, metered_generation
from convcore.scenes import Scene, ScenePlan, SceneRequest
from convcore.schema import ChatRequest, has_text
from convcore.tokens import count_message, get_tokenizer

from .base import DuplicateError, UniqueNames, WireModel, iter_records, now_text, owned
from .flow_panel import steps_from_flow_data

__all__ = [
    "Flow",
    "FlowChange",
    "FlowCreate",
    "FlowHead",
    "FlowIn",
    "FlowNotRunnableError",
    "FlowRegistry",
    "FlowScene",
    "FlowStep",
    "render",
]

KIND = "flow"
MAX_STEPS = 20
_PLACEHOLDER = re.compile(r"\{(input|question)\}")


def render(template: str, *, input: str, question: str) -> str:
    """``template`` with ``{input}`` and ``{question}`` filled in; nothing else touched."""
    values = {"input": input, "question": question}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class FlowStep(WireModel):
    """One step: a prompt ``template`` or a ``scene`` (with its ``param``)."""

    # Read as a request's step; answered whole (Flow.public).
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, **SENT_WHOLE)

    name: str | None = Field(default=None, max_length=256)
    # Read as "prompt" (or "template"); stored and answered as "template".
    template: str | None = Field(default=None, validation_alias="prompt", max_length=100_000)
    system: str | None = Field(default=None, max_length=100_000)
    scene: str | None = Field(default=None, max_length=256)
    param: str | None = Field(default=None, max_length=1024)
    model: str | None = Field(default=None, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_new_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_kind(self) -> FlowStep:
        if (self.template is None) == (self.scene is None):
            raise ValueError("a step needs exactly one of 'template' (a prompt) or 'scene'")
        if self.scene == "chat_flow":
            raise ValueError("a step cannot run another flow")
        return self


def _is_graph(value: Any) -> bool:
    return isinstance(value, dict) and "nodes" in value


def _steps(value: Any) -> Any:
    if _is_graph(value):
        return steps_from_flow_data(value)
    if isinstance(value, dict) and "steps" in value:
        value = value["steps"]
    if isinstance(value, list):
        return [{"template": v} if isinstance(v, str) else v for v in value]
    return value


class FlowChange(WireModel):
    """The fields of a flow a client may set (an update by uid in the path)."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = Field(default=None, min_length=1, max_length=256)
    label: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=10_000)
    editable: StrictBool | None = None
    # DB-GPT's State and FlowCategory values: its client refuses a flow with any other.
    state: (
        Literal["initializing", "developing", "testing", "deployed", "running", "disabled", "load_failed"]
        | None
    ) = None
    user_name: str | None = Field(default=None, max_length=256)
    sys_code: str | None = Field(default=None, max_length=256)
    flow_category: Literal["common", "chat_flow", "chat_agent"] | None = None
    flow_data: list[FlowStep] | None = Field(default=None, max_length=MAX_STEPS)
    # DB-GPT's FlowPanel fields, kept as sent.
    error_message: str | None = Field(default=None, max_length=10_000)
    source: str | None = Field(default=None, max_length=256)
    source_url: str | None = Field(default=None, max_length=4096)
    version: str | None = Field(default=None, max_length=64)
    define_type: str | None = Field(default=None, max_length=64)
    variables: list[dict[str, Any]] | None = Field(default=None, max_length=200)
    authors: list[str] | None = Field(default=None, max_length=100)
    # The node graph, when flow_data came as DB-GPT's FlowData (set from flow_data only).
    view: SkipJsonSchema[dict[str, Any] | None] = None

    @model_validator(mode="before")
    @classmethod
    def _keep_graph(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "view"}
            if _is_graph(value.get("flow_data")):
                value["view"] = value["flow_data"]
        return value

    @field_validator("flow_data", mode="before")
    @classmethod
    def _accept_shapes(cls, value: Any) -> Any:
        return _steps(value)

    @field_validator("flow_data")
    @classmethod
    def _not_empty(cls, value: list[FlowStep] | None) -> list[FlowStep] | None:
        if value is not None and not value:
            raise ValueError("must hold at least one step")
        return value


class FlowIn(FlowChange):
    """A flow as a client sends it (create or update)."""

    uid: str | None = Field(default=None, min_length=1, max_length=256)


class FlowCreate(FlowIn):
    """A new flow: ``name`` and ``flow_data`` are required (``uid`` is made when absent)."""

    name: str = Field(min_length=1, max_length=256)
    flow_data: list[FlowStep] = Field(min_length=1, max_length=MAX_STEPS)


class FlowNotRunnableError(ConflictError):
    """A stored flow cannot run as it is: a step names a scene that is gone,
    or a space, datasource, app or model that does not exist (HTTP 409)."""


class FlowHead(BaseModel):
    """The fields a stored flow and its FlowPanel answer share (``flow_data`` differs)."""

    uid: str
    dag_id: str = ""
    name: str
    label: str = ""
    description: str = ""
    editable: bool = True
    state: str = "deployed"
    user_name: str | None = None
    sys_code: str | None = None
    flow_category: str = "common"
    gmt_created: str = ""
    gmt_modified: str = ""


class Flow(FlowHead):
    model_config = ConfigDict(frozen=True)

    flow_data: list[FlowStep]
    view: dict[str, Any] | None = None
    panel: dict[str, Any] = Field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return self.model_dump(by_alias=False, exclude_none=False)


# FlowIn fields that a Flow keeps in ``panel`` (DB-GPT's, not convcore's own).
PANEL_FIELDS = ("error_message", "source", "source_url", "version", "define_type", "variables", "authors")


class FlowRegistry:
    """Flows by uid, with unique names.

    ``scenes`` gives the scenes a step may name (the wiring passes the
    engine's): a flow whose step names another, or leaves out the param its
    scene needs, is refused when saved, so a stored flow can always start.
    Without it steps are not checked until they run.
    """

    def __init__(self, records: RecordStore, scenes: Callable[[], Mapping[str, Scene]] | None = None) -> None:
        self.records = records
        self.names = UniqueNames(records, KIND, "name")
        self.scenes = scenes

    def step_scenes(self) -> dict[str, bool] | None:
        """The scenes a step may name, each with whether it needs a param
        (None when this registry was given no scenes)."""
        if self.scenes is None:
            return None
        return {name: bool(s.needs_param) for name, s in self.scenes().items() if name != "chat_flow"}

    def check_steps(self, steps: list[FlowStep]) -> None:
        """InvalidRequestError unless each scene step names a scene a step may
        name, with the param that scene needs."""
        known = self.step_scenes()
        if known is None:
            return
        for i, step in enumerate(steps):
            if step.scene is None:
                continue
            if step.scene not in known:
                raise InvalidRequestError(
                    f"names scene {step.scene!r}, which is not available; "
                    f"choose from {', '.join(sorted(known))}",
                    field=f"flow_data.{i}.scene",
                )
            if known[step.scene] and not has_text(step.param):
                raise InvalidRequestError(
                    f"is required: scene {step.scene!r} needs one", field=f"flow_data.{i}.param"
                )

    async def get(self, uid: str, *, caller: Caller = OPERATOR) -> Flow:
        return Flow.model_validate(owned(await self.records.get(KIND, uid), caller, "flow", uid))

    async def find(self, uid: str, *, caller: Caller = OPERATOR) -> Flow | None:
        found = await self.records.get(KIND, uid)
        return None if found is None or not caller.reaches(found) else Flow.model_validate(found)

    async def list(
        self, *, name: str | None = None, uid: str | None = None, caller: Caller = OPERATOR
    ) -> list[Flow]:
        flows = [Flow.model_validate(r) async for r in iter_records(self.records, KIND, caller)]
        return [f for f in flows if (name is None or f.name == name) and (uid is None or f.uid == uid)]

    async def create(self, data: FlowIn, *, caller: Caller = OPERATOR) -> Flow:
        if not data.name:
            raise InvalidRequestError("is required", field="name")
        if not data.flow_data:
            raise InvalidRequestError("needs at least one step", field="flow_data")
        self.check_steps(data.flow_data)
        if await self.names.lookup(data.name) is not None:
            raise DuplicateError("flow", "name", data.name)
        uid = data.uid or str(uuid.uuid4())
        stamp = now_text()
        fields = caller.stamp(
            data.model_dump(exclude_none=True, exclude={"uid", "flow_data", "label", "view", *PANEL_FIELDS})
        )
        panel = data.model_dump(exclude_none=True, include=set(PANEL_FIELDS))
        flow = Flow(
            **fields,
            uid=uid,
            dag_id=f"flow_dag_{data.name}_{uid}",
            label=data.label or data.name,
            flow_data=data.flow_data,
            view=data.view,
            panel=panel,
            gmt_created=stamp,
            gmt_modified=stamp,
        )
        try:
            await self.records.put(KIND, uid, flow.model_dump(), create_only=True)
        except ConflictError:
            raise DuplicateError("flow", "uid", uid) from None
        try:
            await self.names.claim(flow.name, uid, "flow")
        except InvalidRequestError:
            await self.records.delete(KIND, uid)
            raise
        return flow

    async def update(self, uid: str, data: FlowChange, *, caller: Caller = OPERATOR) -> Flow:
        """Change the fields ``data`` sets; only an unbound caller may hand the flow to another owner."""
        sent_uid = getattr(data, "uid", None)
        if sent_uid is not None and sent_uid != uid:
            raise InvalidRequestError("does not match the flow in the path", field="uid")
        if data.flow_data is not None:
            self.check_steps(data.flow_data)
        current = await self.get(uid, caller=caller)
        skip = {"uid", "view", *PANEL_FIELDS} | ({"user_name", "sys_code"} if caller.bound else set())
        sent = data.model_dump(exclude_unset=True, exclude=skip)
        changes: dict[str, Any] = {k: v for k, v in sent.items() if v is not None}
        changes["panel"] = {**current.panel, **data.model_dump(exclude_none=True, include=set(PANEL_FIELDS))}
        if data.flow_data is not None:
            changes["flow_data"] = data.flow_data
            changes["view"] = data.view
        updated = Flow.model_validate({**current.model_dump(), **changes, "gmt_modified": now_text()})
        await self.records.put(KIND, uid, updated.model_dump())
        if updated.name != current.name:
            try:
                await self.names.claim(updated.name, uid, "flow")
            except InvalidRequestError:
                await self.records.put(KIND, uid, current.model_dump())
                raise
            await self.names.release(current.name, uid)
        return updated

    async def delete(self, uid: str, *, caller: Caller = OPERATOR) -> Flow:
        await self.get(uid, caller=caller)
        flow = Flow.model_validate(owned(await self.records.delete(KIND, uid), OPERATOR, "flow", uid))
        await self.names.release(flow.name, uid)
        return flow


# -- running -------------------------------------------------------------------


class FlowScene:
    """``chat_flow``: the steps of the flow named by chat_param (its uid).

    ``scenes`` gives the scenes a step may name (the wiring passes the
    registry's, so user scenes work too).
    """

    name = "chat_flow"
    needs_param = True

    def __init__(self, flows: FlowRegistry, scenes: Callable[[], Mapping[str, Scene]] | None = None) -> None:
        self.flows = flows
        self._scenes = scenes or (lambda: {})

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        uid = (request.param or "").strip()
        flow = await self.flows.find(uid, caller=request.caller)
        if flow is None:
            raise InvalidRequestError(f"no flow with uid {uid!r}", field="chat_param")
        question = request.question
        current = question
        steps = flow.flow_data
        for i, step in enumerate(steps[:-1], start=1):
            with self._step(flow, i, step):
                current = await self._run_step(flow, i, step, current, question, request)
        with self._step(flow, len(steps), steps[-1]):
            return await self._last_step(flow, len(steps), steps[-1], current, question, request)

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        state = plan.state
        if isinstance(state, tuple) and len(state) == 3:
            scene, sub_request, sub_plan = state
            return str(await scene.finish(sub_request, sub_plan, reply, used_context))
        return reply

    # -- steps ---------------------------------------------------------------

    def _scene(self, flow: Flow, index: int, step: FlowStep) -> Scene:
        scene = self._scenes().get(step.scene or "")
        if scene is None or step.scene == "chat_flow":
            raise FlowNotRunnableError(
                f"flow {flow.uid!r} step {index} names scene {step.scene!r}, which is not available"
            )
        if scene.needs_param and not has_text(step.param):
            raise FlowNotRunnableError(
                f"flow {flow.uid!r} step {index} needs a param for scene {step.scene!r}"
            )
        return scene

    @contextlib.contextmanager
    def _step(self, flow: Flow, index: int, step: FlowStep) -> Iterator[None]:
        """What the flow's own step names (its scene's param, its model) and
        does not exist is the stored flow's conflict, not the request's fault."""
        try:
            yield
        except UnknownModelError as exc:
            if step.model is None:
                raise
            raise FlowNotRunnableError(f"flow {flow.uid!r} step {index}: {exc}") from exc
        except InvalidRequestError as exc:
            if exc.field != "chat_param":
                raise
            raise FlowNotRunnableError(f"flow {flow.uid!r} step {index}: {exc}") from exc

    def _spec(self, request: SceneRequest, step: FlowStep) -> ModelSpec:
        return request.models.get(step.model or request.request.model)

    async def _run_step(
        self, flow: Flow, index: int, step: FlowStep, current: str, question: str, request: SceneRequest
    ) -> str:
        spec = self._spec(request, step)
        if step.scene is None:
            template = step.template or "{input}"
            system = (step.system,) if step.system else ()
            prompt = _fit_template(spec, template, system, current, question, step.max_new_tokens)
            return await _generate(spec, [*_sys(system), PromptMessage(role="user", content=prompt)], step)
        scene = self._scene(flow, index, step)
        text = render(step.template, input=current, question=question) if step.template else current
        sub_req = _sub_scene_request(request, step, text, spec.name, None)
        plan = await scene.prepare(sub_req)
        if plan.reply is not None:
            return await scene.finish(sub_req, plan, plan.reply, 0)
        spec = request.models.get(step.model or plan.model or spec.name)
        messages, used = _fit_scene_prompt(spec, plan, text, step.max_new_tokens or plan.max_new_tokens)
        reply = await _generate(spec, messages, step, plan.temperature, plan.max_new_tokens)
        return await scene.finish(sub_req, plan, reply, used)

    async def _last_step(
        self, flow: Flow, index: int, step: FlowStep, current: str, question: str, request: SceneRequest
    ) -> ScenePlan:
        spec = self._spec(request, step)
        if step.scene is None:
            template = step.template or "{input}"
            # The rendered template is the turn's system prompt: keep it within half the prompt room.
            limit = (spec.context_window - (step.max_new_tokens or spec.max_new_tokens)) // 2
            system = _fit_text_into(spec, template, current, question, limit, prefix=step.system)
            return ScenePlan(
                system_prompt=system,
                model=step.model,
                temperature=step.temperature,
                max_new_tokens=step.max_new_tokens,
            )
        scene = self._scene(flow, index, step)
        text = render(step.template, input=current, question=question) if step.template else current
        sub_req = _sub_scene_request(request, step, text, spec.name, request.conversation)
        plan = await scene.prepare(sub_req)
        system = plan.system_prompt or ""
        if index > 1:
            limit = (spec.context_window - spec.max_new_tokens) // 4
            carried = _truncate(spec, current, limit)
            system = f"{system}\n\nInput from the previous step:\n{carried}".strip()
        return ScenePlan(
            system_prompt=system or None,
            context=plan.context,
            max_context_share=plan.max_context_share,
            model=step.model or plan.model,
            temperature=step.temperature if step.temperature is not None else plan.temperature,
            max_new_tokens=step.max_new_tokens or plan.max_new_tokens,
            keep_first_rounds=plan.keep_first_rounds,
            reply=plan.reply,
            state=(scene, sub_req, plan),
        )


def _sub_scene_request(
    parent: SceneRequest, step: FlowStep, text: str, model: str, conversation: Conversation | None
) -> SceneRequest:
    """A scene step's request, acting for the turn's caller (its owner and its binding)."""
    sub = ChatRequest(
        messages=text,
        chat_mode=step.scene,
        chat_param=step.param,
        model=model,
        user_name=parent.request.user_name,
        sys_code=parent.request.sys_code,
    )
    return SceneRequest(
        request=sub, conversation=conversation, models=parent.models, owned_only=parent.owned_only
    )


def _sys(system: tuple[str, ...]) -> list[PromptMessage]:
    return [PromptMessage(role="system", content=s) for s in system]


def _truncate(spec: ModelSpec, text: str, max_tokens: int) -> str:
    tok = get_tokenizer(spec.encoding)
    ids = tok.encode(text)
    if len(ids) <= max_tokens:
        return text
    return tok.decode(ids[: max(max_tokens, 0)]).replace("\ufffd", "") + " …"


def _fit_text_into(
    spec: ModelSpec, template: str, current: str, question: str, limit: int, prefix: str | None = None
) -> str:
    """The rendered template, its ``{input}`` cut so the whole stays within ``limit`` tokens."""
    head = f"{prefix}\n\n" if prefix else ""
    full = head + render(template, input=current, question=question)
    tok = get_tokenizer(spec.encoding)
    if count_message(tok, "system", full) <= limit:
        return full
    bare = count_message(tok, "system", head + render(template, input="", question=question))
    room = limit - bare - 8
    if room <= 0:
        raise InvalidRequestError(
            f"a flow step's prompt does not fit model {spec.name!r}'s window", field="chat_param"
        )
    return head + render(template, input=_truncate(spec, current, room), question=question)


def _fit_template(
    spec: ModelSpec,
    template: str,
    system: tuple[str, ...],
    current: str,
    question: str,
    max_new: int | None,
) -> str:
    tok = get_tokenizer(spec.encoding)
    limit = spec.context_window - (max_new or spec.max_new_tokens)
    limit -= sum(count_message(tok, "system", s) for s in system)
    return _fit_text_into(spec, template, current, question, limit)


def _fit_scene_prompt(
    spec: ModelSpec, plan: ScenePlan, text: str, max_new: int | None
) -> tuple[list[PromptMessage], int]:
    """A scene's prompt for an intermediate step: its system prompt, as many
    whole context blocks as fit its share, the input; and how many blocks went in."""
    tok = get_tokenizer(spec.encoding)
    limit = spec.context_window - (max_new or spec.max_new_tokens)
    messages = [PromptMessage(role="system", content=plan.system_prompt)] if plan.system_prompt else []
    fixed = sum(count_message(tok, m.role, m.content) for m in messages)
    room = limit - fixed
    user = _truncate(spec, text, max(room // 2, 1))
    room -= count_message(tok, "user", user)
    share = int(max(room, 0) * plan.max_context_share)
    used = 0
    spent = 0
    for block in plan.context:
        cost = count_message(tok, "system", block)
        if spent + cost > share:
            break
        messages.append(PromptMessage(role="system", content=block))
        spent += cost
        used += 1
    messages.append(PromptMessage(role="user", content=user))
    return messages, used


async def _generate(
    spec: ModelSpec,
    messages: list[PromptMessage],
    step: FlowStep,
    temperature: float | None = None,
    max_new: int | None = None,
) -> str:
    request = GenerationRequest(
        model=spec.upstream,
        messages=tuple(messages),
        max_new_tokens=step.max_new_tokens or max_new or spec.max_new_tokens,
        temperature=step.temperature if step.temperature is not None else temperature,
    )
    try:
        gen = await spec.backend.complete(request)
    except ConvcoreError:
        raise
    except Exception as exc:
        raise BackendError(f"model backend for {spec.name!r} failed in a flow step: {exc}") from exc
    # A step's output is held to its budget like a reply, whatever the backend does.
    meter = ReplyMeter(get_tokenizer(spec.encoding), request.max_new_tokens)
    return metered_generation(gen, meter).content
