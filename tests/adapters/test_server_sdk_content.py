"""The OpenAI SDK against the service: developer messages, images kept by conv_uid, response_format.

The service runs in-process; its ``echo`` models are served by the
recording upstream on loopback, so a test sees exactly what reached the model.
"""

from __future__ import annotations

import base64
import io
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from convcore import Engine, LocalBackend, MemoryStore, ModelRegistry, ModelSpec
from convcore_openai import OpenAIBackend
from convcore_server import create_app
from tests.adapters.server_support import AUTH, KEYS
from tests.backends.fake_upstream import Exchange, get_upstream

pytestmark = pytest.mark.anyio


def png_data_url(size: tuple[int, int], noise: bool = False) -> str:
    out = io.BytesIO()
    image = (
        Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size)
    )
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.fixture
async def sdk() -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    upstream = get_upstream()
    backend = OpenAIBackend(upstream.base_url, api_key="sk-test", timeout=10, backoff=0.01)
    registry = ModelRegistry(
        [
            ModelSpec(name="echo", backend=backend, context_window=8192),
            # A reasoning model behind the echo upstream: it takes instructions as developer.
            ModelSpec(
                name="o3-echo",
                upstream="echo",
                backend=backend,
                context_window=8192,
                instruction_role="developer",
            ),
            ModelSpec(name="convcore-local", backend=LocalBackend(), context_window=8192),
        ]
    )
    app = create_app(Engine(MemoryStore(), registry), api_keys=KEYS)
    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    raw = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://convcore.test", headers=AUTH)
    async with (
        openai.AsyncOpenAI(
            base_url="http://convcore.test/api/v2",
            api_key=KEYS[0],
            http_client=http_client,  # type: ignore[arg-type]
        ) as client,
        raw,
    ):
        yield client, raw
    await backend.aclose()


def _last_exchange(request_id: str) -> Exchange:
    return get_upstream().exchanges[request_id]


@pytest.mark.parametrize(("model", "role"), [("echo", "system"), ("o3-echo", "developer")])
async def test_sdk_developer_message(
    sdk: tuple[openai.AsyncOpenAI, httpx.AsyncClient], model: str, role: str
) -> None:
    client, raw = sdk
    rid = uuid.uuid4().hex
    reply = await client.chat.completions.create(
        model=model,
        messages=[
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": "Hello?"},
        ],
        extra_body={"request_id": rid},
    )
    assert reply.choices[0].message.content == "You said: Hello?"
    sent = _last_exchange(rid).body["messages"]
    assert sent == [{"role": role, "content": "Answer in one word."}, {"role": "user", "content": "Hello?"}]
    conv_uid = (reply.model_extra or {})["conv_uid"]
    data = (await raw.get(f"/api/v2/conversations/{conv_uid}")).json()["data"]
    assert data["conversation"]["system"] == [
        {"role": "developer", "content": "Answer in one word.", "name": None}
    ]
    assert reply.usage is not None and reply.usage.prompt_tokens > 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_sdk_image_part_is_kept_in_the_history_of_the_next_turn(
    sdk: tuple[openai.AsyncOpenAI, httpx.AsyncClient], stream: bool
) -> None:
    client, raw = sdk
    image_url = png_data_url((800, 600))
    content: list[Any] = [
        {"type": "text", "text": "What colour is this?"},
        {"type": "image_url", "image_url": {"url": image_url, "detail": "low"}},
    ]
    first = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": content}]
    )
    assert first.choices[0].message.content == "You said: What colour is this? [image_url]"
    conv_uid = (first.model_extra or {})["conv_uid"]

    rid = uuid.uuid4().hex
    extra = {"conv_uid": conv_uid, "request_id": rid}
    if stream:
        chunks = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "And now?"}], stream=True, extra_body=extra
        )
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    else:
        second = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "And now?"}], extra_body=extra
        )
        text = second.choices[0].message.content or ""
    assert text == "You said: And now? (earlier user messages: 1; first: 'What colour is this?')"
    history = _last_exchange(rid).body["messages"]
    assert history[0] == {"role": "user", "content": content}, "the image went to the model with its message"
    assert history[1]["role"] == "assistant" and history[2] == {"role": "user", "content": "And now?"}

    data = (await raw.get(f"/api/v2/conversations/{conv_uid}")).json()["data"]
    assert data["messages"][0]["content"] == content, "the conversation API returns the parts as sent"
    assert data["messages"][2]["content"] == "And now?"


async def test_sdk_response_format(sdk: tuple[openai.AsyncOpenAI, httpx.AsyncClient]) -> None:
    client, _ = sdk
    local = await client.chat.completions.create(
        model="convcore-local",
        messages=[{"role": "user", "content": "Give me JSON"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(local.choices[0].message.content or "") == {"reply": "You said: Give me JSON"}

    rid = uuid.uuid4().hex
    schema = {"name": "answer", "schema": {"type": "object", "properties": {"reply": {"type": "string"}}}}
    remote = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Give me JSON"}],
        response_format={"type": "json_schema", "json_schema": schema},
        extra_body={"request_id": rid},
    )
    assert _last_exchange(rid).body["response_format"] == {"type": "json_schema", "json_schema": schema}
    assert remote.choices[0].message.content

    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="convcore-local",
            messages=[{"role": "user", "content": "Give me JSON"}],
            response_format={"type": "json_schema", "json_schema": schema},
        )
    assert info.value.body["param"] == "response_format"  # type: ignore[index]


async def test_a_large_data_url_is_refused_over_http_naming_the_limit() -> None:
    from convcore_server.cli import parse_args

    opts = parse_args(["--no-auth", "--max-inline-bytes", "3000"], environ={})
    engine = Engine(
        MemoryStore(),
        ModelRegistry([ModelSpec("m", LocalBackend(), 8192)]),
        max_inline_bytes=opts.max_inline_bytes,
    )
    app = create_app(engine, api_keys=KEYS)
    image = {"type": "image_url", "image_url": {"url": png_data_url((40, 40), noise=True)}}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t", headers=AUTH
    ) as raw:
        r = await raw.post(
            "/api/v2/chat/completions", json={"messages": [{"role": "user", "content": [image]}]}
        )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.0.content.0.image_url.url"
    assert "max_inline_bytes" in error["message"] and "3000" in error["message"]
    assert (await engine.store.list_conversations()) == []


async def test_audio_and_file_parts_reach_the_upstream_as_sent(
    sdk: tuple[openai.AsyncOpenAI, httpx.AsyncClient],
) -> None:
    _, raw = sdk
    wav = base64.b64encode(b"RIFF\x24\x00\x00\x00WAVEfmt ").decode()
    pdf = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4 hello").decode()
    content = [
        {"type": "text", "text": "Transcribe and summarise"},
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
        {"type": "file", "file": {"file_data": pdf, "filename": "notes.pdf"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ]
    rid = uuid.uuid4().hex
    r = await raw.post(
        "/api/v2/chat/completions",
        json={"model": "echo", "request_id": rid, "messages": [{"role": "user", "content": content}]},
    )
    assert r.status_code == 200, r.text
    assert (
        r.json()["choices"][0]["message"]["content"]
        == "You said: Transcribe and summarise [input_audio, file, file]"
    )
    assert _last_exchange(rid).body["messages"] == [{"role": "user", "content": content}]
    data = (await raw.get(f"/api/v2/conversations/{r.json()['conv_uid']}")).json()["data"]
    assert data["messages"][0]["content"] == content
