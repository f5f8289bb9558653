"""Bearer keys: several at once, a JSON 401 otherwise; the CLI's safety rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convcore import Engine, MemoryStore, default_registry
from convcore_server import create_app
from convcore_server.cli import UsageError, is_loopback, load_models, parse_args
from tests.adapters.server_support import CHAT, KEYS, assert_error_body, client_for, make_app, stored

pytestmark = pytest.mark.anyio

ROUTES = [
    ("POST", CHAT),
    ("GET", "/api/v2/models"),
    ("GET", "/api/v2/conversations"),
    ("GET", "/api/v2/conversations/x"),
    ("DELETE", "/api/v2/conversations/x"),
]


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"authorization", b"Bearer wrong")],
        [(b"authorization", f"Basic {KEYS[0]}".encode())],
        [(b"authorization", f"Bearer {KEYS[0]}x".encode())],
        [(b"authorization", b"Bearer")],
        [(b"authorization", "Bearer ключ".encode())],
    ],
    ids=["missing", "wrong", "basic", "prefix", "empty", "non-ascii"],
)
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_without_a_valid_key_every_route_is_401_json(
    headers: list[tuple[bytes, bytes]], method: str, path: str
) -> None:
    app, _, store = make_app()
    async with client_for(app, key=None) as c:
        r = await c.request(
            method, path, headers=headers, json={"messages": "x"} if method == "POST" else None
        )
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error_body(r.json(), "invalid_api_key")
    assert await stored(store) == (0, 0)


async def test_every_configured_key_works() -> None:
    app, _, _ = make_app()
    for key in KEYS:
        async with client_for(app, key=key) as c:
            r = await c.post(CHAT, json={"messages": "hi"})
            assert r.status_code == 200
    async with client_for(app, key=None) as c:
        r = await c.get("/api/v2/models", headers={"authorization": f"bearer   {KEYS[1]}"})
        assert r.status_code == 200


async def test_knowledge_endpoint_answers_401_in_its_envelope() -> None:
    app, _, _ = make_app()
    async with client_for(app, key=None) as c:
        r = await c.post("/api/knowledge/chat/completions", json={"messages": "x"})
    assert r.status_code == 401
    assert r.json()["code"] == 1000001 and r.json()["message"] == "unauthorized"


async def test_anonymous_must_be_explicit() -> None:
    engine = Engine(MemoryStore(), default_registry())
    with pytest.raises(ValueError, match="allow_anonymous"):
        create_app(engine)
    app = create_app(engine, allow_anonymous=True)
    async with client_for(app, key=None) as c:
        assert (await c.post(CHAT, json={"messages": "hi"})).status_code == 200


# -- the CLI ---------------------------------------------------------------


def test_cli_defaults_and_env() -> None:
    opts = parse_args(["--api-key", "a"], environ={})
    assert (opts.host, opts.port, opts.api_keys) == ("127.0.0.1", 5670, ("a",))
    assert opts.store_url == "sqlite:///convcore.db"
    assert opts.models_path is None and not opts.models_env
    env = {"CONVCORE_API_KEYS": " b, c ,,", "CONVCORE_STORE_URL": "memory://", "CONVCORE_MODELS": "m.toml"}
    opts = parse_args(["--api-key", "a", "--api-key", "b"], environ=env)
    assert opts.api_keys == ("a", "b", "c")
    assert (opts.store_url, opts.models_path, opts.models_env) == ("memory://", None, True)
    opts = parse_args(["--store", "sqlite:///x.db", "--models", "n.json"], environ=env)
    assert (opts.store_url, opts.models_path, opts.models_env) == ("sqlite:///x.db", "n.json", False)


def test_cli_refuses_to_run_without_keys_unless_told() -> None:
    with pytest.raises(UsageError, match="no API keys"):
        parse_args([], environ={})
    assert parse_args(["--no-auth"], environ={}).no_auth


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_cli_refuses_no_auth_on_a_public_bind_unless_forced(host: str) -> None:
    with pytest.raises(UsageError, match="not a loopback address"):
        parse_args(["--no-auth", "--host", host], environ={})
    assert parse_args(["--no-auth", "--force", "--host", host], environ={}).force
    assert parse_args(["--api-key", "k", "--host", host], environ={}).host == host


def test_cli_rejects_contradictions() -> None:
    with pytest.raises(UsageError, match="contradicts"):
        parse_args(["--no-auth"], environ={"CONVCORE_API_KEYS": "k"})
    with pytest.raises(UsageError, match="port"):
        parse_args(["--api-key", "k", "--port", "0"], environ={})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("myhost", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_models_file_is_loaded_through_model_config(tmp_path: Path) -> None:
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"models": [{"name": "m1", "backend": "local", "context_window": 4096}]}))
    opts = parse_args(["--no-auth", "--models", str(models)], environ={})
    registry = load_models(opts)
    assert [(s.name, s.context_window) for s in registry] == [("m1", 4096)]
    assert [s.name for s in load_models(parse_args(["--no-auth"], environ={}))] == ["convcore-echo"]


def test_serve_main_reports_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from convcore_server.cli import main

    assert main(["--no-auth", "--host", "0.0.0.0"]) == 2
    assert "refusing" in capsys.readouterr().err


def test_each_request_is_judged_by_its_own_header() -> None:
    from starlette.requests import HTTPConnection

    from convcore_server.auth import APIKeyAuth
    from convcore_server.errors import AuthenticationError

    auth = APIKeyAuth(["open-key"], user_keys={"ada-key": "ada", "bob-key": "bob"})

    def conn(header: bytes | None) -> HTTPConnection:
        headers = [] if header is None else [(b"authorization", header)]
        return HTTPConnection({"type": "http", "headers": headers})

    ada, bob, wrong, operator = (
        conn(b"Bearer ada-key"),
        conn(b"Bearer bob-key"),
        conn(b"Bearer nope"),
        conn(b"Bearer open-key"),
    )
    for _ in range(2):  # asked again, each connection gets its own answer back
        assert auth.user_of(ada) == "ada" and auth.user_of(ada) == "ada"
        assert auth.user_of(bob) == "bob"
        assert not auth.is_authorized(wrong) and auth.user_of(wrong) is None
        assert auth.is_authorized(operator) and auth.user_of(operator) is None
        assert auth.is_authorized(ada) and auth.user_of(ada) == "ada"
    with pytest.raises(AuthenticationError, match="invalid API key"):
        auth.check(wrong)
    with pytest.raises(AuthenticationError, match="missing API key"):
        auth.check(conn(None))
    auth.check(bob)
