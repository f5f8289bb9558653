"""A small document store for the registries scenes need (apps, datasources,
knowledge spaces and documents, flows), behind one protocol so each storage
adapter can hold them next to the conversations.

Records are JSON objects grouped by ``kind`` and keyed by a string id. A
record's owner is its value's ``user_name`` / ``sys_code`` (strings; any
other value, or none, leaves that part unowned): stores keep it beside the
value so a filtered listing reads an index, not every record.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Protocol, runtime_checkable

from .errors import ConflictError, InvalidRequestError
from .schema import MAX_NAME_LENGTH

__all__ = ["MemoryRecordStore", "RecordStore", "record_owner"]

Record = dict[str, Any]


def record_owner(value: Record) -> tuple[str | None, str | None]:
    """``(user_name, sys_code)`` of a record about to be stored; a string
    longer than conversations allow is refused, naming the field."""
    owner: list[str | None] = []
    for field in ("user_name", "sys_code"):
        part = value.get(field)
        if not isinstance(part, str):
            owner.append(None)
            continue
        if len(part) > MAX_NAME_LENGTH:
            raise InvalidRequestError(f"longer than {MAX_NAME_LENGTH} characters", field=field)
        owner.append(part)
    return owner[0], owner[1]


@runtime_checkable
class RecordStore(Protocol):
    """Documents by (kind, key). Safe for concurrent use."""

    async def put(self, kind: str, key: str, value: Record, *, create_only: bool = False) -> None:
        """Store ``value`` under (kind, key), replacing what was there. With
        ``create_only`` an existing key raises ConflictError and nothing changes."""
        ...

    async def get(self, kind: str, key: str) -> Record | None:
        """The record, or None."""
        ...

    async def list(
        self,
        kind: str,
        *,
        limit: int = 100,
        offset: int = 0,
        user_name: str | None = None,
        sys_code: str | None = None,
    ) -> list[Record]:
        """Records of ``kind`` ordered by key, paged. ``user_name`` / ``sys_code``,
        when given, keep only records whose value carries exactly that owner
        (compared byte for byte); a record without an owner never matches one,
        so only an unfiltered (operator) listing shows ownerless records."""
        ...

    async def delete(self, kind: str, key: str) -> Record | None:
        """Remove and return the record; None (a no-op) if missing."""
        ...

    async def aclose(self) -> None:
        """Release what the store opened itself."""
        ...


class MemoryRecordStore:
    """Records in this process's memory."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Record]] = {}
        self._lock = threading.Lock()

    async def put(self, kind: str, key: str, value: Record, *, create_only: bool = False) -> None:
        record_owner(value)
        with self._lock:
            bucket = self._data.setdefault(kind, {})
            if create_only and key in bucket:
                raise ConflictError(f"{kind} {key!r} already exists")
            bucket[key] = copy.deepcopy(value)

    async def get(self, kind: str, key: str) -> Record | None:
        with self._lock:
            found = self._data.get(kind, {}).get(key)
            return copy.deepcopy(found) if found is not None else None

    async def list(
        self,
        kind: str,
        *,
        limit: int = 100,
        offset: int = 0,
        user_name: str | None = None,
        sys_code: str | None = None,
    ) -> list[Record]:
        with self._lock:
            bucket = self._data.get(kind, {})
            keys = [
                k
                for k in sorted(bucket)
                if (user_name is None or record_owner(bucket[k])[0] == user_name)
                and (sys_code is None or record_owner(bucket[k])[1] == sys_code)
            ]
            return [copy.deepcopy(bucket[k]) for k in keys[max(offset, 0) : max(offset, 0) + max(limit, 0)]]

    async def delete(self, kind: str, key: str) -> Record | None:
        with self._lock:
            return self._data.get(kind, {}).pop(key, None)

    async def aclose(self) -> None:
        return None
