"""chat_knowledge and /api/v2/serve/knowledge over HTTP: spaces, documents
(JSON, query parameters, file upload), BM25 retrieval into the budget, the
sources line, and an index that survives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from convcore import MemoryRecordStore, open_store
from convcore.tokens import get_tokenizer
from convcore_scenes import KnowledgeBase
from convcore_scenes.knowledge import DocumentIn, SpaceIn, chunk_text, search_tokens
from tests.adapters.scenes_support import CHAT, assert_envelope_error, client, harness, stream_text

pytestmark = pytest.mark.anyio

SPACES = "/api/v2/serve/knowledge/spaces"
DOCS = "/api/v2/serve/knowledge/documents"

FAQ = (
    "Our shop opens at nine in the morning and closes at six in the evening.\n\n"
    "Returns are accepted within thirty days when the receipt is shown.\n\n"
    "Shipping to islands takes two extra days and costs five euros."
)
PETS = "Cats sleep most of the day. Dogs need a walk twice a day. Parrots can learn words."


async def test_spaces_and_documents_crud() -> None:
    h = harness()
    async with client(h.app) as c:
        space = await c.post(SPACES, json={"name": "shop", "desc": "shop facts", "owner": "me"})
        assert space.status_code == 200, space.text
        sid = space.json()["data"]["id"]
        assert space.json()["data"]["vector_type"] == "BM25"
        assert_envelope_error(await c.post(SPACES, json={"name": "shop"}), 409)
        assert_envelope_error(await c.post(SPACES, json={"desc": "no name"}), 400)

        by_json = await c.post(DOCS, json={"space_name": "shop", "doc_name": "faq", "content": FAQ})
        assert by_json.status_code == 200, by_json.text
        doc = by_json.json()["data"]
        assert doc["space_id"] == str(sid) and doc["status"] == "FINISHED" and doc["chunk_count"] >= 1
        by_query = await c.post(DOCS, params={"space_id": str(sid), "doc_name": "pets", "content": PETS})
        assert by_query.status_code == 200, by_query.text
        upload = await c.post(
            DOCS,
            data={"space_id": str(sid)},
            files={
                "doc_file": ("notes.md", "# Notes\n\nThe café serves oat milk.".encode(), "text/markdown")
            },
        )
        assert upload.status_code == 200, upload.text
        assert upload.json()["data"]["doc_name"] == "notes.md" and upload.json()["data"]["doc_type"] == "MD"
        binary = await c.post(
            DOCS, data={"space_id": str(sid)}, files={"doc_file": ("x.bin", b"\xff\xfe\x00\x81")}
        )
        assert_envelope_error(binary, 400)
        assert_envelope_error(await c.post(DOCS, json={"space_name": "nope", "content": "x"}), 404)
        assert_envelope_error(await c.post(DOCS, json={"space_name": "shop", "content": "  "}), 400)
        assert_envelope_error(await c.post(DOCS, json={"content": "orphan"}), 400)

        listed = (await c.get(DOCS, params={"space_id": sid})).json()["data"]
        assert listed["total_count"] == 3 and {d["doc_name"] for d in listed["items"]} == {
            "faq",
            "pets",
            "notes.md",
        }
        assert all(d["content"] == "" for d in listed["items"])
        got = (await c.get(f"{DOCS}/{doc['id']}")).json()["data"]
        assert got["content"] == FAQ

        spaces = (await c.get(SPACES)).json()["data"]
        assert [s["name"] for s in spaces["items"]] == ["shop"]
        assert (await c.get(f"{SPACES}/shop")).json()["data"]["id"] == sid
        assert (await c.get(f"{SPACES}/{sid}")).json()["data"]["name"] == "shop"
        updated = await c.put(SPACES, json={"id": sid, "desc": "new desc"})
        assert updated.json()["data"]["desc"] == "new desc"

        gone = await c.delete(f"{DOCS}/{doc['id']}")
        assert gone.json()["data"]["doc_name"] == "faq"
        assert_envelope_error(await c.get(f"{DOCS}/{doc['id']}"), 404)
        deleted = await c.delete(f"{SPACES}/shop")
        assert deleted.json()["data"]["name"] == "shop"
        assert_envelope_error(await c.get(f"{SPACES}/shop"), 404)
        assert_envelope_error(await c.get(f"{DOCS}/{by_query.json()['data']['id']}"), 404)
        assert (await c.post(SPACES, json={"name": "shop"})).status_code == 200  # the name is free again


async def test_chat_knowledge_answers_with_sources() -> None:
    h = harness()
    async with client(h.app) as c:
        await c.post(SPACES, json={"name": "shop"})
        await c.post(DOCS, json={"space_name": "shop", "doc_name": "faq", "content": FAQ, "chunk_size": 20})
        await c.post(DOCS, json={"space_name": "shop", "doc_name": "pets", "content": PETS, "chunk_size": 20})
        r = await c.post(
            CHAT,
            json={
                "messages": "How long do returns take with a receipt?",
                "chat_mode": "chat_knowledge",
                "chat_param": "shop",
            },
        )
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
        assert "\n\nSources: doc 'faq' chunk 1" in content
        assert "pets" not in content
        sent = [m.content for m in h.backend.requests[-1].messages if m.role == "system"]
        assert "knowledge space" in sent[0]
        assert sent[1].startswith("[doc 'faq' chunk 1]") and "thirty days" in sent[1]

        streamed = await c.post(
            CHAT,
            json={
                "messages": "Which pets need walks?",
                "chat_mode": "chat_knowledge",
                "chat_param": "shop",
                "stream": True,
            },
        )
        text, chunks = stream_text(streamed.text)
        assert "Sources: doc 'pets' chunk" in text
        stored = await h.engine.read_messages(chunks[0]["conv_uid"])
        assert stored[-1].content == text

        nothing = await c.post(
            CHAT, json={"messages": "zebra quantum", "chat_mode": "chat_knowledge", "chat_param": "shop"}
        )
        assert nothing.json()["choices"][0]["message"]["content"].endswith(
            "Sources: none (nothing in the space matched)"
        )
        unknown = await c.post(
            CHAT, json={"messages": "x", "chat_mode": "chat_knowledge", "chat_param": "nope"}
        )
        assert unknown.status_code == 400


async def test_big_context_keeps_the_window_invariant() -> None:
    window, max_new = 1024, 200
    h = harness(context_window=window, max_new_tokens=max_new)
    kb = h.kit.knowledge
    space = await kb.create_space(SpaceIn(name="big"))
    paragraphs = [
        f"Paragraph {i} about lighthouse keepers and the lighthouse lamp number {i}. " * 6 for i in range(60)
    ]
    await kb.add_document(DocumentIn(space_id=space.id, doc_name="huge", content="\n\n".join(paragraphs)))
    hits = await kb.search(space, "lighthouse lamp keepers", top_k=50)
    assert len(hits) > 12  # far more than fit
    async with client(h.app) as c:
        conv = None
        for i, stream in enumerate((False, True, False)):
            body = {
                "messages": f"Tell me about the lighthouse lamp {i}",
                "chat_mode": "chat_knowledge",
                "chat_param": "big",
                "stream": stream,
                "conv_uid": conv,
            }
            r = await c.post(CHAT, json={k: v for k, v in body.items() if v is not None})
            assert r.status_code == 200, r.text
            if stream:
                text, chunks = stream_text(r.text)
                usage = chunks[-1]["usage"]
            else:
                text, usage = r.json()["choices"][0]["message"]["content"], r.json()["usage"]
                conv = r.json()["conv_uid"]
            assert usage["prompt_tokens"] + max_new <= window
            sent = h.backend.requests[-1]
            blocks = [m for m in sent.messages if m.role == "system" and m.content.startswith("[doc")]
            assert 0 < len(blocks) < 12
            used = text.rsplit("Sources: ", 1)[1]
            assert used.count("chunk") == len(blocks)  # the reply names exactly the chunks sent


async def test_index_survives_a_restart_and_sees_other_writers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'records.db'}"
    first_store = open_store(url)
    second_store = open_store(url)
    try:
        first = KnowledgeBase(first_store.records)
        space = await first.create_space(SpaceIn(name="docs"))
        await first.add_document(
            DocumentIn(space_id=space.id, doc_name="a", content="Apples are red and sweet.")
        )
        assert [h.chunk.doc_name for h in await first.search(space, "apples")] == ["a"]

        second = KnowledgeBase(second_store.records)  # a new process: nothing cached, rebuilt from records
        assert [h.chunk.doc_name for h in await second.search(space, "apples")] == ["a"]
        doc = await second.add_document(
            DocumentIn(space_id=space.id, doc_name="b", content="Bananas are yellow.")
        )
        # The first instance's cached index is stale now; the space's revision says so.
        assert [h.chunk.doc_name for h in await first.search(space, "bananas")] == ["b"]
        await first.delete_document(doc.id)
        assert await second.search(space, "bananas") == []
    finally:
        await first_store.aclose()
        await second_store.aclose()


async def test_chunking_and_tokens() -> None:
    tok = get_tokenizer()
    text = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(200))
    chunks = chunk_text(text, size=50, overlap=25)
    assert len(chunks) > 5
    assert all(len(tok.encode(c)) <= 50 + 2 for c in chunks)
    assert all(chunks[i].split(". ")[-1] in chunks[i + 1] for i in range(len(chunks) - 1))  # overlap
    one_long_word = "x" * 5000
    assert all(len(tok.encode(c)) <= 50 for c in chunk_text(one_long_word, size=50, overlap=0))
    assert search_tokens("Hello, 知识库!") == ["hello", "知", "识", "库", "知识", "识库"]
    kb = KnowledgeBase(MemoryRecordStore())
    space = await kb.create_space(SpaceIn(name="zh"))
    await kb.add_document(DocumentIn(space_id=space.id, doc_name="zh", content="知识库对话需要空间名称。"))
    assert [h.chunk.doc_name for h in await kb.search(space, "空间")] == ["zh"]


async def test_documents_answer_in_dbgpt_documentmodel_types() -> None:
    h = harness()
    async with client(h.app) as c:
        sid = (await c.post(SPACES, json={"name": "shop"})).json()["data"]["id"]
        # DB-GPT's client sends its model as query parameters, its empty upload field as text.
        added = await c.post(
            DOCS,
            params={
                "id": "",
                "doc_name": "faq",
                "doc_type": "TEXT",
                "content": FAQ,
                "space_id": str(sid),
                "doc_source": "",
                "doc_file": "annotation=NoneType required=False default=None",
            },
        )
        doc = added.json()["data"]
        assert (doc["space_id"], doc["doc_source"], doc["content"]) == (str(sid), "", FAQ)
        for listed in [
            (await c.get(DOCS)).json()["data"]["items"],
            (await c.get(DOCS, params={"space_id": sid})).json()["data"]["items"],
        ]:
            assert [(d["space_id"], d["doc_source"], d["content"]) for d in listed] == [(str(sid), "", "")]
        deleted = (await c.delete(f"{DOCS}/{doc['id']}")).json()["data"]
        assert deleted["content"] == FAQ and deleted["space_id"] == str(sid)


async def test_sync_splits_documents_again_and_the_index_follows() -> None:
    h = harness()
    async with client(h.app) as c:
        sid = (await c.post(SPACES, json={"name": "shop"})).json()["data"]["id"]
        doc = (await c.post(DOCS, json={"space_id": sid, "doc_name": "faq", "content": FAQ})).json()["data"]
        space = await h.kit.knowledge.get_space(sid)
        assert {hit.chunk.index for hit in await h.kit.knowledge.search(space, "returns receipt")} == {0}

        body = [
            {
                "doc_id": str(doc["id"]),
                "space_id": str(sid),
                "model_name": None,
                "chunk_parameters": {"chunk_size": 20, "chunk_overlap": 0, "separator": "\n"},
            }
        ]
        synced = await c.post(f"{DOCS}/sync", json=body)
        assert synced.status_code == 200, synced.text
        assert synced.json()["data"] == [doc["id"]]
        after = (await c.get(f"{DOCS}/{doc['id']}")).json()["data"]
        assert (after["chunk_size"], after["chunk_overlap"]) == (20, 0) and after["chunk_count"] == 3
        hits = await h.kit.knowledge.search(space, "returns receipt")
        assert hits[0].chunk.index == 1 and "Returns are accepted" in hits[0].chunk.text
        assert len(await h.kit.knowledge.search(space, "shop returns shipping")) == 3

        # Back to one chunk: the surplus chunks are gone from the index too.
        await c.post(f"{DOCS}/sync", json=[{"doc_id": doc["id"], "chunk_parameters": {"chunk_size": 200}}])
        assert len(await h.kit.knowledge.search(space, "shop returns shipping")) == 1

        other = (await c.post(SPACES, json={"name": "other"})).json()["data"]["id"]
        wrong_space = await c.post(f"{DOCS}/sync", json=[{"doc_id": doc["id"], "space_id": other}])
        assert f"not {other}" in assert_envelope_error(wrong_space, 409)["err_msg"]
        assert_envelope_error(await c.post(f"{DOCS}/sync", json=[{"doc_id": 999}]), 404)
        assert_envelope_error(await c.post(f"{DOCS}/sync", json=[]), 400)
        too_small = [{"doc_id": doc["id"], "chunk_parameters": {"chunk_size": 5}}]
        assert (
            "chunk_size"
            in assert_envelope_error(await c.post(f"{DOCS}/sync", json=too_small), 400)["err_msg"]
        )
        # A refused sync changed nothing.
        assert (await c.get(f"{DOCS}/{doc['id']}")).json()["data"]["chunk_size"] == 200


async def test_chat_model_spelling_selects_chat_knowledge() -> None:
    h = harness()
    async with client(h.app) as c:
        await c.post(SPACES, json={"name": "shop"})
        await c.post(DOCS, json={"space_name": "shop", "doc_name": "faq", "content": FAQ})
        r = await c.post(
            CHAT, json={"messages": "returns receipt", "chat_model": "chat_knowledge", "chat_param": "shop"}
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].endswith("Sources: doc 'faq' chunk 0")


async def test_a_space_is_renamed_by_id_and_its_old_name_is_free() -> None:
    h = harness()
    async with client(h.app) as c:
        sid = (await c.post(SPACES, json={"name": "shop"})).json()["data"]["id"]
        await c.post(SPACES, json={"name": "taken"})
        doc = (await c.post(DOCS, json={"space_id": sid, "doc_name": "faq", "content": FAQ})).json()["data"]
        refused = await c.put(SPACES, json={"id": sid, "name": "taken", "desc": "x"})
        assert "taken" in assert_envelope_error(refused, 409)["err_msg"]
        assert (await c.get(f"{SPACES}/{sid}")).json()["data"]["name"] == "shop"

        renamed = await c.put(SPACES, json={"id": sid, "name": "store", "vector_type": "BM25"})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["data"]["name"] == "store"
        assert (await c.get(f"{SPACES}/store")).json()["data"]["id"] == sid
        assert_envelope_error(await c.get(f"{SPACES}/shop"), 404)
        assert (await c.get(f"{DOCS}/{doc['id']}")).json()["data"]["space"] == "store"
        answer = await c.post(
            CHAT, json={"messages": "returns", "chat_mode": "chat_knowledge", "chat_param": "store"}
        )
        assert "Sources: doc 'faq'" in answer.json()["choices"][0]["message"]["content"]
        assert (await c.post(SPACES, json={"name": "shop"})).status_code == 200  # the old name is free



async def test_a_document_cut_into_too_many_chunks_is_refused_and_stores_nothing() -> None:
    from convcore import InvalidRequestError
    from convcore_scenes.knowledge import _chunks_kind

    records = MemoryRecordStore()
    kb = KnowledgeBase(records, max_document_chunks=5)
    space = await kb.create_space(SpaceIn(name="s"))
    text = " ".join(f"Sentence number {i} says something." for i in range(200))
    with pytest.raises(InvalidRequestError, match="more than the 5 a document may have") as refused:
        await kb.add_document(DocumentIn(space_id=space.id, doc_name="long", content=text, chunk_size=20))
    assert refused.value.field == "chunk_size"
    assert await kb.list_documents(space.id) == []
    assert await records.list(_chunks_kind(space.id)) == []
    # Rechunking into too many is refused too, and leaves the document as it was.
    doc = await kb.add_document(DocumentIn(space_id=space.id, doc_name="fits", content=text, chunk_size=4000))
    with pytest.raises(InvalidRequestError, match="use a larger chunk_size"):
        await kb.rechunk_document(doc.id, chunk_size=20)
    assert await kb.get_document(doc.id) == doc
    assert len(await records.list(_chunks_kind(space.id))) == doc.chunk_count
