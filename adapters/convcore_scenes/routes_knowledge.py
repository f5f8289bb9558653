"""``/api/v2/serve/knowledge``: spaces and documents for chat_knowledge.

::

    POST   /api/v2/serve/knowledge/spaces                 create a space
    PUT    /api/v2/serve/knowledge/spaces                 update (id or name in the body)
    GET    /api/v2/serve/knowledge/spaces                 data.items
    GET    /api/v2/serve/knowledge/spaces/{space}         by id or name
    DELETE /api/v2/serve/knowledge/spaces/{space}         with its documents
    POST   /api/v2/serve/knowledge/documents              add text or a file (see below)
    GET    /api/v2/serve/knowledge/documents              data.items (space_id / space_name filter)
    GET    /api/v2/serve/knowledge/documents/{doc_id}
    DELETE /api/v2/serve/knowledge/documents/{doc_id}
    POST   /api/v2/serve/knowledge/documents/sync         split again, re-index (DB-GPT's SyncModel list)

A document comes as JSON (``{"space_name": "docs", "doc_name": "faq",
"content": "..."}``), as query parameters (DB-GPT's client sends it so), or
as a multipart form whose ``doc_file`` (any file field) is a UTF-8 text
file, with ``space_id`` / ``space_name`` / ``doc_name`` as form fields.

A key bound to a user lists and reaches only that user's spaces and their
documents (another's answer 404); an operator's key reaches all.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Body
from starlette.datastructures import UploadFile
from starlette.requests import Request

from convcore.errors import InvalidRequestError
from convcore.schema import NOT_BLANK
from convcore_server import ServerContext
from convcore_server.body import read_json_object
from convcore_server.openapi_doc import EMPTY_TEXT, at_least_one, json_body

from .envelope import EnvelopeRoute, Page, answer, created, link, ok, page_of, scene_errors, schema_of
from .knowledge import DocumentIn, KnowledgeBase, Space, SpaceCreate, SpaceIn
from .knowledge_wire import MAX_SYNC, DocumentView, SyncIn, document_json, sync_documents

__all__ = ["build_knowledge_router"]

_SPACE_REF = at_least_one(
    {"required": ["space_id"], "properties": {"space_id": {"type": "integer"}}},
    {"required": ["space_name"], "properties": {"space_name": {"type": "string", "minLength": 1}}},
)


def _document_schema() -> dict[str, Any]:
    """A document as JSON; an empty value is taken as not sent (DB-GPT's client sends them)."""
    schema = schema_of(DocumentIn)
    schema["properties"] = {k: {"anyOf": [v, EMPTY_TEXT]} for k, v in schema["properties"].items()}
    schema["properties"]["content"] = {
        "type": "string",
        "pattern": NOT_BLANK,
        "description": "The document's text",
    }
    return {**schema, "required": ["content"], **_SPACE_REF}


def _form_field(prop: dict[str, Any]) -> dict[str, Any]:
    """A property as a form field: text, never null (an empty field is left out)."""
    kinds = [k for k in prop.get("anyOf", ()) if k.get("type") != "null"]
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**kinds[0], **rest} if len(kinds) == 1 else rest


def _form_fields() -> dict[str, Any]:
    """DocumentIn's fields as form fields; an empty one is left out, as if not sent."""
    fields = schema_of(DocumentIn)["properties"].items()
    return {k: {"anyOf": [_form_field(v), EMPTY_TEXT]} for k, v in fields if k != "content"}


def _upload_schema() -> dict[str, Any]:
    props = _form_fields()
    props["doc_file"] = {
        "type": "string",
        "pattern": NOT_BLANK,
        "description": "A UTF-8 text file (its name is the doc_name unless one is sent), or its text",
    }
    return {"type": "object", "properties": props, "required": ["doc_file"], **_SPACE_REF}


def _urlencoded_schema() -> dict[str, Any]:
    props = _form_fields()
    props["content"] = {"type": "string", "pattern": NOT_BLANK, "description": "The document's text"}
    return {"type": "object", "properties": props, "required": ["content"], **_SPACE_REF}


