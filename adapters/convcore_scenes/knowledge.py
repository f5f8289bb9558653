"""Knowledge spaces: documents, chunks and a BM25 index, all kept as records.

Records::

    knowledge_space                      id (padded) -> space; unique index by name
    knowledge_document                   id (padded) -> document (with its text)
    knowledge_space_docs:<space id>      document id -> {} (a space's documents)
    knowledge_chunk:<space id>           "<doc id>:<n>" -> {doc_id, doc_name, index, text}

A document is split into chunks of about ``chunk_size`` tokens with
``chunk_overlap`` tokens repeated between neighbours, cutting at paragraph
and sentence ends where it can. The index (rank-bm25's Okapi BM25 with
Lucene's always-positive idf) is built lazily from the chunk records and
cached per space together with the space's ``revision``; every document
added or deleted writes a new revision *after* its chunks, so an index is
rebuilt when anything changed, in this process or another, and survives
restarts by being rebuilt from the store.

A space belongs to its creator's ``user_name`` / ``sys_code`` (see
:mod:`convcore.owners`), and its documents to the space's owner: a bound
caller reaches only its own spaces and what is in them.
"""

from __future__ import annotations

import itertools
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from convcore.answer_schema import SENT_WHOLE
from convcore.errors import InvalidRequestError, MissingDependencyError
from convcore.owners import OPERATOR, Caller
from convcore.protocols import Tokenizer
from convcore.records import RecordStore
from convcore.schema import PRINTABLE_ID, has_text, invalid_from_pydantic
from convcore.tokens import get_tokenizer

from .base import (
    DuplicateError,
    NotFoundError,
    UniqueNames,
    WireModel,
    claim_int_id,
    id_key,
    iter_records,
    now_text,
    owned,
    printable,
)

__all__ = [
    "Chunk",
    "Document",
    "DocumentIn",
    "Hit",
    "KnowledgeBase",
    "Space",
    "SpaceIn",
    "chunk_text",
    "search_tokens",
]

SPACE = "knowledge_space"
DOCUMENT = "knowledge_document"


def _docs_kind(space_id: int) -> str:
    return f"knowledge_space_docs:{space_id}"


def _chunks_kind(space_id: int) -> str:
    return f"knowledge_chunk:{space_id}"


class SpaceIn(WireModel):
    model_config = ConfigDict(extra="ignore")

    id: int | None = None
    name: str | None = Field(default=None, max_length=128, json_schema_extra={"pattern": PRINTABLE_ID})
    vector_type: str | None = Field(default=None, max_length=64)
    domain_type: str | None = Field(default=None, max_length=64)
    desc: str | None = Field(default=None, max_length=10_000)
    owner: str | None = Field(default=None, max_length=256)
    context: str | None = None
    user_name: str | None = Field(default=None, max_length=256)
    sys_code: str | None = Field(default=None, max_length=256)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return printable(value)


class SpaceCreate(SpaceIn):
    """A new space: ``name`` is required."""

    name: str = Field(max_length=128, json_schema_extra={"pattern": PRINTABLE_ID})


class Space(BaseModel):
    model_config = ConfigDict(frozen=True, **SENT_WHOLE)

    id: int
    name: str
    vector_type: str = "BM25"
    domain_type: str = "Normal"
    desc: str = ""
    owner: str = ""
    context: str | None = None
    user_name: str | None = None
    sys_code: str | None = None
    revision: str = ""
    gmt_created: str = ""
    gmt_modified: str = ""


