"""chat_app: apps (a system prompt and model defaults under an app_code).

An app is DB-GPT's App object reduced to what a conversation needs:
``prompt_template`` becomes the system prompt, ``model`` / ``temperature``
/ ``max_new_tokens`` / ``keep_first_rounds`` apply when a request does not
set them. ``chat_param`` is the app_code.

An app belongs to the ``user_name`` / ``sys_code`` that created it (see
:mod:`convcore.owners`); a bound caller reaches only its own.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from convcore.answer_schema import SENT_WHOLE
from convcore.errors import ConflictError, InvalidRequestError
from convcore.owners import OPERATOR, Caller
from convcore.records import RecordStore
from convcore.scenes import ScenePlan, SceneRequest
from convcore.schema import PRINTABLE_ID

from .base import (
    DuplicateError,
    WireModel,
    iter_records,
    now_text,
    owned,
    owner_filter,
    printable,
)

__all__ = ["App", "AppChange", "AppCreate", "AppIn", "AppRegistry", "AppScene", "AppUpdate"]

KIND = "app"


class AppChange(WireModel):
    """The fields of an app a client may set (an update by app_code in the path)."""

    model_config = ConfigDict(extra="ignore")

    app_name: str | None = Field(default=None, min_length=1, max_length=256)
    app_describe: str | None = Field(default=None, max_length=10_000)
    team_mode: str | None = Field(default=None, max_length=64)
    language: str | None = Field(default=None, max_length=32)
    prompt_template: str | None = Field(default=None, max_length=100_000)
    model: str | None = Field(default=None, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_new_tokens: int | None = Field(default=None, ge=1)
    keep_first_rounds: int | None = Field(default=None, ge=0)
    user_code: str | None = None
    user_name: str | None = Field(default=None, max_length=256)
    sys_code: str | None = Field(default=None, max_length=256)
    icon: str | None = None


class AppIn(AppChange):
    """An app as a client sends it (create or update)."""

    app_code: str | None = Field(
        default=None, min_length=1, max_length=256, json_schema_extra={"pattern": PRINTABLE_ID}
    )

    @field_validator("app_code")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        return printable(value)


class AppCreate(AppIn):
    """A new app: ``app_name`` is required (``app_code`` is made when absent)."""

    app_name: str = Field(min_length=1, max_length=256)


class AppUpdate(AppIn):
    """An update that names the app in the body."""

    app_code: str = Field(min_length=1, max_length=256, json_schema_extra={"pattern": PRINTABLE_ID})


class App(BaseModel):
    """A stored app, as the API answers it."""

    model_config = ConfigDict(frozen=True, **SENT_WHOLE)

    app_code: str
    app_name: str
    app_describe: str = ""
    team_mode: str = "single_chat"
    language: str = "en"
    prompt_template: str = ""
    model: str | None = None
    temperature: float | None = None
    max_new_tokens: int | None = None
    keep_first_rounds: int | None = None
    user_code: str | None = None
    user_name: str | None = None
    sys_code: str | None = None
    icon: str | None = None
    created_at: str = ""
    updated_at: str = ""
    details: list[dict[str, Any]] = Field(default_factory=list)

    def system_prompt(self) -> str:
        if self.prompt_template.strip():
            return self.prompt_template
        about = f" {self.app_describe.strip()}" if self.app_describe.strip() else ""
        return f"You are {self.app_name}.{about} Answer in the user's language (default: {self.language})."


class AppRegistry:
    """Apps by app_code in a RecordStore; every call acts for a ``caller``."""

    def __init__(self, records: RecordStore) -> None:
        self.records = records

    async def get(self, app_code: str, *, caller: Caller = OPERATOR) -> App:
        return App.model_validate(owned(await self.records.get(KIND, app_code), caller, "app", app_code))

    async def find(self, app_code: str, *, caller: Caller = OPERATOR) -> App | None:
        found = await self.records.get(KIND, app_code)
        return None if found is None or not caller.reaches(found) else App.model_validate(found)

    async def list(self, *, limit: int = 100, offset: int = 0, caller: Caller = OPERATOR) -> list[App]:
        page = await self.records.list(KIND, limit=limit, offset=offset, **owner_filter(caller))
        return [App.model_validate(r) for r in page]

    async def count(self, *, caller: Caller = OPERATOR) -> int:
        return len([r async for r in iter_records(self.records, KIND, caller)])

    async def create(self, data: AppIn, *, caller: Caller = OPERATOR) -> App:
        if not data.app_name:
            raise InvalidRequestError("is required", field="app_name")
        stamp = now_text()
        fields = caller.stamp(data.model_dump(exclude_none=True))
        fields.setdefault("app_code", uuid.uuid4().hex)
        app = App(**fields, created_at=stamp, updated_at=stamp)
        try:
            await self.records.put(KIND, app.app_code, app.model_dump(), create_only=True)
        except ConflictError:
            raise DuplicateError("app", "app_code", app.app_code) from None
        return app

    async def update(self, app_code: str, data: AppChange, *, caller: Caller = OPERATOR) -> App:
        """Change the fields ``data`` sets; the others stay (a null clears a
        field that may be empty, and leaves the others). Only an unbound
        caller may hand an app to another owner."""
        sent_code = getattr(data, "app_code", None)
        if sent_code is not None and sent_code != app_code:
            raise InvalidRequestError("cannot be changed", field="app_code")
        current = await self.get(app_code, caller=caller)
        changes = {
            k: v
            for k, v in data.model_dump(exclude_unset=True, exclude={"app_code"}).items()
            if v is not None or App.model_fields[k].default is None
        }
        if caller.bound:
            changes.pop("user_name", None)
            changes.pop("sys_code", None)
        app = current.model_copy(update={**changes, "updated_at": now_text()})
        app = App.model_validate(app.model_dump())
        await self.records.put(KIND, app_code, app.model_dump())
        return app

    async def delete(self, app_code: str, *, caller: Caller = OPERATOR) -> App:
        await self.get(app_code, caller=caller)
        found = await self.records.delete(KIND, app_code)
        return App.model_validate(owned(found, OPERATOR, "app", app_code))


class AppScene:
    """``chat_app``: the app's prompt and defaults; chat_param is the app_code."""

    name = "chat_app"
    needs_param = True

    def __init__(self, apps: AppRegistry) -> None:
        self.apps = apps

    async def prepare(self, request: SceneRequest) -> ScenePlan:
        code = (request.param or "").strip()
        app = await self.apps.find(code, caller=request.caller)
        if app is None:
            raise InvalidRequestError(f"no app with app_code {code!r}", field="chat_param")
        return ScenePlan(
            system_prompt=app.system_prompt(),
            model=app.model,
            temperature=app.temperature,
            max_new_tokens=app.max_new_tokens,
            keep_first_rounds=app.keep_first_rounds,
        )

    async def finish(self, request: SceneRequest, plan: ScenePlan, reply: str, used_context: int) -> str:
        return reply
