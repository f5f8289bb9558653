"""What a benchmark loads: a store through the library, the HTTP service, or
any endpoint that speaks DB-GPT's or OpenAI's chat/completions.

Each target is an async context manager and a :class:`~benchmarks.driver.Driver`,
and names its floor (:mod:`benchmarks.floors`), so the same workloads run on
both and the results come out as ratios.

- :class:`LibraryTarget`: ``Engine.chat`` on ``open_store(url)``, in this process.
- :class:`ServiceTarget`: a real ``convcore serve`` subprocess on a free
  loopback port; the load comes from this process, so the server has a core
  of its own. Pre-fill and read-back go straight to the same store.
- :class:`EndpointTarget`: someone's deployment (``--url``, ``--api-key``,
  ``--model``), multi-turn by conv_uid in the body (DB-GPT style), or by
  resending the history (plain OpenAI style, ``history="client"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from convcore import (
    DEFAULT_MODEL,
    Engine,
    Message,
    MessageDraft,
    TurnWrite,
    count_message,
    default_registry,
    get_tokenizer,
)
from convcore.bootstrap import open_store

from .driver import Ack, ReadBack, TurnText, prefill_content
from .floors import HttpFloor, floor_for
from .namespaces import Namespace, namespaced_url
from .serve import floor_command, serve_command
from .wire import HttpPool

__all__ = [
    "EndpointTarget",
    "HttpClient",
    "LibraryTarget",
    "ServerProcess",
    "ServiceTarget",
    "free_port",
    "mask_url",
]

CHAT_PATH = "/api/v2/chat/completions"


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for reports and logs."""
    if "://" not in url or "@" not in url.split("://", 1)[1].split("/", 1)[0]:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.split("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def open_isolated_store(url: str, namespace: Namespace) -> tuple[Any, dict[str, Any]]:
    """``open_store(url)`` under the run's prefix, and the prefix setting."""
    served, options = namespaced_url(url, namespace)
    return open_store(served), options


class _StorePrefill:
    """Fast pre-fill straight into a store: TurnWrites of ``batch`` messages
    (user/assistant alternating, each user message starting a round)."""

    def __init__(self, store: Any, run_tag: str, text: TurnText, batch: int) -> None:
        self.store = store
        self.run_tag = run_tag
        self.text = text
        self.batch = max(2, batch - batch % 2)
        self._tok = get_tokenizer(default_registry().get(None).encoding)

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        ids: list[str] = []
        for first in range(start, start + count, self.batch):
            n = min(self.batch, start + count - first)
            drafts = []
            for i in range(first, first + n):
                role, content = prefill_content(self.run_tag, i, self.text.history_tokens)
                drafts.append(
                    MessageDraft(
                        role=role,  # type: ignore[arg-type]
                        content=content,
                        token_count=count_message(self._tok, role, content),
                        starts_round=role == "user",
                    )
                )
            if drafts[-1].role != "assistant":  # a turn ends with its reply
                drafts.append(MessageDraft(role="assistant", content="ok", token_count=5))
            turn_id = f"prefill-{uuid.uuid4().hex}"
            await self.store.append_turn(
                TurnWrite(
                    conv_uid=conv_uid,
                    turn_id=turn_id,
                    messages=tuple(drafts),
                    encoding=self._tok.name,
                    model=DEFAULT_MODEL,
                    user_name="ccbench",
                    prompt_tokens=0,
                    completion_tokens=0,
                    created_at=time.time(),
                )
            )
            ids.append(turn_id)
        return ids


class LibraryTarget:
    """``Engine.chat`` on a store URL, in this process.

    ``wrap`` (a callable taking and returning a store) lets the test suite
    and ``--fault`` put a deliberately broken store in between.
    """

    kind = "library"

    def __init__(
        self,
        store_url: str,
        *,
        namespace: Namespace,
        text: TurnText,
        latency: float = 0.0,
        tokens_per_second: float = 0.0,
        max_new_tokens: int = 256,
        serialize: bool = False,
        prefill_batch: int = 500,
        wrap: Any = None,
    ) -> None:
        self.store_url = store_url
        self.name = f"library {mask_url(store_url)}"
        self.namespace = namespace
        self.text = text
        self.latency = latency
        self.tokens_per_second = tokens_per_second
        self.max_new_tokens = max_new_tokens
        self.serialize = serialize
        self.prefill_batch = prefill_batch
        self.wrap = wrap
        self.store_options: dict[str, Any] = {}
        self.engine: Engine | None = None
        self._prefill: _StorePrefill | None = None

    def floor(self, tail: int) -> Any:
        filler = prefill_content(self.namespace.run_id, 0, self.text.history_tokens)[1]
        return floor_for(self.store_url, self.namespace, tail, filler)

    async def __aenter__(self) -> LibraryTarget:
        store, self.store_options = open_isolated_store(self.store_url, self.namespace)
        if self.wrap is not None:
            store = self.wrap(store)
        registry = default_registry(latency=self.latency, tokens_per_second=self.tokens_per_second)
        self.engine = Engine(store, registry, owned=True)
        self._prefill = _StorePrefill(store, self.namespace.run_id, self.text, self.prefill_batch)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.engine is not None:
            await self.engine.aclose()

    async def turn(self, conv_uid: str, text: str) -> Ack:
        assert self.engine is not None
        request: dict[str, Any] = {
            "messages": text,
            "conv_uid": conv_uid,
            "max_new_tokens": self.max_new_tokens,
            "user_name": "ccbench",
        }
        if self.serialize:
            request["serialize"] = True
        reply = await self.engine.chat(request)
        return Ack(reply.id, reply.conv_uid or conv_uid)

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        assert self._prefill is not None
        return await self._prefill.prefill(conv_uid, start, count)

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        assert self.engine is not None
        return ReadBack(messages=await self.engine.store.read_messages(conv_uid))

    async def forget(self, conv_uids: list[str]) -> None:
        """Delete the run's conversations (the store's prefix, if any, goes with cleanup)."""
        assert self.engine is not None
        for conv_uid in conv_uids:
            with contextlib.suppress(Exception):
                await self.engine.store.delete_conversation(conv_uid)


# -- HTTP ---------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """A server subprocess on loopback; its output goes to ``log``.

    Started by ``start()``, which waits until the port answers HTTP (or the
    process dies, or ``timeout`` passes); ``stop()`` terminates this one
    process, then kills it if it lingers.
    """

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.port = port
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        import httpx

        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("wb")
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{' '.join(self.argv[:4])}… exited with {self.proc.returncode}:\n{self.tail_log()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    await client.get(f"{self.base_url}/")
                    return
                await asyncio.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server did not answer on port {self.port} within {timeout}s:\n{self.tail_log()}")

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class HttpClient:
    """Chat turns over HTTP, DB-GPT/OpenAI style.

    Turns go over the harness's lean keep-alive pool (:class:`~benchmarks.wire.HttpPool`):
    httpx's pool looks at every open connection for every request, so at 64
    connections the load generator spent more CPU per turn than the server it
    measured, and the floor and the target were both bounded by the client.
    Reading conversations back and deleting them (untimed) use httpx.

    ``history="server"`` sends only the new message and the conv_uid (the
    server keeps the history, as DB-GPT and convcore do); ``"client"`` keeps
    each conversation here and resends it, for plain OpenAI-style servers.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = DEFAULT_MODEL,
        max_new_tokens: int = 256,
        connections: int = 64,
        timeout: float = 30.0,
        history: str = "server",
        serialize: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.connections = connections
        self.timeout = timeout
        self.history = history
        self.serialize = serialize
        self.client: Any = None
        self.pool: HttpPool | None = None
        self._kept: dict[str, list[dict[str, str]]] = {}

    @property
    def chat_url(self) -> str:
        if self.base_url.endswith("/chat/completions"):
            return self.base_url
        if self.base_url.endswith(("/v1", "/v2")):
            return f"{self.base_url}/chat/completions"
        return f"{self.base_url}{CHAT_PATH}"

    @property
    def _chat_path(self) -> str:
        parts = urlsplit(self.chat_url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    @property
    def api_root(self) -> str:
        """Where ``/conversations`` would be: the URL up to its ``/chat/completions``."""
        return self.chat_url.removesuffix("/chat/completions")

    async def __aenter__(self) -> HttpClient:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections),
        )
        self.pool = HttpPool(self.chat_url, limit=self.connections, headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            await self.pool.aclose()
        if self.client is not None:
            await self.client.aclose()

    async def post_turn(self, conv_uid: str, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "stream": False,
            "max_new_tokens": self.max_new_tokens,
            "max_tokens": self.max_new_tokens,
        }
        if self.model:
            body["model"] = self.model
        if self.history == "client":
            kept = self._kept.setdefault(conv_uid, [])
            body["messages"] = [*kept, {"role": "user", "content": text}]
        else:
            body["messages"] = text
            body["conv_uid"] = conv_uid
            body["user_name"] = "ccbench"
            if self.serialize:
                body["serialize"] = True
        assert self.pool is not None, "use HttpClient as an async context manager"
        async with (
            asyncio.timeout(self.timeout),
            self.pool.request("POST", self._chat_path, json.dumps(body).encode()) as response,
        ):
            raw = await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {raw[:200].decode('utf-8', 'replace')}")
        data: dict[str, Any] = json.loads(raw)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"not a chat completion: {str(data)[:200]}") from exc
        if self.history == "client":
            self._kept[conv_uid].extend(
                [{"role": "user", "content": text}, {"role": "assistant", "content": content}]
            )
        return data

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        """The conversation through the server's API, if it has one."""
        import httpx

        if self.history == "client":
            kept = self._kept.get(conv_uid, [])
            return ReadBack(pairs=[(m["role"], m["content"]) for m in kept])
        url = f"{self.api_root}/conversations/{quote(conv_uid, safe='')}"
        rows: list[dict[str, Any]] = []
        start: int | None = 1
        while start is not None:
            try:
                response = await self.client.get(url, params={"start_seq": start, "limit": 1000})
            except httpx.HTTPError:
                return None
            if response.status_code != 200:
                return None
            body = response.json()
            data = body.get("data", body) if isinstance(body, dict) else body
            page = data.get("messages") if isinstance(data, dict) else data
            if not isinstance(page, list):
                return None
            rows.extend(m for m in page if isinstance(m, dict))
            nxt = data.get("next_start_seq") if isinstance(data, dict) else None
            start = nxt if isinstance(nxt, int) and nxt > start and page else None
        return _read_back_of(rows)