_DOC_BODY = json_body(
    _document_schema(),
    **{
        "multipart/form-data": {
            "schema": _upload_schema(),
            "encoding": {"doc_file": {"contentType": "text/plain; charset=utf-8"}},
        },
        "application/x-www-form-urlencoded": {"schema": _urlencoded_schema()},
    },
)


def _space_update_schema() -> dict[str, Any]:
    """A space named by id, or by name when no id is sent."""
    by_id = {"required": ["id"], "properties": {"id": {"type": "integer"}}}
    by_name = {"required": ["name"], "properties": {"name": {"type": "string"}}}
    return {**schema_of(SpaceIn), **at_least_one(by_id, by_name)}


async def _document_fields(request: Request) -> dict[str, Any]:
    fields: dict[str, Any] = dict(request.query_params)
    form_text: str | None = None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        # The server's strict reader: deep nesting, NaN and lone surrogates are a 400, not a 500.
        if (await request.body()).strip():
            fields.update(await read_json_object(request))
    elif ctype in {"multipart/form-data", "application/x-www-form-urlencoded"}:
        async with request.form(max_files=1, max_fields=50) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    raw = await value.read()
                    try:
                        fields["content"] = raw.decode("utf-8-sig")
                    except UnicodeDecodeError:
                        raise InvalidRequestError("only UTF-8 text files can be added", field=key) from None
                    name = value.filename or "upload.txt"
                    fields.setdefault("doc_name", PurePath(name).name)
                    fields.setdefault("doc_source", name)
                    fields.setdefault("doc_type", (PurePath(name).suffix.lstrip(".") or "TEXT").upper())
                elif key == "doc_file":
                    form_text = value  # the text, sent as a field rather than a file
                else:
                    fields[key] = value
    # An upload was read into content above; doc_file as a query parameter is
    # DB-GPT's placeholder for no file, and a form's doc_file field is the text.
    fields.pop("doc_file", None)
    if form_text is not None:
        fields.setdefault("content", form_text)
    return {k: v for k, v in fields.items() if v not in ("", None) or k == "content"}