class DocumentIn(WireModel):
    model_config = ConfigDict(extra="ignore")

    space_id: int | None = None
    space_name: str | None = None
    doc_name: str | None = Field(
        default=None, max_length=512, json_schema_extra={"pattern": PRINTABLE_ID}
    )
    doc_type: str | None = Field(default=None, max_length=32)
    doc_source: str | None = Field(default=None, max_length=4096)
    content: str | None = None
    chunk_size: int | None = Field(default=None, ge=20, le=8000)
    chunk_overlap: int | None = Field(default=None, ge=0, le=4000)

    @field_validator("doc_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return printable(value)


class Document(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    doc_name: str
    doc_type: str = "TEXT"
    doc_source: str | None = None
    space_id: int
    space: str
    content: str | None = None
    chunk_size: int = 200
    chunk_overlap: int = 40
    chunk_count: int = 0
    status: str = "FINISHED"
    user_name: str | None = None
    sys_code: str | None = None
    gmt_created: str = ""
    gmt_modified: str = ""


@dataclass(frozen=True)
class Chunk:
    doc_id: int
    doc_name: str
    index: int
    text: str

    def label(self) -> str:
        return f"doc {self.doc_name!r} chunk {self.index}"


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float


# -- chunking ----------------------------------------------------------------

_PIECES = re.compile(r"\n\s*\n|(?<=[.!?。！？;；])\s+|(?<=[。！？；])")


def chunk_text(
    text: str, *, size: int = 200, overlap: int = 40, tokenizer: Tokenizer | None = None
) -> list[str]:
    """``text`` in chunks of at most ``size`` tokens, neighbours sharing up to
    ``overlap`` tokens of whole sentences; a sentence longer than ``size`` is
    cut by tokens."""
    tok = tokenizer or get_tokenizer()
    overlap = min(overlap, size // 2)
    pieces: list[tuple[str, int]] = []
    for raw in _PIECES.split(text):
        piece = raw.strip()
        if not piece:
            continue
        ids = tok.encode(piece)
        if len(ids) <= size:
            pieces.append((piece, len(ids)))
            continue
        for start in range(0, len(ids), size):
            part = tok.decode(ids[start : start + size]).replace("\ufffd", "").strip()
            if part:
                pieces.append((part, len(tok.encode(part))))
    chunks: list[str] = []
    current: list[tuple[str, int]] = []
    total = 0
    for piece, n in pieces:
        if current and total + n > size:
            chunks.append(" ".join(p for p, _ in current))
            carried: list[tuple[str, int]] = []
            kept = 0
            for p, m in reversed(current):
                if kept + m > overlap:
                    break
                carried.insert(0, (p, m))
                kept += m
            if kept + n > size:
                carried, kept = [], 0
            current, total = carried, kept
        current.append((piece, n))
        total += n
    if current:
        chunks.append(" ".join(p for p, _ in current))
    return chunks


async def _chunks_of(content: str, size: int, overlap: int) -> list[str]:
    return await anyio.to_thread.run_sync(lambda: chunk_text(content, size=size, overlap=overlap))


# -- search ------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


# Words too common to tell chunks apart (English; CJK is split into characters and bigrams).
STOPWORDS = frozenset(
    (
        "a about above after again against all am an and any are as at be because been before being below "
        "between both but by can could did do does doing down during each few for from further had has have "
        "having he her here hers herself him himself his how i if in into is it its itself just me more most "
        "my myself no nor not now of off on once only or other our ours ourselves out over own same she "
        "should so some such than that the their theirs them themselves then there these they this those "
        "through to too under until up very was we were what when where which while who whom why will with "
        "would you your yours yourself yourselves"
    ).split()
)


def search_tokens(text: str) -> list[str]:
    """Lower-cased words less :data:`STOPWORDS`; runs of CJK characters become
    characters and bigrams."""
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        if not _CJK.search(word):
            if word not in STOPWORDS:
                out.append(word)
            continue
        run: list[str] = []
        for ch in word + " ":
            if _CJK.match(ch):
                run.append(ch)
                continue
            if run:
                out.extend(run)
                out.extend(a + b for a, b in itertools.pairwise(run))
                run = []
            if ch != " ":
                out.append(ch)
    return out


def _bm25_class() -> Any:
    try:
        from rank_bm25 import BM25Okapi  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - the scenes extra installs it
        raise MissingDependencyError("chat_knowledge's BM25 index", "scenes") from exc

    class LuceneBM25(BM25Okapi):  # type: ignore[misc]
        """Okapi BM25 with Lucene's idf, log(1 + (N - n + 0.5) / (n + 0.5)):
        never negative, so a term in most chunks of a small space still counts."""

        def _calc_idf(self, nd: dict[str, int]) -> None:
            for word, freq in nd.items():
                self.idf[word] = math.log(1 + (self.corpus_size - freq + 0.5) / (freq + 0.5))

    return LuceneBM25


class SpaceIndex:
    """A built BM25 index over a space's chunks."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self._bm25 = _bm25_class()([search_tokens(c.text) or ["\x00"] for c in chunks]) if chunks else None

    def search(self, query: str, top_k: int) -> list[Hit]:
        terms = search_tokens(query)
        if self._bm25 is None or not terms:
            return []
        scores = self._bm25.get_scores(terms)
        ranked = sorted(range(len(self.chunks)), key=lambda i: (-float(scores[i]), i))
        return [Hit(self.chunks[i], float(scores[i])) for i in ranked[:top_k] if scores[i] > 0]


# -- the registry --------------------------------------------------------------


class KnowledgeBase:
    """Spaces and their documents over a RecordStore, with cached indexes."""

    def __init__(
        self,
        records: RecordStore,
        *,
        chunk_size: int = 200,
        chunk_overlap: int = 40,
        max_document_chars: int = 2_000_000,
        max_document_chunks: int = 10_000,
    ) -> None:
        self.records = records
        self.names = UniqueNames(records, SPACE, "name")
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.max_document_chars = max_document_chars
        # Every chunk is a record written and indexed: a long document cut in
        # tiny chunks would cost one request minutes and the store megabytes.
        self.max_document_chunks = max_document_chunks
        self._indexes: dict[int, tuple[str, SpaceIndex]] = {}
        self._build_lock = anyio.Lock()

    # spaces

    async def create_space(self, data: SpaceIn, *, caller: Caller = OPERATOR) -> Space:
        if not data.name:
            raise InvalidRequestError("is required", field="name")
        if await self.names.lookup(data.name) is not None:
            raise DuplicateError("knowledge space", "name", data.name)
        stamp = now_text()
        fields = caller.stamp(data.model_dump(exclude_none=True, exclude={"id"}))
        value = Space(id=0, **fields, revision=uuid.uuid4().hex, gmt_created=stamp, gmt_modified=stamp)
        record = value.model_dump()
        new_id = await claim_int_id(self.records, SPACE, record)
        try:
            await self.names.claim(value.name, id_key(new_id), "knowledge space")
        except InvalidRequestError:
            await self.records.delete(SPACE, id_key(new_id))
            raise
        return Space.model_validate(record)

    async def get_space(self, ref: int | str, *, caller: Caller = OPERATOR) -> Space:
        """A space by id, or by name (a numeric string is tried as an id first)."""
        found: dict[str, Any] | None = None
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isascii() and ref.isdigit()):
            found = await self.records.get(SPACE, id_key(int(ref)))
            if found is not None and not caller.reaches(found):
                found = None
        if found is None and isinstance(ref, str):
            found = await self.names.lookup(ref)
        return Space.model_validate(owned(found, caller, "knowledge space", ref))

    async def find_space(self, name: str, *, caller: Caller = OPERATOR) -> Space | None:
        try:
            return await self.get_space(name, caller=caller)
        except NotFoundError:
            return None

    async def list_spaces(self, *, caller: Caller = OPERATOR) -> list[Space]:
        return [Space.model_validate(r) async for r in iter_records(self.records, SPACE, caller)]

    async def update_space(self, data: SpaceIn, *, caller: Caller = OPERATOR) -> Space:
        """Change the fields ``data`` sets; only an unbound caller may hand
        the space (and its documents) to another owner."""
        ref: int | str | None = data.id if data.id is not None else data.name
        if ref is None:
            raise InvalidRequestError("id or name is required to update a space", field="id")
        current = await self.get_space(ref, caller=caller)
        skip = {"id", "name"} | ({"user_name", "sys_code"} if caller.bound else set())
        changes = data.model_dump(exclude_unset=True, exclude=skip)
        changes = {k: v for k, v in changes.items() if v is not None}
        rename = data.id is not None and data.name is not None and data.name != current.name
        if rename:
            changes["name"] = data.name
        updated = current.model_copy(update={**changes, "gmt_modified": now_text()})
        key = id_key(current.id)
        if rename:
            # Claim the new name first: a taken name refuses the update with nothing changed.
            await self.names.claim(updated.name, key, "knowledge space")
        await self.records.put(SPACE, key, updated.model_dump())
        if rename:
            await self.names.release(current.name, key)
        # The documents follow the space: its owner, and its name.
        follow = {"user_name": updated.user_name, "sys_code": updated.sys_code, "space": updated.name}
        if follow != {"user_name": current.user_name, "sys_code": current.sys_code, "space": current.name}:
            async for r in iter_records(self.records, _docs_kind(current.id)):
                doc = await self.records.get(DOCUMENT, id_key(int(r["id"])))
                if doc is not None:
                    await self.records.put(DOCUMENT, id_key(int(r["id"])), {**doc, **follow})
        return updated

    async def delete_space(self, ref: int | str, *, caller: Caller = OPERATOR) -> Space:
        space = await self.get_space(ref, caller=caller)
        for doc_id in [int(r["id"]) async for r in iter_records(self.records, _docs_kind(space.id))]:
            await self._drop_document(space.id, doc_id)
        await self.records.delete(SPACE, id_key(space.id))
        await self.names.release(space.name, id_key(space.id))
        self._indexes.pop(space.id, None)
        return space

    async def _touch(self, space: Space) -> None:
        current = await self.records.get(SPACE, id_key(space.id))
        if current is not None:
            current["revision"] = uuid.uuid4().hex
            current["gmt_modified"] = now_text()
            await self.records.put(SPACE, id_key(space.id), current)

    # documents

    async def add_document(self, data: DocumentIn, *, caller: Caller = OPERATOR) -> Document:
        """Add a document to a space the caller reaches; it belongs to the space's owner."""
        ref: int | str | None = data.space_id if data.space_id is not None else data.space_name
        if ref is None:
            raise InvalidRequestError("space_id or space_name is required", field="space_id")
        space = await self.get_space(ref, caller=caller)
        content = data.content or ""
        if not has_text(content):
            raise InvalidRequestError("is required (text, or a file upload)", field="content")
        if len(content) > self.max_document_chars:
            raise InvalidRequestError(f"is longer than {self.max_document_chars} characters", field="content")
        size = data.chunk_size or self.chunk_size
        overlap = data.chunk_overlap if data.chunk_overlap is not None else self.chunk_overlap
        pieces = self._bounded(await _chunks_of(content, size, overlap), size)
        stamp = now_text()
        doc = Document(
            id=0,
            doc_name=data.doc_name or f"document-{uuid.uuid4().hex[:8]}",
            doc_type=(data.doc_type or "TEXT").upper(),
            doc_source=data.doc_source,
            space_id=space.id,
            space=space.name,
            content=content,
            chunk_size=size,
            chunk_overlap=overlap,
            chunk_count=len(pieces),
            status="RUNNING",
            gmt_created=stamp,
            gmt_modified=stamp,
            user_name=space.user_name,
            sys_code=space.sys_code,
        )
        record = doc.model_dump()
        doc_id = await claim_int_id(self.records, DOCUMENT, record)
        await self._write_chunks(space.id, doc_id, doc.doc_name, pieces)
        await self.records.put(_docs_kind(space.id), id_key(doc_id), {"id": doc_id})
        record["status"] = "FINISHED"
        await self.records.put(DOCUMENT, id_key(doc_id), record)
        await self._touch(space)
        return Document.model_validate(record)

    def _bounded(self, pieces: list[str], size: int) -> list[str]:
        """``pieces``, if a document may have that many chunks."""
        if len(pieces) > self.max_document_chunks:
            raise InvalidRequestError(
                f"of {size} tokens cuts this document into {len(pieces)} chunks, more than the "
                f"{self.max_document_chunks} a document may have; use a larger chunk_size",
                field="chunk_size",
            )
        return pieces

    async def _write_chunks(self, space_id: int, doc_id: int, doc_name: str, pieces: list[str]) -> None:
        kind = _chunks_kind(space_id)
        for i, text in enumerate(pieces):
            chunk = {"doc_id": doc_id, "doc_name": doc_name, "index": i, "text": text}
            await self.records.put(kind, f"{id_key(doc_id)}:{i:06d}", chunk)

    async def rechunk_document(
        self,
        doc_id: int,
        *,
        chunk_size: int | None = None,
        chunk_overlap: int | None = None,
        caller: Caller = OPERATOR,
    ) -> Document:
        """Split a document the caller reaches again (with new sizes, if given)
        and re-index its space.

        The new chunks are written before the old surplus ones are dropped, so
        a search in between sees the document, never a gap."""
        doc = await self.get_document(doc_id, caller=caller)
        size = chunk_size or doc.chunk_size
        overlap = chunk_overlap if chunk_overlap is not None else doc.chunk_overlap
        try:  # the same ranges as on add
            DocumentIn(chunk_size=size, chunk_overlap=overlap)
        except ValidationError as exc:
            raise invalid_from_pydantic(exc) from None
        pieces = self._bounded(await _chunks_of(doc.content or "", size, overlap), size)
        await self._write_chunks(doc.space_id, doc_id, doc.doc_name, pieces)
        kind = _chunks_kind(doc.space_id)
        for i in range(len(pieces), doc.chunk_count):
            await self.records.delete(kind, f"{id_key(doc_id)}:{i:06d}")
        updated = doc.model_copy(
            update={
                "chunk_size": size,
                "chunk_overlap": overlap,
                "chunk_count": len(pieces),
                "status": "FINISHED",
                "gmt_modified": now_text(),
            }
        )
        await self.records.put(DOCUMENT, id_key(doc_id), updated.model_dump())
        space = await self.records.get(SPACE, id_key(doc.space_id))
        if space is not None:
            await self._touch(Space.model_validate(space))
        return updated

    async def get_document(self, doc_id: int, *, caller: Caller = OPERATOR) -> Document:
        return Document.model_validate(
            owned(await self.records.get(DOCUMENT, id_key(doc_id)), caller, "document", doc_id)
        )

    async def list_documents(
        self, space_ref: int | str | None = None, *, caller: Caller = OPERATOR
    ) -> list[Document]:
        """A space's documents (all documents without ``space_ref``), without their text."""
        if space_ref is None:
            docs = [Document.model_validate(r) async for r in iter_records(self.records, DOCUMENT, caller)]
        else:
            space = await self.get_space(space_ref, caller=caller)
            docs = []
            async for r in iter_records(self.records, _docs_kind(space.id)):
                found = await self.records.get(DOCUMENT, id_key(int(r["id"])))
                if found is not None and caller.reaches(found):
                    docs.append(Document.model_validate(found))
        return [d.model_copy(update={"content": None}) for d in docs]

    async def delete_document(self, doc_id: int, *, caller: Caller = OPERATOR) -> Document:
        doc = await self.get_document(doc_id, caller=caller)
        await self._drop_document(doc.space_id, doc_id)
        space = await self.records.get(SPACE, id_key(doc.space_id))
        if space is not None:
            await self._touch(Space.model_validate(space))
        return doc

    async def _drop_document(self, space_id: int, doc_id: int) -> None:
        kind = _chunks_kind(space_id)
        doc = await self.records.get(DOCUMENT, id_key(doc_id))
        count = int(doc.get("chunk_count", 0)) if doc else 0
        for i in range(count):
            await self.records.delete(kind, f"{id_key(doc_id)}:{i:06d}")
        await self.records.delete(_docs_kind(space_id), id_key(doc_id))
        await self.records.delete(DOCUMENT, id_key(doc_id))

    # search

    async def index(self, space: Space) -> SpaceIndex:
        """The space's index, rebuilt from the chunk records if the space changed."""
        current = await self.records.get(SPACE, id_key(space.id))
        revision = str((current or {}).get("revision", ""))
        cached = self._indexes.get(space.id)
        if cached is not None and cached[0] == revision:
            return cached[1]
        async with self._build_lock:
            cached = self._indexes.get(space.id)
            if cached is not None and cached[0] == revision:
                return cached[1]
            chunks = [
                Chunk(int(r["doc_id"]), str(r["doc_name"]), int(r["index"]), str(r["text"]))
                async for r in iter_records(self.records, _chunks_kind(space.id))
            ]
            built = await anyio.to_thread.run_sync(SpaceIndex, chunks)
            self._indexes[space.id] = (revision, built)
            return built

    async def search(self, space: Space, query: str, top_k: int = 10) -> list[Hit]:
        return (await self.index(space)).search(query, top_k)
