"""The datasource registry: DB-GPT's Datasource object over a RecordStore.

The object is flat and typed as DB-GPT's client expects it::

    {"id": 1, "db_type": "sqlite", "db_name": "shop", "db_path": "/data/shop.db",
     "db_host": "", "db_port": 0, "db_user": "", "db_pwd": "", "comment": ""}

``db_pwd`` is write-only: it is stored (the registry must connect with it)
but every answer carries ``""`` in its place, it is a ``SecretStr`` in
memory so reprs and logs show ``**********``, and an update that omits it
(or sends the masked ``""`` back) keeps the stored one. ``db_name`` is
unique (it is chat_data's chat_param) and ``id`` an integer given out by
the registry.

Records: ``datasource`` keyed by the zero-padded id, and the unique index
``datasource:by_db_name``. The password sits in the record as given: the
RecordStore is as private as the conversation store; encrypt at rest there
if the deployment needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from convcore.errors import InvalidRequestError
from convcore.records import RecordStore

from .base import DuplicateError, NotFoundError, UniqueNames, claim_int_id, id_key, iter_records

__all__ = ["DB_TYPES", "Datasource", "DatasourceIn", "DatasourceRegistry"]

KIND = "datasource"
# db_type -> the async SQLAlchemy driver chat_data connects with.
DB_TYPES = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
    "mariadb": "mariadb+aiomysql",
}


class DatasourceIn(BaseModel):
    """A datasource as a client sends it; every field optional so an update
    can say only what changes."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    id: int | None = None
    db_type: str | None = Field(default=None, max_length=32)
    db_name: str | None = Field(default=None, max_length=256)
    db_path: str | None = Field(default=None, max_length=4096)
    db_host: str | None = Field(default=None, max_length=256)
    db_port: int | None = Field(default=None, ge=0, le=65535)
    db_user: str | None = Field(default=None, max_length=256)
    db_pwd: SecretStr | None = None
    comment: str | None = Field(default=None, max_length=10_000)

    @field_validator("db_type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind = value.strip().lower()
        if kind not in DB_TYPES:
            raise ValueError(f"must be one of {', '.join(sorted(DB_TYPES))}")
        return "postgresql" if kind == "postgres" else kind

    @field_validator("db_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(ord(c) < 32 for c in value)):
            raise ValueError("must be non-blank and free of control characters")
        return value


class Datasource(BaseModel):
    """A stored datasource. :meth:`public` is what an API may show."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    id: int
    db_type: str
    db_name: str
    db_path: str = ""
    db_host: str = ""
    db_port: int = 0
    db_user: str = ""
    db_pwd: SecretStr = SecretStr("")
    comment: str = ""

    def public(self) -> dict[str, Any]:
        """The object with the password masked as ``""``."""
        data = self.model_dump(exclude={"db_pwd"})
        data["db_pwd"] = ""
        return data

    def record(self) -> dict[str, Any]:
        """The object to store, password included."""
        data = self.model_dump(exclude={"db_pwd"})
        data["db_pwd"] = self.db_pwd.get_secret_value()
        return data

    @property
    def password(self) -> str:
        return self.db_pwd.get_secret_value()


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_sqlite_path(path: str, roots: tuple[Path, ...] | None, denied: tuple[Path, ...] = ()) -> None:
    """InvalidRequestError unless ``path`` may be opened as a SQLite datasource:
    inside one of ``roots`` (any path when None; none when empty) and not one of
    ``denied`` (such as the server's own store), symlinks resolved."""
    resolved = _resolve(path)
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        reason = (
            "is outside the directories allowed for SQLite" if roots else "SQLite datasources are not enabled"
        )
        raise InvalidRequestError(reason, field="db_path")
    if resolved in denied:
        raise InvalidRequestError("is a file this server keeps its own data in", field="db_path")


def _validated(
    fields: dict[str, Any], sqlite_roots: tuple[Path, ...] | None, sqlite_denied: tuple[Path, ...] = ()
) -> Datasource:
    if not fields.get("db_type"):
        raise InvalidRequestError("is required", field="db_type")
    if not fields.get("db_name"):
        raise InvalidRequestError("is required", field="db_name")
    if fields["db_type"] == "sqlite":
        path = fields.get("db_path") or ""
        if not path:
            raise InvalidRequestError("is required for a sqlite datasource", field="db_path")
        check_sqlite_path(path, sqlite_roots, sqlite_denied)
    elif not fields.get("db_host"):
        raise InvalidRequestError(f"is required for a {fields['db_type']} datasource", field="db_host")
    return Datasource.model_validate(fields)


class DatasourceRegistry:
    """Datasources by id, with db_name unique.

    ``sqlite_roots``, when given, confines SQLite ``db_path``\\ s to those
    directories (an empty list refuses SQLite datasources). Without it a
    SQLite datasource may open any SQLite file the server process can read,
    its own store included (every conversation and every datasource's
    password): pass the roots, and the store's file in ``sqlite_denied``,
    wherever API keys are not all held by the server's owner. Both are
    checked again before each connection.
    """

    def __init__(
        self,
        records: RecordStore,
        *,
        sqlite_roots: list[str | Path] | None = None,
        sqlite_denied: list[str | Path] | None = None,
    ) -> None:
        self.records = records
        self.names = UniqueNames(records, KIND, "db_name")
        self.sqlite_roots = None if sqlite_roots is None else tuple(_resolve(p) for p in sqlite_roots)
        self.sqlite_denied = tuple(_resolve(p) for p in sqlite_denied or ())
        self._next_id = 0

    async def get(self, datasource_id: int) -> Datasource:
        found = await self.records.get(KIND, id_key(datasource_id))
        if found is None:
            raise NotFoundError("datasource", datasource_id)
        return Datasource.model_validate(found)

    async def by_name(self, db_name: str) -> Datasource | None:
        found = await self.names.lookup(db_name)
        return None if found is None else Datasource.model_validate(found)

    def check_reachable(self, ds: Datasource) -> None:
        """InvalidRequestError if ``ds`` may not be opened now (its SQLite path
        left the roots since it was saved, or the roots changed)."""
        if ds.db_type == "sqlite":
            check_sqlite_path(ds.db_path, self.sqlite_roots, self.sqlite_denied)

    async def list(self) -> list[Datasource]:
        return [Datasource.model_validate(r) async for r in iter_records(self.records, KIND)]

    async def create(self, data: DatasourceIn) -> Datasource:
        fields = data.model_dump(exclude_none=True, exclude={"id", "db_pwd"})
        fields["db_pwd"] = data.db_pwd.get_secret_value() if data.db_pwd is not None else ""
        draft = _validated({**fields, "id": 0}, self.sqlite_roots, self.sqlite_denied)
        if await self.names.lookup(draft.db_name) is not None:
            raise DuplicateError("datasource", "db_name", draft.db_name)
        value = draft.record()
        new_id = await claim_int_id(self.records, KIND, value, self._next_id)
        self._next_id = new_id + 1
        try:
            await self.names.claim(draft.db_name, id_key(new_id), "datasource")
        except InvalidRequestError:
            await self.records.delete(KIND, id_key(new_id))
            raise
        return Datasource.model_validate(value)

    async def update(self, data: DatasourceIn) -> Datasource:
        """Replace the fields ``data`` sets; ``db_pwd`` omitted or ``""`` keeps the stored one."""
        if data.id is None:
            raise InvalidRequestError("is required to update a datasource", field="id")
        current = await self.get(data.id)
        changes = data.model_dump(exclude_unset=True, exclude={"id", "db_pwd"})
        changes = {k: v for k, v in changes.items() if v is not None}
        fields = current.record() | changes
        if data.db_pwd is not None and data.db_pwd.get_secret_value():
            fields["db_pwd"] = data.db_pwd.get_secret_value()
        updated = _validated(fields, self.sqlite_roots, self.sqlite_denied)
        key = id_key(current.id)
        await self.records.put(KIND, key, updated.record())
        if updated.db_name != current.db_name:
            try:
                await self.names.claim(updated.db_name, key, "datasource")
            except InvalidRequestError:
                await self.records.put(KIND, key, current.record())
                raise
            await self.names.release(current.db_name, key)
        return updated

    async def delete(self, datasource_id: int) -> Datasource:
        found = await self.records.delete(KIND, id_key(datasource_id))
        if found is None:
            raise NotFoundError("datasource", datasource_id)
        gone = Datasource.model_validate(found)
        await self.names.release(gone.db_name, id_key(gone.id))
        return gone
