"""A Python client generated from ``/openapi.json`` drives the real service.

openapi-python-client turns the document into a typed package; the test
then holds a chat turn, reads the conversation back and makes a
datasource's round trip with nothing but that package. If the document
says something the service does not do (a body shape, a status code, a
parameter), the generated code fails here.
"""

from __future__ import annotations

import importlib
import json
import os
import sqlite3
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from openapi_python_client.strings import snake_case

from .serve_process import KEY, ServeProcess

pytestmark = pytest.mark.timeout(300)

PACKAGE = "convcore_generated_client"


@dataclass
class Generated:
    """The generated package, the document it came from and a client on the service."""

    package: ModuleType
    document: dict[str, Any]
    client: Any
    data_dir: Path

    def operation(self, method: str, path: str) -> ModuleType:
        """The generated module for ``method path``, found as the generator names
        it: ``api/<first tag>/<operationId>``."""
        op = self.document["paths"][path][method.lower()]
        tag = (op.get("tags") or ["default"])[0]
        return importlib.import_module(f"{PACKAGE}.api.{snake_case(tag)}.{snake_case(op['operationId'])}")

    @staticmethod
    def body(module: ModuleType, data: dict[str, Any]) -> Any:
        """``data`` as the generated model ``module``'s endpoint takes for its body."""
        model = typing.get_type_hints(module.sync_detailed)["body"]
        assert isinstance(model, type), f"{module.__name__} takes a body of several kinds: {model}"
        return model.from_dict(data)


def _generate(document: Path, out: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [str(bin_dir / "openapi-python-client"), "generate", "--path", str(document),
         "--output-path", str(out), "--meta", "none", "--overwrite"],
        capture_output=True, text=True, env=env, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The generator says what it could not turn into code; the document must have none of that.
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    _import_unset_where_used(out)


def _import_unset_where_used(package: Path) -> None:
    """openapi-python-client 0.29 annotates the body of an operation that
    takes several media types (adding a document: JSON, a multipart upload or
    a form) ``... | Unset`` without importing ``Unset``; the module then fails
    to import. The import is added where the name is used and missing, and
    only there (an operation of one media type never needs it)."""
    plain = "\nfrom ...types import UNSET, Response\n"
    for module in (package / "api").rglob("*.py"):
        code = module.read_text()
        if "| Unset" in code and plain in code:
            assert module.name == "add_document.py", f"{module} uses Unset without importing it"
            module.write_text(code.replace(plain, "\nfrom ...types import UNSET, Response, Unset\n"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generated]:
    root = tmp_path_factory.mktemp("generated-client")
    data_dir = root / "data"
    data_dir.mkdir()
    serve = ServeProcess(f"sqlite:///{root / 'convcore.db'}", root, extra=("--sqlite-root", str(data_dir)))
    with serve:
        document = httpx.get(f"{serve.base}/openapi.json", timeout=10).json()
        (root / "openapi.json").write_text(json.dumps(document))
        _generate(root / "openapi.json", root / PACKAGE)
        sys.path.insert(0, str(root))
        try:
            package = importlib.import_module(PACKAGE)
            client = package.AuthenticatedClient(
                base_url=serve.base, token=KEY, raise_on_unexpected_status=True
            )
            with client:
                yield Generated(package, document, client, data_dir)
        finally:
            sys.path.remove(str(root))
            for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
                del sys.modules[name]


def _json(response: Any) -> Any:
    return json.loads(response.content)


def test_every_operation_has_a_distinct_generated_method(generated: Generated) -> None:
    ids = [op["operationId"] for ops in generated.document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for path, ops in generated.document["paths"].items():
        for method in ops:
            module = generated.operation(method, path)
            assert callable(module.sync_detailed), f"{method.upper()} {path}"


def test_a_chat_turn_and_the_conversation_read_back(generated: Generated) -> None:
    chat = generated.operation("POST", "/api/v2/chat/completions")
    body = generated.body(
        chat, {"model": "convcore-echo", "messages": "hello from a generated client", "user_name": "gen"}
    )
    reply = chat.sync_detailed(client=generated.client, body=body)
    assert reply.status_code == 200, reply.content
    completion = _json(reply)
    assert completion["choices"][0]["message"]["content"] == "You said: hello from a generated client"
    conv_uid = completion["conv_uid"]

    read = generated.operation("GET", "/api/v2/conversations/{conv_uid}")
    got = read.sync_detailed(conv_uid, client=generated.client, user_name="gen")
    assert got.status_code == 200, got.content
    messages = _json(got)["data"]["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "hello from a generated client"),
        ("assistant", "You said: hello from a generated client"),
    ]

    missing = read.sync_detailed("no-such-conversation", client=generated.client, user_name="gen")
    assert missing.status_code == 404
    assert _json(missing)["err_code"] == "conversation_not_found"


def test_a_datasource_round_trip(generated: Generated) -> None:
    path = generated.data_dir / "shop.db"
    with sqlite3.connect(path) as db:
        db.execute("create table orders (id integer primary key, total real)")
    create = generated.operation("POST", "/api/v2/serve/datasources")
    body = generated.body(
        create, {"db_type": "sqlite", "db_name": "shop", "db_path": str(path), "comment": "orders"}
    )
    created = create.sync_detailed(client=generated.client, body=body)
    assert created.status_code == 200, created.content
    ds = _json(created)["data"]
    assert ds["db_name"] == "shop" and ds["db_type"] == "sqlite"

    get = generated.operation("GET", "/api/v2/serve/datasources/{datasource_id}")
    fetched = get.sync_detailed(ds["id"], client=generated.client)
    assert fetched.status_code == 200, fetched.content
    assert _json(fetched)["data"]["comment"] == "orders"

    listed = generated.operation("GET", "/api/v2/serve/datasources").sync_detailed(client=generated.client)
    assert ds["id"] in [d["id"] for d in _json(listed)["data"]]

    delete = generated.operation("DELETE", "/api/v2/serve/datasources/{datasource_id}")
    assert delete.sync_detailed(ds["id"], client=generated.client).status_code == 200
    gone = get.sync_detailed(ds["id"], client=generated.client)
    assert gone.status_code == 404
    assert _json(gone)["success"] is False
