"""Chat modes as pluggable scenes.

A request's ``chat_mode`` picks a scene; the scene sees the request (its
``chat_param`` included) before the window is built and says what the turn
needs: a system prompt, context blocks (schema, retrieved chunks, ...),
model defaults, or a reply it computed itself. After generation it may add
to the reply (a query's result table, the sources used).

Context blocks compete for the same token budget as history: the engine
keeps whole blocks, in the scene's priority order, up to
``ScenePlan.max_context_share`` of the room left after the system prompt and
the input, so ``prompt_tokens + max_new_tokens <= context_window`` still holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .errors import InvalidRequestError, UnsupportedChatModeError
from .models import Conversation
from .owners import Caller
from .registry import ModelRegistry
from .schema import DEFAULT_CHAT_MODE, ChatRequest, has_text

__all__ = ["NormalScene", "Scene", "ScenePlan", "SceneRegistry", "SceneRequest"]


@dataclass(frozen=True)
class SceneRequest:
    """What a scene is shown: the request, the conversation so far (None if
    new), and the models it may call itself. ``owned_only``: the request's
    user_name is bound (see :mod:`convcore.owners`), so the scene may use
    only what that user owns."""

    request: ChatRequest
    conversation: Conversation | None
    models: ModelRegistry
    owned_only: bool = False

    @property
    def caller(self) -> Caller:
        """Who the turn acts for: what the scene may reach."""
        return Caller(self.request.user_name, self.request.sys_code, bound=self.owned_only)

    @property
    def param(self) -> str | None:
        return self.request.chat_param

    @property
    def question(self) -> str:
        """The newest user input."""
        users = [m.content for m in self.request.input_messages if m.role == "user"]
        return users[-1] if users else self.request.input_messages[-1].content


@dataclass(frozen=True)
class ScenePlan:
    """What a turn needs from its scene; every field is optional.

    ``system_prompt`` goes first in the prompt (before the conversation's
    own system messages) and must fit. ``context`` blocks follow as system
    messages, the longest prefix of whole blocks that fits. ``model``/``temperature``/
    ``max_new_tokens``/``keep_first_rounds`` apply when the request does not
    set them. ``reply`` skips the model: the scene has answered. ``state``
    is handed back to :meth:`Scene.finish`. ``whole_addition``: what
    :meth:`Scene.finish` adds is markup a client cannot use cut (a chart),
    so when it does not fit the reply's budget only the note saying so is
    kept, not its start.
    """

    system_prompt: str | None = None
    context: tuple[str, ...] = ()
    max_context_share: float = 0.5
    model: str | None = None
    temperature: float | None = None
    max_new_tokens: int | None = None
    keep_first_rounds: int | None = None
    reply: str | None = None
    state: object = None
    whole_addition: bool = False


@runtime_checkable
class Scene(Protocol):
    """One chat mode. ``needs_param``: requests without chat_param are refused.

    A scene may set ``passes_params = True`` to let a request's OpenAI
    parameters (``top_p``, ``response_format``...) reach the model; without
    it a request carrying any is refused, naming the parameter, since the
    scene's own prompts and parsing decide what the model is asked.
    """

    @property
    def name(self) -> str: ...

    @property
    def needs_param(self) -> bool: ...

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        """Plan the turn. Raise InvalidRequestError (field ``chat_param``) when
        the parameter names nothing usable; nothing is stored then."""
        ...

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        """The reply to store and return. ``used_context`` is how many of
        ``plan.context`` made it into the prompt. In a stream, whatever this
        adds after ``reply`` is sent as one more chunk."""
        ...


class NormalScene:
    """``chat_normal``: the model and the history, nothing else."""

    name = DEFAULT_CHAT_MODE
    needs_param = False
    passes_params = True

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        return ScenePlan()

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        return reply


@dataclass
class SceneRegistry:
    """Scenes by chat_mode; ``chat_normal`` is always there."""

    scenes: dict[str, Scene] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scenes.setdefault(DEFAULT_CHAT_MODE, NormalScene())

    @classmethod
    def of(cls, scenes: Iterable[Scene]) -> SceneRegistry:
        return cls({s.name: s for s in scenes})

    def register(self, scene: Scene) -> None:
        self.scenes[scene.name] = scene

    def get(self, request: ChatRequest) -> Scene:
        """The request's scene; a typed error for an unknown mode or a
        missing chat_param."""
        scene = self.scenes.get(request.mode)
        if scene is None:
            raise UnsupportedChatModeError(request.mode, list(self.scenes))
        if scene.needs_param and not has_text(request.chat_param):
            raise InvalidRequestError(f"chat_mode {request.mode!r} needs chat_param", field="chat_param")
        return scene

    def __contains__(self, mode: object) -> bool:
        return mode in self.scenes

    def names(self) -> list[str]:
        return list(self.scenes)