def build_knowledge_router(
    knowledge: KnowledgeBase, ctx: ServerContext, prefix: str = "/api/v2/serve"
) -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/knowledge", route_class=EnvelopeRoute, tags=["knowledge"])
    space = f"{prefix}/knowledge/spaces/{{space}}"
    doc = f"{prefix}/knowledge/documents/{{doc_id}}"
    space_uses = {
        "GetSpace": link(space, "get", space="$response.body#/data/id"),
        "DeleteSpace": link(space, "delete", space="$response.body#/data/id"),
        "ListDocuments": link(f"{prefix}/knowledge/documents", "get", space_id="$response.body#/data/id"),
        "AddDocument": link(
            f"{prefix}/knowledge/documents", "post", body={"space_id": "$response.body#/data/id"}
        ),
        "UpdateSpace": link(f"{prefix}/knowledge/spaces", "put", body={"id": "$response.body#/data/id"}),
        "EvaluateSpace": link(
            f"{prefix}/evaluate/evaluation", "post", body={"scene_value": "$response.body#/data/id"}
        ),
    }
    doc_uses = {
        "GetDocument": link(doc, "get", doc_id="$response.body#/data/id"),
        "DeleteDocument": link(doc, "delete", doc_id="$response.body#/data/id"),
        # The whole body: this document alone (merged into a generated list, the other items name others).
        "SyncDocument": {
            **link(
                f"{prefix}/knowledge/documents/sync", "post", body=[{"doc_id": "$response.body#/data/id"}]
            ),
            "x-schemathesis": {"merge_body": False},
        },
    }

    @router.post(
        "/spaces",
        summary="Create a knowledge space",
        responses={**scene_errors(409, 413), **created("space", space_uses, Space)},
    )
    async def create_space(request: Request, body: SpaceCreate) -> dict[str, Any]:
        caller = ctx.caller(request, body.user_name, body.sys_code)
        return ok((await knowledge.create_space(body, caller=caller)).model_dump())

    @router.put(
        "/spaces",
        summary="Update a knowledge space",
        description="Names the space by `id` (or by `name` when no id is sent) and changes the fields sent.",
        responses={**scene_errors(404, 409, 413), **answer(Space, "space")},
        openapi_extra=json_body(_space_update_schema()),
    )
    async def update_space(request: Request) -> dict[str, Any]:
        body = SpaceIn.model_validate(await read_json_object(request))
        caller = ctx.caller(request, body.user_name)
        return ok((await knowledge.update_space(body, caller=caller)).model_dump())

    @router.get(
        "/spaces",
        summary="List knowledge spaces",
        responses={**scene_errors(), **answer(Page[Space], "page of spaces")},
    )
    async def list_spaces(
        request: Request,
        page: int = 1,
        page_size: int = 20,
        user_name: str | None = None,
        sys_code: str | None = None,
    ) -> dict[str, Any]:
        caller = ctx.caller(request, user_name, sys_code)
        spaces = [s.model_dump() for s in await knowledge.list_spaces(caller=caller)]
        return ok(page_of(spaces, page, page_size))

    @router.get(
        "/spaces/{space}",
        summary="Get a knowledge space (by id or name)",
        responses={**scene_errors(404), **answer(Space, "space")},
    )
    async def get_space(request: Request, space: str) -> dict[str, Any]:
        return ok((await knowledge.get_space(space, caller=ctx.caller(request))).model_dump())

    @router.delete(
        "/spaces/{space}",
        summary="Delete a knowledge space and its documents",
        responses={**scene_errors(404), **answer(Space, "space")},
    )
    async def delete_space(request: Request, space: str) -> dict[str, Any]:
        return ok((await knowledge.delete_space(space, caller=ctx.caller(request))).model_dump())

    @router.post(
        "/documents",
        summary="Add a document",
        responses={**scene_errors(404, 413), **created("document", doc_uses, DocumentView)},
        openapi_extra=_DOC_BODY,
    )
    async def add_document(request: Request) -> dict[str, Any]:
        data = DocumentIn.model_validate(await _document_fields(request))
        return ok(document_json(await knowledge.add_document(data, caller=ctx.caller(request))))

    @router.get(
        "/documents",
        summary="List documents",
        description="Each document's `content` is left out (empty): read one document for its text.",
        responses={**scene_errors(404), **answer(Page[DocumentView], "page of documents")},
    )
    async def list_documents(
        request: Request,
        space_id: int | None = None,
        space_name: str | None = None,
        page: int = 1,
        page_size: int = 20,
    ) -> dict[str, Any]:
        ref = space_id if space_id is not None else space_name
        docs = [
            document_json(d, with_content=False)
            for d in await knowledge.list_documents(ref, caller=ctx.caller(request))
        ]
        return ok(page_of(docs, page, page_size))

    @router.get(
        "/documents/{doc_id:int}",
        summary="Get a document",
        responses={**scene_errors(404), **answer(DocumentView, "document")},
    )
    async def get_document(request: Request, doc_id: int) -> dict[str, Any]:
        return ok(document_json(await knowledge.get_document(doc_id, caller=ctx.caller(request))))

    @router.delete(
        "/documents/{doc_id:int}",
        summary="Delete a document",
        responses={**scene_errors(404), **answer(DocumentView, "deleted document")},
    )
    async def delete_document(request: Request, doc_id: int) -> dict[str, Any]:
        return ok(document_json(await knowledge.delete_document(doc_id, caller=ctx.caller(request))))

    @router.post(
        "/documents/sync",
        summary="Split documents again and re-index their spaces",
        responses={**scene_errors(404, 409, 413), **answer(list[int], "ids of the documents synced")},
    )
    async def sync(
        request: Request, body: Annotated[list[SyncIn], Body(min_length=1, max_length=MAX_SYNC)]
    ) -> dict[str, Any]:
        return ok(await sync_documents(knowledge, body, caller=ctx.caller(request)))

    return router
