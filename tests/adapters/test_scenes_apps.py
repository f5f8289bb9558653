"""chat_app and /api/v2/serve/apps over HTTP, through the real app factory;
plus the scene errors every mode shares (unknown chat_mode, missing chat_param)."""

from __future__ import annotations

import pytest

from convcore import LocalBackend, ModelSpec
from convcore.testing import RecordingBackend
from tests.adapters.scenes_support import CHAT, assert_envelope_error, client, harness, stream_text

pytestmark = pytest.mark.anyio

APPS = "/api/v2/serve/apps"


async def test_app_crud() -> None:
    h = harness()
    async with client(h.app) as c:
        created = await c.post(APPS, json={"app_code": "helper", "app_name": "Helper", "temperature": 0.2})
        assert created.status_code == 200, created.text
        body = created.json()
        assert body["success"] is True and body["err_code"] is None
        assert body["data"]["app_code"] == "helper" and body["data"]["language"] == "en"

        generated = (await c.post(APPS, json={"app_name": "No code"})).json()["data"]
        assert generated["app_code"]

        got = (await c.get(f"{APPS}/helper")).json()["data"]
        assert got["app_name"] == "Helper" and got["temperature"] == 0.2

        listed = (await c.get(APPS)).json()["data"]
        assert {a["app_code"] for a in listed["app_list"]} == {"helper", generated["app_code"]}
        assert listed["total_count"] == 2
        page = (await c.get(APPS, params={"page": 2, "page_size": 1})).json()["data"]
        assert len(page["app_list"]) == 1 and page["current_page"] == 2

        updated = await c.put(
            f"{APPS}/helper", json={"app_describe": "helps", "prompt_template": "Be brief."}
        )
        assert updated.json()["data"]["app_describe"] == "helps"
        assert updated.json()["data"]["temperature"] == 0.2  # untouched fields stay
        in_body = await c.put(APPS, json={"app_code": "helper", "language": "zh"})
        assert in_body.json()["data"]["language"] == "zh"

        deleted = await c.delete(f"{APPS}/helper")
        assert deleted.json()["data"]["app_code"] == "helper"
        assert_envelope_error(await c.get(f"{APPS}/helper"), 404)
        assert_envelope_error(await c.delete(f"{APPS}/helper"), 404)
        assert_envelope_error(await c.put(f"{APPS}/helper", json={"app_name": "x"}), 404)


async def test_app_bad_input_is_400_in_the_envelope() -> None:
    h = harness()
    async with client(h.app) as c:
        await c.post(APPS, json={"app_code": "a", "app_name": "A"})
        dup = assert_envelope_error(await c.post(APPS, json={"app_code": "a", "app_name": "B"}), 409)
        assert "already exists" in dup["err_msg"]
        bad = assert_envelope_error(await c.post(APPS, json={"app_name": "x", "temperature": 9}), 400)
        assert "temperature" in bad["err_msg"]
        assert_envelope_error(await c.post(APPS, json={"app_code": "b"}), 400)  # no app_name
        assert_envelope_error(
            await c.post(APPS, content=b"{not json", headers={"content-type": "application/json"}), 400
        )
        assert_envelope_error(await c.put(f"{APPS}/a", json={"app_code": "other"}), 400)
    async with client(h.app, key=None) as anonymous:
        assert_envelope_error(await anonymous.get(APPS), 401)


async def test_chat_app_uses_the_apps_prompt_and_defaults() -> None:
    other = RecordingBackend()
    h = harness(more_models=[ModelSpec("app-model", other, context_window=4096, max_new_tokens=100)])
    async with client(h.app) as c:
        await c.post(
            APPS,
            json={
                "app_code": "pirate",
                "app_name": "Pirate",
                "prompt_template": "Talk like a pirate.",
                "model": "app-model",
                "temperature": 0.5,
                "max_new_tokens": 50,
            },
        )
        r = await c.post(CHAT, json={"messages": "hello", "chat_mode": "chat_app", "chat_param": "pirate"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "app-model"
        assert body["choices"][0]["message"]["content"] == "You said: hello"
        sent = other.requests[-1]
        assert sent.messages[0].role == "system" and sent.messages[0].content == "Talk like a pirate."
        assert sent.temperature == 0.5 and sent.max_new_tokens == 50
        assert h.backend.requests == []  # the default model was not used

        # The request's own settings win over the app's.
        r2 = await c.post(
            CHAT,
            json={
                "messages": "again",
                "chat_mode": "chat_app",
                "chat_param": "pirate",
                "conv_uid": body["conv_uid"],
                "temperature": 1.5,
                "stream": True,
            },
        )
        assert r2.status_code == 200
        text, chunks = stream_text(r2.text)
        assert text.startswith("You said: again")
        assert chunks[-1]["usage"]["prompt_tokens"] > 0
        assert other.requests[-1].temperature == 1.5
        conv = await h.engine.get_conversation(body["conv_uid"])
        assert conv.chat_mode == "chat_app" and conv.chat_param == "pirate" and conv.message_count == 4


async def test_unknown_app_mode_and_missing_param_are_400_and_store_nothing() -> None:
    h = harness()
    async with client(h.app) as c:
        unknown_app = await c.post(
            CHAT, json={"messages": "hi", "chat_mode": "chat_app", "chat_param": "nope"}
        )
        assert unknown_app.status_code == 400
        assert "chat_param" in unknown_app.json()["err_msg"]
        for mode in ("chat_app", "chat_data", "chat_knowledge", "chat_flow"):
            missing = await c.post(CHAT, json={"messages": "hi", "chat_mode": mode})
            assert missing.status_code == 400, mode
            assert missing.headers["content-type"].startswith("application/json")
            assert "chat_param" in missing.json()["err_msg"]
            blank = await c.post(
                CHAT, json={"messages": "hi", "chat_mode": mode, "chat_param": "  ", "stream": True}
            )
            assert blank.status_code == 400
        bad_mode = await c.post(CHAT, json={"messages": "hi", "chat_mode": "chat_nonsense", "stream": True})
        assert bad_mode.status_code == 400
        assert bad_mode.json()["err_code"] == "unsupported_chat_mode"
        assert "chat_app" in bad_mode.json()["err_msg"]  # it lists what is available
    assert await h.store.list_conversations() == []
    assert h.backend.requests == []


async def test_app_with_default_prompt_and_local_backend() -> None:
    h = harness(RecordingBackend(LocalBackend()))
    async with client(h.app) as c:
        await c.post(APPS, json={"app_code": "x", "app_name": "Xavier", "app_describe": "A tutor."})
        r = await c.post(CHAT, json={"messages": "teach me", "chat_mode": "chat_app", "chat_param": "x"})
        assert r.status_code == 200
    system = h.backend.requests[-1].messages[0]
    assert system.role == "system" and "Xavier" in system.content and "A tutor." in system.content
