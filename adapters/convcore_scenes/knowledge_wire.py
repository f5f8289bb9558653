"""Knowledge documents in DB-GPT's wire shape, and its document sync request.

DB-GPT's client validates every document it receives as its
``DocumentModel``: ``space_id``, ``doc_source`` and ``content`` are strings
(never null, never an int), so the stored :class:`~.knowledge.Document` is
translated here on the way out (:class:`DocumentView`). A listing leaves
each text out (``""``); reading one document gives it whole.

``POST /knowledge/documents/sync`` takes DB-GPT's list of ``SyncModel``
(``doc_id``, ``space_id``, ``model_name``, ``chunk_parameters``) and splits
each document again with the ``chunk_size`` / ``chunk_overlap`` it names,
so the space's index follows; it answers the ids it synced.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, field_validator

from convcore.answer_schema import SENT_WHOLE
from convcore.errors import ConflictError, InvalidRequestError
from convcore.owners import OPERATOR, Caller

from .base import WireModel
from .knowledge import Document, KnowledgeBase

__all__ = ["ChunkParameters", "DocumentView", "SyncIn", "document_json", "sync_documents"]

MAX_SYNC = 100


class DocumentView(Document):
    """A document as the API answers it: its space_id, doc_source and content always text."""

    model_config = ConfigDict(**SENT_WHOLE)

    space_id: str = Field(description="The space's id, as text")  # type: ignore[assignment]
    doc_source: str = Field(description='Where the text came from; "" when not said')
    content: str = Field(description='The text; "" in a listing')


def document_json(doc: Document, *, with_content: bool = True) -> dict[str, Any]:
    """``doc`` as a :class:`DocumentView`."""
    data = doc.model_dump()
    data["space_id"] = str(doc.space_id)
    data["doc_source"] = doc.doc_source or ""
    data["content"] = (doc.content or "") if with_content else ""
    return data


class ChunkParameters(WireModel):
    model_config = ConfigDict(extra="ignore")

    chunk_size: int | None = Field(default=None, ge=20, le=8000)
    chunk_overlap: int | None = Field(default=None, ge=0, le=4000)


class SyncIn(WireModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    doc_id: int
    space_id: int | None = None
    model_name: str | None = None
    chunk_parameters: ChunkParameters | None = None

    @field_validator("space_id", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


async def sync_documents(
    knowledge: KnowledgeBase, items: list[SyncIn], *, caller: Caller = OPERATOR
) -> list[int]:
    """Re-chunk each listed document the caller reaches; all are checked before any is changed."""
    if not items:
        raise InvalidRequestError("name at least one document to sync", field="doc_id")
    if len(items) > MAX_SYNC:
        raise InvalidRequestError(f"at most {MAX_SYNC} documents per sync", field="doc_id")
    for item in items:
        doc = await knowledge.get_document(item.doc_id, caller=caller)
        if item.space_id is not None and item.space_id != doc.space_id:
            raise ConflictError(
                f"space_id: document {doc.id} is in space {doc.space_id}, not {item.space_id}"
            )
    synced = []
    for item in items:
        params = item.chunk_parameters or ChunkParameters()
        doc = await knowledge.rechunk_document(
            item.doc_id, chunk_size=params.chunk_size, chunk_overlap=params.chunk_overlap, caller=caller
        )
        synced.append(doc.id)
    return synced