def _read_back_of(rows: list[dict[str, Any]]) -> ReadBack:
    """Full messages when the rows carry seq and turn_id (convcore's API), else role/content pairs."""
    rows = [m for m in rows if m.get("role") != "system"]
    try:
        messages = [
            Message(
                role=m["role"],
                content=m["content"],
                name=m.get("name"),
                tool_call_id=m.get("tool_call_id"),
                token_count=m.get("token_count") or 0,
                seq=m["seq"],
                turn_id=m["turn_id"],
                created_at=m.get("created_at") or 0.0,
            )
            for m in rows
        ]
    except (KeyError, TypeError, ValueError):
        return ReadBack(pairs=[(str(m.get("role")), str(m.get("content", ""))) for m in rows])
    return ReadBack(messages=messages)


async def http_prefill(
    client: HttpClient,
    text: TurnText,
    run_id: str,
    conv_uid: str,
    start: int,
    count: int,
    concurrency: int = 8,
) -> list[str]:
    """Pre-fill through real turns, a few at a time (each adds a user message
    and a reply), where the store cannot be reached directly."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.post_turn(conv_uid, text.user(f"{run_id} pre{i}"))

    async with asyncio.TaskGroup() as tg:
        for i in range(start, start + count, 2):
            tg.create_task(one(i))
    return []


@contextlib.asynccontextmanager
async def minimal_app_floor(logs: Path, **client_options: Any) -> AsyncIterator[HttpFloor]:
    """The HTTP floor: a minimal ASGI app that returns a fixed completion,
    in its own process under the same uvicorn settings as convcore serve."""
    port = free_port()
    server = ServerProcess(floor_command(port), port, logs / f"floor-{port}.log")
    await server.start()
    try:
        async with HttpClient(server.base_url, **client_options) as client:
            yield HttpFloor(client, server)
    finally:
        server.stop()


class ServiceTarget:
    """A real ``convcore serve`` on a free loopback port, loaded over HTTP from this process."""

    kind = "http"

    def __init__(
        self,
        store_url: str,
        *,
        namespace: Namespace,
        text: TurnText,
        logs: Path,
        latency: float = 0.0,
        tokens_per_second: float = 0.0,
        max_new_tokens: int = 256,
        connections: int = 64,
        turn_timeout: float = 30.0,
        serialize: bool = False,
        prefill_batch: int = 500,
        serve_args: list[str] | None = None,
    ) -> None:
        self.store_url = store_url
        self.name = f"http convcore serve {mask_url(store_url)}"
        self.namespace = namespace
        self.text = text
        self.logs = logs
        self.latency = latency
        self.tokens_per_second = tokens_per_second
        self.max_new_tokens = max_new_tokens
        self.connections = connections
        self.turn_timeout = turn_timeout
        self.serialize = serialize
        self.prefill_batch = prefill_batch
        self.serve_args = serve_args or []
        self.api_key = f"ccbench-{uuid.uuid4().hex}"
        self.store_options: dict[str, Any] = {}
        self.server: ServerProcess | None = None
        self.client: HttpClient | None = None
        self._store: Any = None
        self._prefill: _StorePrefill | None = None
        self._floor_server: ServerProcess | None = None
        self._floor_client: HttpClient | None = None

    def serve_argv(self, port: int) -> tuple[list[str], dict[str, str]]:
        """How ``convcore serve`` is started: argv and extra environment."""
        return serve_command(
            namespaced_url(self.store_url, self.namespace)[0],
            port,
            api_key=self.api_key,
            latency=self.latency,
            tokens_per_second=self.tokens_per_second,
            extra=self.serve_args,
        )

    async def __aenter__(self) -> ServiceTarget:
        # The very store the server opens (same URL, so the same prefix), for
        # the pre-fill and the audit's read-back.
        self._store, self.store_options = open_isolated_store(self.store_url, self.namespace)
        self._prefill = _StorePrefill(self._store, self.namespace.run_id, self.text, self.prefill_batch)
        port = free_port()
        argv, env = self.serve_argv(port)
        self.server = ServerProcess(argv, port, self.logs / f"serve-{port}.log", env)
        await self.server.start()
        self.client = HttpClient(
            self.server.base_url,
            api_key=self.api_key,
            max_new_tokens=self.max_new_tokens,
            connections=self.connections,
            timeout=self.turn_timeout,
            serialize=self.serialize,
        )
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.__aexit__()
        if self.server is not None:
            self.server.stop()
        if self._store is not None:
            await self._store.aclose()

    def floor(self, tail: int) -> Any:
        return minimal_app_floor(
            self.logs,
            api_key=self.api_key,
            max_new_tokens=self.max_new_tokens,
            connections=self.connections,
            timeout=self.turn_timeout,
        )

    async def turn(self, conv_uid: str, text: str) -> Ack:
        assert self.client is not None
        data = await self.client.post_turn(conv_uid, text)
        return Ack(data.get("id"), data.get("conv_uid") or conv_uid)

    @property
    def _private_store(self) -> bool:
        """memory:// lives inside the server process: reach it over HTTP only."""
        return self.store_url.startswith("memory:")

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        if self._private_store:
            assert self.client is not None
            return await http_prefill(self.client, self.text, self.namespace.run_id, conv_uid, start, count)
        assert self._prefill is not None
        return await self._prefill.prefill(conv_uid, start, count)

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        if self._private_store:
            assert self.client is not None
            return await self.client.read_back(conv_uid)
        return ReadBack(messages=await self._store.read_messages(conv_uid))

    async def forget(self, conv_uids: list[str]) -> None:
        for conv_uid in conv_uids:
            with contextlib.suppress(Exception):
                await self._store.delete_conversation(conv_uid)


