"""The datasource registry: DB-GPT's Datasource object over a RecordStore.

The object is flat and typed as DB-GPT's client expects it, plus its owner::

    {"id": 1, "db_type": "sqlite", "db_name": "shop", "db_path": "/data/shop.db",
     "db_host": "", "db_port": 0, "db_user": "", "db_pwd": "", "comment": "",
     "user_name": "ada", "sys_code": null}

``db_pwd`` is write-only: every answer carries ``""`` in its place, it is a
``SecretStr`` in memory so reprs and logs show ``**********``, and it is
stored only sealed with the operator's keys (:mod:`convcore_scenes.secret_box`);
without keys a datasource with a password is refused. An update that omits
it (or sends the masked ``""`` back) keeps the stored one, unless it changes
where the datasource connects (type, host, port, database, user, path): then
the password must be sent again, so nobody can send a stored password to a
server of their choosing. ``db_name`` is unique (it is chat_data's
chat_param) and ``id`` an integer given out by the registry. A SQLite file
is the file of one datasource only, compared with symlinks and ``..``
resolved: otherwise anyone could read another user's file by registering
it again under a new name.

A datasource belongs to its creator's ``user_name`` / ``sys_code`` (see
:mod:`convcore.owners`). It may never be the service's own store
(:mod:`convcore_scenes.targets`), checked on save and before each connection.

Records: ``datasource`` keyed by the zero-padded id (the password under
``db_pwd_sealed``), and the unique indexes ``datasource:by_db_name`` and
``datasource:by_db_path`` (keyed by the resolved file).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from convcore.answer_schema import SENT_WHOLE
from convcore.errors import InvalidRequestError, StorageError
from convcore.owners import OPERATOR, Caller
from convcore.records import RecordStore

from .base import (
    DuplicateError,
    UniqueNames,
    WireModel,
    claim_int_id,
    id_key,
    iter_records,
    owned,
    printable,
)
from .secret_box import KEY_FILE_ENV, KEYS_ENV, SecretBox
from .targets import (
    DEFAULT_PORTS,
    UnresolvedHostError,
    check_host_syntax,
    server_target,
    store_server,
    store_sqlite_file,
)

__all__ = ["DB_TYPES", "Datasource", "DatasourceIn", "DatasourceRegistry", "DatasourceView"]

KIND = "datasource"
SEALED = "db_pwd_sealed"
# Where a datasource connects: changing any of these needs the password again.
CONNECT_FIELDS = ("db_type", "db_host", "db_port", "db_name", "db_user", "db_path")

log = logging.getLogger("convcore_scenes")
# db_type -> the async SQLAlchemy driver chat_data connects with.
DB_TYPES = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
    "mariadb": "mariadb+aiomysql",
}


class DatasourceIn(WireModel):
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
    user_name: str | None = Field(default=None, max_length=256)
    sys_code: str | None = Field(default=None, max_length=256)

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
        return printable(value)


class _DatasourceFields(BaseModel):
    """A datasource's fields as stored and as shown, but its password."""

    id: int
    db_type: str
    db_name: str
    db_path: str = ""
    db_host: str = ""
    db_port: int = 0
    db_user: str = ""
    comment: str = ""
    user_name: str | None = None
    sys_code: str | None = None


class DatasourceView(_DatasourceFields):
    """A datasource as the API answers it: the password never shown."""

    model_config = ConfigDict(**SENT_WHOLE)

    db_pwd: str = Field(default="", max_length=0, description="Always empty: passwords are write-only")


