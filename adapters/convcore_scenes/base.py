"""What every registry here shares: errors, timestamps, integer ids and
unique names over a :class:`~convcore.RecordStore`.

A RecordStore offers no counters and no secondary indexes, so both are
built from ``create_only`` puts:

- an integer id is claimed by creating the record under its zero-padded key
  (lists come back in id order); a taken id just means "try the next one";
- a unique name is claimed by creating an index record ``name -> key``. The
  index is checked against the record it points to, so a claim left behind
  by a crashed writer (or pointing at a record renamed since) is taken over
  instead of blocking the name forever.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any, get_args

from pydantic import BaseModel, ValidationInfo, field_validator

from convcore.errors import ConflictError, ConvcoreError, InvalidRequestError
from convcore.owners import OPERATOR, Caller
from convcore.records import RecordStore
from convcore.schema import NOT_PRINTABLE_ID, is_printable_id

__all__ = [
    "DuplicateError",
    "NotFoundError",
    "UniqueNames",
    "claim_int_id",
    "id_key",
    "iter_records",
    "now_text",
    "owned",
    "owner_filter",
    "printable",
]

Record = dict[str, Any]
_PAGE = 500

# A name or code is held to the core's rule for ids (PRINTABLE_ID): the JSON
# Schema of such fields carries the pattern; :func:`printable` applies it.
# Text that must not be blank follows the core's NOT_BLANK (:func:`convcore.schema.has_text`).


def _numeric(annotation: Any) -> bool:
    """Whether a field of ``annotation`` takes a number (and not a boolean)."""
    kinds = {a for a in (get_args(annotation) or (annotation,)) if isinstance(a, type)}
    return bool(kinds & {int, float}) and bool not in kinds


class WireModel(BaseModel):
    """A request body: JSON's true and false are not numbers, whatever Python says."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_boolean(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _numeric(field.annotation):
            raise ValueError("must be a number, not true or false")
        return value


def printable(value: str | None) -> str | None:
    """``value`` if it is None or matches :data:`PRINTABLE_ID`; else ValueError."""
    if value is not None and not is_printable_id(value):
        raise ValueError(NOT_PRINTABLE_ID)
    return value


class NotFoundError(ConvcoreError):
    """No record of that kind under that id or name (HTTP 404)."""

    def __init__(self, what: str, ref: object) -> None:
        self.what = what
        self.ref = ref
        super().__init__(f"{what} {ref!r} does not exist")


class DuplicateError(InvalidRequestError):
    """A unique field (a name, a code) is already taken (HTTP 409)."""

    def __init__(self, what: str, field: str, value: str) -> None:
        super().__init__(f"a {what} with {field} {value!r} already exists", field=field)


def now_text() -> str:
    """Local-free timestamp as DB-GPT shows them: ``2024-03-19 12:00:00``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def id_key(record_id: int) -> str:
    """Zero-padded, so key order is id order."""
    return f"{record_id:012d}"


def owned(found: Record | None, caller: Caller, what: str, ref: object) -> Record:
    """``found`` if it exists and ``caller`` may reach it; else NotFoundError,
    the same answer either way, so ids of other users' records tell nothing."""
    if found is None or not caller.reaches(found):
        raise NotFoundError(what, ref)
    return found


def owner_filter(caller: Caller) -> dict[str, str]:
    """``RecordStore.list``'s owner arguments for ``caller`` (none when it names no owner)."""
    return {
        k: v for k, v in (("user_name", caller.user_name), ("sys_code", caller.sys_code)) if v is not None
    }


async def iter_records(records: RecordStore, kind: str, caller: Caller = OPERATOR) -> AsyncIterator[Record]:
    """Every record of ``kind`` that carries ``caller``'s owner (all of them
    for an unbound caller naming none), page by page."""
    offset = 0
    while True:
        page = await records.list(kind, limit=_PAGE, offset=offset, **owner_filter(caller))
        for r in page:
            yield r
        if len(page) < _PAGE:
            return
        offset += len(page)


async def claim_int_id(records: RecordStore, kind: str, value: Record, hint: int = 0) -> int:
    """Store ``value`` under the lowest free id above every existing one
    (starting the search at ``hint``); ``value["id"]`` is set to it."""
    if hint <= 0:
        hint = 1
        async for r in iter_records(records, kind):
            if isinstance(r.get("id"), int):
                hint = max(hint, r["id"] + 1)
    candidate = hint
    while True:
        value["id"] = candidate
        try:
            await records.put(kind, id_key(candidate), value, create_only=True)
            return candidate
        except ConflictError:
            candidate += 1


class UniqueNames:
    """A unique index ``name -> key`` of records of ``kind``, in ``<kind>:by_<field>``.

    A claim is live while the record it points to carries that name (else it
    is stale). ``name_of(record)`` is the name a record carries, when names
    are compared in a normal form rather than as stored (None: it has none);
    by default its ``field``.
    """

    def __init__(
        self,
        records: RecordStore,
        kind: str,
        field: str,
        name_of: Callable[[Record], str | None] | None = None,
    ) -> None:
        self.records = records
        self.kind = kind
        self.field = field
        self.index_kind = f"{kind}:by_{field}"
        self.name_of = name_of or (lambda record: record.get(field))

    async def lookup(self, name: str) -> Record | None:
        """The record named ``name``, or None."""
        claim = await self.records.get(self.index_kind, name)
        if claim is None:
            return None
        found = await self.records.get(self.kind, str(claim.get("key")))
        if found is None or self.name_of(found) != name:
            return None
        return found

    async def claim(self, name: str, key: str, what: str, shown: str | None = None) -> None:
        """Point ``name`` at ``key``; DuplicateError (naming ``shown``, by
        default ``name``) if another live record has it."""
        for _ in range(5):
            try:
                await self.records.put(self.index_kind, name, {"key": key}, create_only=True)
                return
            except ConflictError:
                claim = await self.records.get(self.index_kind, name)
                if claim is not None and claim.get("key") == key:
                    return
                if await self.lookup(name) is not None:
                    raise DuplicateError(what, self.field, shown or name) from None
                # Stale: the record it named is gone or renamed. Take it over.
                await self.records.delete(self.index_kind, name)
        raise DuplicateError(what, self.field, shown or name)

    async def release(self, name: str, key: str, heir: str | None = None) -> None:
        """Drop the claim if it still points at ``key``; with ``heir``, point
        it at that record instead (one that carries the name too)."""
        claim = await self.records.get(self.index_kind, name)
        if claim is None or claim.get("key") != key:
            return
        if heir is None:
            await self.records.delete(self.index_kind, name)
        else:
            await self.records.put(self.index_kind, name, {"key": heir})