class EndpointTarget:
    """Someone's deployment: ``--url`` (a base like ``http://host:5670/api/v2``
    or the full chat/completions URL), ``--api-key``, ``--model``.

    Pre-fill runs real turns through the endpoint (it has no faster path),
    so keep ``--history`` small. Read-back uses ``GET …/conversations/{conv_uid}``
    when the server has it; otherwise the run is reported as unaudited.
    The floor is the minimal ASGI app on loopback: what this client alone costs.
    """

    kind = "endpoint"

    def __init__(
        self,
        url: str,
        *,
        namespace: Namespace,
        text: TurnText,
        logs: Path,
        api_key: str | None = None,
        model: str | None = None,
        max_new_tokens: int = 256,
        connections: int = 64,
        turn_timeout: float = 30.0,
        history: str = "server",
        prefill_concurrency: int = 8,
    ) -> None:
        self.url = url
        self.name = f"endpoint {mask_url(url)}"
        self.namespace = namespace
        self.text = text
        self.logs = logs
        self.client = HttpClient(
            url,
            api_key=api_key,
            model=model,
            max_new_tokens=max_new_tokens,
            connections=connections,
            timeout=turn_timeout,
            history=history,
        )
        self.max_new_tokens = max_new_tokens
        self.connections = connections
        self.turn_timeout = turn_timeout
        self.prefill_concurrency = prefill_concurrency

    async def __aenter__(self) -> EndpointTarget:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__()

    def floor(self, tail: int) -> Any:
        return minimal_app_floor(self.logs, max_new_tokens=self.max_new_tokens, connections=self.connections)

    async def turn(self, conv_uid: str, text: str) -> Ack:
        data = await self.client.post_turn(conv_uid, text)
        return Ack(data.get("id"), data.get("conv_uid") or conv_uid)

    async def prefill(self, conv_uid: str, start: int, count: int) -> list[str]:
        return await http_prefill(
            self.client, self.text, self.namespace.run_id, conv_uid, start, count, self.prefill_concurrency
        )

    async def read_back(self, conv_uid: str) -> ReadBack | None:
        return await self.client.read_back(conv_uid)

    async def forget(self, conv_uids: list[str]) -> None:
        import httpx

        if self.client.history == "client":
            return
        for conv_uid in conv_uids:
            with contextlib.suppress(httpx.HTTPError):
                await self.client.client.delete(
                    f"{self.client.api_root}/conversations/{quote(conv_uid, safe='')}"
                )