class Datasource(_DatasourceFields):
    """A stored datasource. :meth:`public` is what an API may show."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    db_pwd: SecretStr = SecretStr("")

    def public(self) -> dict[str, Any]:
        """The object with the password masked as ``""`` (a :class:`DatasourceView`)."""
        return DatasourceView.model_validate(
            {**self.model_dump(exclude={"db_pwd"}), "db_pwd": ""}
        ).model_dump()

    @property
    def password(self) -> str:
        return self.db_pwd.get_secret_value()


def _resolve(path: str | Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError on Python 3.11)
        raise InvalidRequestError(f"cannot be resolved to a file: {exc}", field="db_path") from None


def _file_of(record: dict[str, Any]) -> str | None:
    """The file a stored SQLite datasource opens, as file claims name it
    (resolved); None for a server datasource, or a path that resolves to no
    file (it is refused before every connection, so it holds no file)."""
    if record.get("db_type") != "sqlite" or not record.get("db_path"):
        return None
    try:
        return str(_resolve(str(record["db_path"])))
    except InvalidRequestError:
        return None


def check_sqlite_path(path: str, roots: tuple[Path, ...] | None, denied: tuple[Path, ...] = ()) -> None:
    """InvalidRequestError unless ``path`` may be opened as a SQLite datasource:
    inside one of ``roots`` (any path when None; none when empty) and not one of
    ``denied`` (such as the server's own store), symlinks resolved."""
    if "\x00" in path:
        raise InvalidRequestError("must not contain a NUL character", field="db_path")
    resolved = _resolve(path)
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        reason = (
            "is outside the directories allowed for SQLite" if roots else "SQLite datasources are not enabled"
        )
        raise InvalidRequestError(reason, field="db_path")
    if resolved in denied or any(_same_file(resolved, d) for d in denied):
        raise InvalidRequestError("is a file this server keeps its own data in", field="db_path")


def _same_file(a: Path, b: Path) -> bool:
    """Hard links too: the same inode under another name."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _validated(
    fields: dict[str, Any], sqlite_roots: tuple[Path, ...] | None, sqlite_denied: tuple[Path, ...] = ()
) -> Datasource:
    if not fields.get("db_type"):
        raise InvalidRequestError("is required", field="db_type")
    if not fields.get("db_name"):
        raise InvalidRequestError("is required", field="db_name")
    path, host = fields.get("db_path") or "", fields.get("db_host") or ""
    if fields["db_type"] == "sqlite" and not path:
        raise InvalidRequestError("is required for a sqlite datasource", field="db_path")
    if fields["db_type"] != "sqlite" and not host:
        raise InvalidRequestError(f"is required for a {fields['db_type']} datasource", field="db_host")
    # Checked whichever the type: a field that is sent is a field that is valid.
    if path:
        check_sqlite_path(path, sqlite_roots, sqlite_denied)
    if host:
        check_host_syntax(host)
    return Datasource.model_validate({**fields, "db_pwd": ""})


class DatasourceRegistry:
    """Datasources by id, with db_name unique and each SQLite file the file
    of one datasource only; every call acts for a ``caller``.

    ``secrets`` seals passwords (without it a datasource with a password is
    refused). ``store_url`` is the service's own store: a datasource on the
    same SQLite file or the same server database is refused.
    ``sqlite_roots``, when given, confines SQLite ``db_path``\\ s to those
    directories (an empty list refuses SQLite datasources). Without it a
    SQLite datasource may open any SQLite file the server process can read:
    pass the roots wherever API keys are not all held by the server's owner.
    ``sqlite_denied`` refuses more files. All of it is checked again before
    each connection.
    """

    def __init__(
        self,
        records: RecordStore,
        *,
        sqlite_roots: list[str | Path] | None = None,
        sqlite_denied: list[str | Path] | None = None,
        secrets: SecretBox | None = None,
        store_url: str | None = None,
    ) -> None:
        self.records = records
        self.names = UniqueNames(records, KIND, "db_name")
        self.files = UniqueNames(records, KIND, "db_path", _file_of)
        self.sqlite_roots = None if sqlite_roots is None else tuple(_resolve(p) for p in sqlite_roots)
        own_file = store_sqlite_file(store_url)
        denied = [*(sqlite_denied or ()), *([own_file] if own_file else [])]
        self.sqlite_denied = tuple(_resolve(p) for p in denied)
        self.secrets = secrets
        self.store_url = store_url
        self._next_id = 0

    # -- records <-> objects ---------------------------------------------------

    def _load(self, record: dict[str, Any], *, with_password: bool = False) -> Datasource:
        """The object; its password opened only when it is about to be used."""
        password = ""
        if with_password:
            if record.get(SEALED):
                if self.secrets is None:
                    raise StorageError(
                        f"datasource {record.get('db_name')!r} has an encrypted password but this server has "
                        f"no secret key: set {KEYS_ENV} or {KEY_FILE_ENV}"
                    )
                password = self.secrets.open(str(record[SEALED]))
            else:
                password = str(record.get("db_pwd") or "")  # written before passwords were sealed
        fields = {k: v for k, v in record.items() if k != SEALED}
        return Datasource.model_validate({**fields, "db_pwd": password})

    def _sealed(self, password: str) -> dict[str, Any]:
        """The record fields that keep ``password``."""
        if not password:
            return {"db_pwd": "", SEALED: None}
        if self.secrets is None:
            raise InvalidRequestError(
                f"cannot be stored: this server has no secret key to encrypt passwords with "
                f"(the operator sets {KEYS_ENV} or {KEY_FILE_ENV})",
                field="db_pwd",
            )
        return {"db_pwd": "", SEALED: self.secrets.seal(password)}

    # -- reading ----------------------------------------------------------------

    async def get(self, datasource_id: int, *, caller: Caller = OPERATOR) -> Datasource:
        return self._load(await self._raw(datasource_id, caller))

    async def _raw(self, datasource_id: int, caller: Caller) -> dict[str, Any]:
        return owned(await self.records.get(KIND, id_key(datasource_id)), caller, "datasource", datasource_id)

    async def by_name(self, db_name: str, *, caller: Caller = OPERATOR) -> Datasource | None:
        """The datasource named ``db_name``, password included (to connect with)."""
        found = await self.names.lookup(db_name)
        if found is None or not caller.reaches(found):
            return None
        return self._load(found, with_password=True)

    async def list(self, *, caller: Caller = OPERATOR) -> list[Datasource]:
        return [self._load(r) async for r in iter_records(self.records, KIND, caller)]

    async def connectable(self, ds: Datasource) -> Datasource:
        """``ds`` as it may be connected to now: InvalidRequestError if its
        SQLite path left the roots, or it is (or became) the store's own
        database; a server datasource comes back with ``db_host`` set to the
        address that was checked."""
        if ds.db_type == "sqlite":
            check_sqlite_path(ds.db_path, self.sqlite_roots, self.sqlite_denied)
            return ds
        port = ds.db_port or DEFAULT_PORTS[ds.db_type]
        target, address = await server_target(ds.db_host, port, ds.db_name)
        own = await store_server(self.store_url)
        if own is not None and own.same_database(target):
            raise InvalidRequestError(
                "is the database this server keeps its own data in; chat_data may not query it",
                field="db_host",
            )
        return ds.model_copy(update={"db_host": address})

    async def _may_connect(self, ds: Datasource) -> None:
        """:meth:`connectable`'s check as a datasource is saved: a host that
        resolves to nothing now cannot be the store, and is checked again
        (with everything else) before each connection."""
        try:
            await self.connectable(ds)
        except UnresolvedHostError:
            pass

    # -- writing ----------------------------------------------------------------

    async def create(self, data: DatasourceIn, *, caller: Caller = OPERATOR) -> Datasource:
        fields = caller.stamp(data.model_dump(exclude_none=True, exclude={"id", "db_pwd"}))
        draft = _validated({**fields, "id": 0}, self.sqlite_roots, self.sqlite_denied)
        await self._may_connect(draft)
        if await self.names.lookup(draft.db_name) is not None:
            raise DuplicateError("datasource", "db_name", draft.db_name)
        password = data.db_pwd.get_secret_value() if data.db_pwd is not None else ""
        value = {**draft.model_dump(exclude={"db_pwd"}), **self._sealed(password)}
        file = _file_of(value)
        if file is not None and await self.files.lookup(file) is not None:
            raise DuplicateError("datasource", "db_path", draft.db_path)
        new_id = await claim_int_id(self.records, KIND, value, self._next_id)
        self._next_id = new_id + 1
        key = id_key(new_id)
        try:
            # The file first: chat_data finds it by name only once the file is its own.
            if file is not None:
                await self.files.claim(file, key, "datasource", draft.db_path)
            await self.names.claim(draft.db_name, key, "datasource")
        except InvalidRequestError:
            await self.records.delete(KIND, key)
            if file is not None:
                await self.files.release(file, key)
            raise
        return self._load(value)

    async def update(self, data: DatasourceIn, *, caller: Caller = OPERATOR) -> Datasource:
        """Replace the fields ``data`` sets; ``db_pwd`` omitted or ``""`` keeps
        the stored one, unless the update changes where the datasource
        connects. Only an unbound caller may hand it to another owner."""
        if data.id is None:
            raise InvalidRequestError("is required to update a datasource", field="id")
        current = await self._raw(data.id, caller)
        skip = {"id", "db_pwd"} | ({"user_name", "sys_code"} if caller.bound else set())
        # null (and "" for where it connects, as DB-GPT's forms send) keeps the stored value.
        changes = {
            k: v
            for k, v in data.model_dump(exclude_unset=True, exclude=skip).items()
            if v is not None and not (v == "" and k in ("db_host", "db_path"))
        }
        fields = {**current, **changes}
        password = data.db_pwd.get_secret_value() if data.db_pwd is not None else ""
        moved = [f for f in CONNECT_FIELDS if fields.get(f) != current.get(f)]
        kept_password = bool(current.get(SEALED) or current.get("db_pwd"))
        if moved and kept_password and not password:
            raise InvalidRequestError(
                f"must be sent again to change where the datasource connects ({', '.join(moved)})",
                field="db_pwd",
            )
        updated = _validated(fields, self.sqlite_roots, self.sqlite_denied)
        await self._may_connect(updated)
        value = {
            **updated.model_dump(exclude={"db_pwd"}),
            SEALED: current.get(SEALED),
            "db_pwd": current.get("db_pwd", ""),
        }
        if password:
            value.update(self._sealed(password))
        key = id_key(updated.id)
        old_file, file = _file_of(current), _file_of(value)
        new_file = file if file != old_file else None
        if new_file is not None and await self.files.lookup(new_file) is not None:
            raise DuplicateError("datasource", "db_path", updated.db_path)
        renamed = updated.db_name != current.get("db_name")
        if old_file is not None and old_file != file:
            await self._pass_on(current)
        await self.records.put(KIND, key, value)
        try:
            if new_file is not None:
                await self.files.claim(new_file, key, "datasource", updated.db_path)
            if renamed:
                await self.names.claim(updated.db_name, key, "datasource")
        except InvalidRequestError:
            await self.records.put(KIND, key, current)
            if new_file is not None:
                await self.files.release(new_file, key)
            raise
        if renamed:
            await self.names.release(str(current.get("db_name")), key)
        if old_file is not None and old_file != file:
            await self.files.release(old_file, key)
        return self._load(value)

    async def delete(self, datasource_id: int, *, caller: Caller = OPERATOR) -> Datasource:
        await self._pass_on(await self._raw(datasource_id, caller))
        key = id_key(datasource_id)
        found = owned(await self.records.delete(KIND, key), OPERATOR, "datasource", datasource_id)
        await self.names.release(str(found.get("db_name")), key)
        file = _file_of(found)
        if file is not None:
            await self.files.release(file, key)
        return self._load(found)

    async def _pass_on(self, record: dict[str, Any]) -> None:
        """Before ``record`` stops using its SQLite file: if it holds the
        file's claim and a datasource stored before files were claimed opens
        the same file, that one takes the claim, so the file never comes free
        while a datasource still opens it."""
        file = _file_of(record)
        holder = await self.files.lookup(file) if file is not None else None
        if file is None or holder is None or holder.get("id") != record.get("id"):
            return
        async for other in iter_records(self.records, KIND):
            if other.get("id") != record.get("id") and _file_of(other) == file:
                await self.files.release(file, id_key(int(record["id"])), heir=id_key(int(other["id"])))
                return

    async def claim_files(self) -> int:
        """Claim each SQLite datasource's file for it, as a start-up step
        (datasources stored before files were claimed hold none); running it
        again changes nothing. Older datasources that share a file keep
        working, one of them holding the claim so no other may take the file,
        and a warning names them; the number of such datasources."""
        shared: list[str] = []
        async for record in iter_records(self.records, KIND):
            file = _file_of(record)
            if file is None:
                continue
            try:
                await self.files.claim(file, id_key(int(record["id"])), "datasource")
            except DuplicateError:
                shared.append(str(record.get("db_name")))
        if shared:
            log.warning(
                "SQLite datasource(s) %s open a file another datasource opens too (both were stored "
                "before a file could belong to one datasource only); they keep working, and no new "
                "datasource may take that file",
                ", ".join(shared),
            )
        return len(shared)

    async def reseal(self) -> tuple[int, int]:
        """Seal every stored password under the first secret key (passwords
        written before sealing, and ones sealed under an older key); the
        numbers (resealed, left in plain text because there is no key)."""
        resealed = plain = 0
        async for record in iter_records(self.records, KIND):
            key = id_key(int(record["id"]))
            if record.get(SEALED) and self.secrets is not None:
                record[SEALED] = self.secrets.rotate(str(record[SEALED]))
            elif record.get("db_pwd"):
                if self.secrets is None:
                    plain += 1
                    continue
                record.update(self._sealed(str(record["db_pwd"])))
            else:
                continue
            await self.records.put(KIND, key, record)
            resealed += 1
        if plain:
            log.warning(
                "%d datasource password(s) are stored in plain text; set %s or %s to encrypt them",
                plain,
                KEYS_ENV,
                KEY_FILE_ENV,
            )
        return resealed, plain
