"""``convcore serve``: run the HTTP service with uvicorn.

Defaults: 127.0.0.1:5670, a SQLite file store, the local model. Every flag
has an environment twin: ``CONVCORE_STORE_URL``, ``CONVCORE_API_KEYS``
(comma-separated), ``CONVCORE_MODELS``. API keys are required; running
without any is said with ``--no-auth``, and is refused on an address other
than loopback unless ``--force`` is given too. Prefer the environment to
``--api-key``: command lines are visible to other users of the machine.

``--workers N`` runs N processes on the one port (uvicorn's supervisor),
each listening on a socket of its own so connections spread evenly (see
:mod:`convcore_server.listen`); each opens its own storage on the same
store URL. :func:`app_factory` is
that worker's app, for running under uvicorn or gunicorn directly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import ipaddress
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from convcore import Compactor, Engine, ModelRegistry, Storage, default_registry, open_store
from convcore.bootstrap import DEFAULT_STORE_URL
from convcore.content import DEFAULT_MAX_INLINE_BYTES
from convcore.errors import ConvcoreError

if TYPE_CHECKING:
    from .limits import ConnectionLimits

__all__ = ["ServeOptions", "UsageError", "app_factory", "is_loopback", "main", "parse_args"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5670
# `convcore serve`'s arguments, handed to each worker process (see app_factory).
ARGV_ENV = "CONVCORE_SERVE_ARGV"


class UsageError(Exception):
    """The command line asks for something the service will not do."""


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    store_url: str
    api_keys: tuple[str, ...]
    user_keys: tuple[tuple[str, str], ...]
    no_auth: bool
    force: bool
    models_path: str | None
    models_env: bool
    local_latency: float
    local_tokens_per_second: float
    max_body_bytes: int
    max_message_chars: int
    log_level: str
    access_log: bool
    sqlite_roots: tuple[str, ...] = ()
    compaction: bool = False
    max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024
    metrics: bool = True
    metrics_key: str | None = None
    otel: bool = False
    log_format: str = "text"
    docs: Literal["public", "keyed", "off"] = "public"
    ready_timeout: float = 2.0
    workers: int = 1


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; names other than that count as public."""
    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    from .body import DEFAULT_MAX_BODY_BYTES
    from .context import DEFAULT_MAX_MESSAGE_CHARS

    p = argparse.ArgumentParser(
        prog=command_typed(), description="Run the convcore HTTP service with uvicorn."
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument(
        "--store", default=None, help=f"store URL (default $CONVCORE_STORE_URL or {DEFAULT_STORE_URL})"
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="an accepted Bearer key; repeat for several (also $CONVCORE_API_KEYS, comma-separated)",
    )
    p.add_argument(
        "--user-key",
        action="append",
        default=[],
        metavar="USER:KEY",
        help="a Bearer key that acts as USER (its requests see only USER's conversations); repeat for "
        "several (also $CONVCORE_USER_KEYS, comma-separated USER:KEY pairs)",
    )
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (loopback only)")
    p.add_argument("--force", action="store_true", help="allow --no-auth on a non-loopback address")
    p.add_argument(
        "--models", default=None, help="models file, TOML or JSON (default: $CONVCORE_MODELS, a path or JSON)"
    )
    p.add_argument(
        "--local-latency",
        type=float,
        default=0.0,
        help="seconds before the local model's first token (default: %(default)s)",
    )
    p.add_argument(
        "--local-tokens-per-second",
        type=float,
        default=0.0,
        help="the local model's pace in tokens per second, 0 for unpaced (default: %(default)s)",
    )
    p.add_argument(
        "--sqlite-root",
        action="append",
        default=[],
        help="a directory chat_data's SQLite datasources may open files in; repeat for several "
        f"(also $CONVCORE_SQLITE_ROOTS, {os.pathsep!r}-separated). Without one, SQLite datasources "
        "are refused; the store's own file always is",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="the largest request body; larger ones are answered 413 (default: %(default)s)",
    )
    p.add_argument(
        "--max-message-chars",
        type=int,
        default=DEFAULT_MAX_MESSAGE_CHARS,
        help="the longest text one message may have (default: %(default)s)",
    )
    p.add_argument(
        "--max-inline-bytes",
        type=int,
        default=DEFAULT_MAX_INLINE_BYTES,
        help="the largest data URL or base64 audio/file one content part may carry (default: %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a request's line and headers (default: %(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client may pause while sending a request body (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="open connections served at once; more are answered 503 (default: %(default)s)",
    )
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument(
        "--metrics-key",
        default=None,
        help="a Bearer key for /metrics only (also $CONVCORE_METRICS_KEY); without one, /metrics takes "
        "the --api-key keys",
    )
    p.add_argument(
        "--otel", action="store_true", help="send OpenTelemetry spans over OTLP/HTTP (OTEL_* variables apply)"
    )
    p.add_argument(
        "--docs",
        default="public",
        choices=["public", "keyed", "off"],
        help="/docs and /openapi.json: for anyone (public), only with an API key (keyed), or not at all "
        "(off) (default: %(default)s)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=2.0,
        help="seconds each /readyz check may take (default: %(default)s)",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text or JSON (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("CONVCORE_WORKERS", "1") or 1),
        help="processes serving the port, each with its own connections to the store "
        "(default: $CONVCORE_WORKERS or 1)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    p.add_argument(
        "--compaction",
        action="store_true",
        help="summarise rounds that leave the window through the conversation's model (requests may opt out)",
    )
    return p


def command_typed() -> str:
    """``convcore serve``, or ``python -m convcore serve`` when started that way (for usage lines)."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "python -m convcore serve" if argv0 == "__main__.py" else "convcore serve"


def parse_args(argv: Sequence[str], environ: dict[str, str] | None = None) -> ServeOptions:
    """Options from ``argv`` and ``environ``; UsageError if they are unsafe or contradictory."""
    env = os.environ if environ is None else environ
    ns = _parser().parse_args(list(argv))
    keys = [k.strip() for k in ns.api_key if k.strip()]
    keys += [k.strip() for k in env.get("CONVCORE_API_KEYS", "").split(",") if k.strip()]
    pairs = [p.strip() for p in ns.user_key if p.strip()]
    pairs += [p.strip() for p in env.get("CONVCORE_USER_KEYS", "").split(",") if p.strip()]
    user_keys: dict[str, str] = {}
    for pair in pairs:
        user, sep, key = pair.partition(":")
        if not sep or not user.strip() or not key.strip():
            raise UsageError("--user-key (and CONVCORE_USER_KEYS) take USER:KEY pairs")
        user_keys[key.strip()] = user.strip()
    if set(user_keys) & set(keys):
        raise UsageError("a key cannot be both unbound (--api-key) and bound to a user (--user-key)")
    if not 0 < ns.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {ns.port}")
    if (keys or user_keys) and ns.no_auth:
        raise UsageError("--no-auth contradicts the API keys given (--api-key or CONVCORE_API_KEYS)")
    if not keys and not user_keys and not ns.no_auth:
        raise UsageError(
            "no API keys: pass --api-key KEY (or set CONVCORE_API_KEYS=k1,k2), "
            "or --no-auth to serve without authentication"
        )
    if ns.no_auth and not is_loopback(ns.host) and not ns.force:
        raise UsageError(
            f"refusing to serve without API keys on {ns.host}, which is not a loopback address; "
            "give API keys, bind 127.0.0.1, or add --force"
        )
    if not 1 <= ns.workers <= 256:
        raise UsageError(f"--workers must be between 1 and 256, got {ns.workers}")
    if ns.workers > 1 and _is_memory_store(ns.store or env.get("CONVCORE_STORE_URL") or DEFAULT_STORE_URL):
        raise UsageError("--workers above 1 needs a store the processes share; memory:// is per process")
    if ns.max_body_bytes < 1 or ns.max_message_chars < 1 or ns.max_inline_bytes < 1:
        raise UsageError("--max-body-bytes, --max-message-chars and --max-inline-bytes must be positive")
    if not (
        ns.header_timeout > 0 and ns.body_timeout > 0 and ns.max_connections > 0 and ns.ready_timeout > 0
    ):
        raise UsageError(
            "--header-timeout, --body-timeout, --max-connections and --ready-timeout must be positive"
        )
    return ServeOptions(
        host=ns.host,
        port=ns.port,
        store_url=ns.store or env.get("CONVCORE_STORE_URL") or DEFAULT_STORE_URL,
        api_keys=tuple(dict.fromkeys(keys)),
        user_keys=tuple(user_keys.items()),
        no_auth=ns.no_auth,
        force=ns.force,
        models_path=ns.models,
        models_env=not ns.models and bool(env.get("CONVCORE_MODELS", "").strip()),
        local_latency=ns.local_latency,
        local_tokens_per_second=ns.local_tokens_per_second,
        max_body_bytes=ns.max_body_bytes,
        max_message_chars=ns.max_message_chars,
        max_inline_bytes=ns.max_inline_bytes,
        log_level=ns.log_level,
        access_log=not ns.no_access_log,
        compaction=ns.compaction,
        header_timeout=ns.header_timeout,
        body_timeout=ns.body_timeout,
        max_connections=ns.max_connections,
        metrics=not ns.no_metrics,
        metrics_key=ns.metrics_key or env.get("CONVCORE_METRICS_KEY") or None,
        otel=ns.otel,
        log_format=ns.log_format,
        docs=ns.docs,
        ready_timeout=ns.ready_timeout,
        workers=ns.workers,
        sqlite_roots=tuple(
            r.strip()
            for r in [*ns.sqlite_root, *env.get("CONVCORE_SQLITE_ROOTS", "").split(os.pathsep)]
            if r.strip()
        ),
    )


def load_models(opts: ServeOptions) -> ModelRegistry:
    """The models file's (or ``$CONVCORE_MODELS``'s) registry, else the local model."""
    if opts.models_path is None and not opts.models_env:
        return default_registry(latency=opts.local_latency, tokens_per_second=opts.local_tokens_per_second)
    try:
        from convcore.model_config import load_registry  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name != "convcore.model_config":
            raise
        raise UsageError("a models file needs convcore.model_config, which this install lacks") from exc
    # With no path it reads $CONVCORE_MODELS itself (a path, or inline JSON).
    registry: ModelRegistry = load_registry(opts.models_path)
    return registry


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _is_memory_store(url: str) -> bool:
    return url.split("://", 1)[0].lower() == "memory" or url.rstrip("/").endswith(":memory:")


def build_service(opts: ServeOptions) -> tuple[Any, Engine, Any]:
    """The service's app, its engine (on a storage of its own) and the
    scenes kit (None without the scenes extra). Nothing is opened yet: the
    caller readies the kit (``await kit.ready()``) and closes the
    engine, which closes the storage."""
    from .app import create_app
    from .observability import Observability

    if opts.otel:
        from .tracing import install_sdk

        install_sdk()

    models = load_models(opts)
    # One storage, one connection pool: the engine's conversations and the
    # scenes' records share it, and closing the engine closes it.
    store = open_store(opts.store_url)
    kit = _scene_kit(store, opts.store_url, opts.sqlite_roots)
    scenes = kit.scenes() if kit is not None else []
    compaction = Compactor(store.records) if opts.compaction else None
    engine = Engine(
        store,
        models,
        owned=True,
        scenes=scenes,
        max_inline_bytes=opts.max_inline_bytes,
        compaction=compaction,
    )
    if kit is not None:
        kit.use_registry(engine.scenes)  # flow steps may name any scene the engine has
    app = create_app(
        engine,
        api_keys=opts.api_keys,
        user_keys=dict(opts.user_keys),
        allow_anonymous=opts.no_auth,
        max_body_bytes=opts.max_body_bytes,
        max_message_chars=opts.max_message_chars,
        extra_routers=kit.routers() if kit is not None else (),
        docs=opts.docs,
        observability=Observability(
            metrics=opts.metrics,
            metrics_key=opts.metrics_key,
            tracing=opts.otel,
            ready_timeout=opts.ready_timeout,
        ),
    )
    return app, engine, kit


def app_factory() -> Any:
    """One worker's app, from the arguments in ``$CONVCORE_SERVE_ARGV`` (a
    JSON list, as given to ``convcore serve``) and the environment; its
    lifespan readies the scenes and closes the engine::

        CONVCORE_SERVE_ARGV='["--store", "redis://…"]' CONVCORE_API_KEYS=k \\
            uvicorn --factory convcore_server.cli:app_factory --workers 2 --port 5670
    """
    try:
        argv = json.loads(os.environ.get(ARGV_ENV, "[]"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"${ARGV_ENV} must be a JSON list of arguments: {exc}") from exc
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise UsageError(f"${ARGV_ENV} must be a JSON list of strings")
    app, engine, kit = build_service(parse_args(argv))
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[None]:
        async with engine:
            if kit is not None:
                await kit.ready()  # passwords sealed, older datasources' files claimed
            async with inner(a):
                freeze_startup_objects()
                yield

    app.router.lifespan_context = lifespan
    return app


def _limits(opts: ServeOptions) -> ConnectionLimits:
    from .limits import ConnectionLimits

    return ConnectionLimits(opts.header_timeout, opts.body_timeout, opts.max_connections)


def _banner(opts: ServeOptions, models: str) -> None:
    n_keys = len(opts.api_keys) + len(opts.user_keys)
    bound = len(opts.user_keys)
    auth = f"{n_keys} API key(s), {bound} bound to a user" if n_keys else "NO authentication"
    workers = f" workers={opts.workers}" if opts.workers > 1 else ""
    line = (
        f"convcore serve: http://{opts.host}:{opts.port}/api/v2 store={redact(opts.store_url)} "
        f"models={models} auth={auth}{workers}"
    )
    if opts.log_format == "json":  # one JSON object a line, like every other line then
        from .logs import JSONFormatter

        line = JSONFormatter().format(
            logging.LogRecord("convcore.serve", logging.INFO, __file__, 0, line, None, None)
        )
    print(line, file=sys.stderr, flush=True)


async def serve(opts: ServeOptions) -> int:
    import uvicorn

    app, engine, kit = build_service(opts)
    async with engine:
        if kit is not None:
            await kit.ready()  # passwords sealed, older datasources' files claimed
        names = ", ".join(spec.name for spec in engine.models)
        freeze_startup_objects()
        return await _run(uvicorn, app, opts, f"[{names}]")


def freeze_startup_objects() -> None:
    """Keep what starting the service made out of the garbage collector's
    full passes. Modules, schemas, the app and the engine live as long as
    the process (over 100,000 objects), and every full pass walked them
    all: on SQLite, one took up to 124 ms and together they cost about
    140 µs a turn (64 clients, 3,840 turns, in process). Frozen, a full
    pass walks only what turns made, and its longest pause was 31 ms."""
    gc.collect()
    gc.freeze()


def _uvicorn_options(opts: ServeOptions) -> dict[str, Any]:
    """What one process and a supervisor of workers configure alike."""
    from .logs import log_config

    return {
        "host": opts.host,
        "port": opts.port,
        "log_level": opts.log_level,
        "log_config": log_config(opts.log_format, opts.log_level),
        "access_log": opts.access_log,
        "server_header": False,
        "timeout_keep_alive": 5,
    }


async def _run(uvicorn: Any, app: Any, opts: ServeOptions, models: str) -> int:
    from .limits import guarded_h11

    config = uvicorn.Config(app, http=guarded_h11(_limits(opts)), **_uvicorn_options(opts))
    server = uvicorn.Server(config)
    _banner(opts, models)
    await server.serve()
    return 0 if server.started else 1


def serve_workers(opts: ServeOptions, argv: Sequence[str]) -> int:
    """``opts.workers`` processes under uvicorn's supervisor, each building
    its app with :func:`app_factory` from the same arguments."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from .limits import LIMITS_ENV, GuardedH11Protocol
    from .listen import worker_socket

    os.environ[ARGV_ENV] = json.dumps(list(argv))
    # The worker processes are spawned: they find the limits in their
    # environment, and the protocol class by its module-level name.
    os.environ[LIMITS_ENV] = json.dumps(dataclasses.asdict(_limits(opts)))
    config = uvicorn.Config(
        "convcore_server.cli:app_factory",
        factory=True,
        workers=opts.workers,
        http=GuardedH11Protocol,
        **_uvicorn_options(opts),
    )
    try:
        sock = worker_socket(opts.host, opts.port, config.backlog)
    except OSError as exc:
        raise OSError(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}") from exc
    _banner(opts, "(loaded by each worker)")
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
    return 0


def _scene_kit(store: Storage, store_url: str, sqlite_roots: Sequence[str] = ()) -> Any:
    """chat_app/data/knowledge/flow and their APIs, kept in the same storage
    as the conversations; None (chat_normal only) without the scenes extra.

    SQLite datasources may open files only under ``sqlite_roots`` (none
    without), and never the store itself (its file, or its server database):
    it holds every conversation and every datasource's password. Passwords
    are sealed with ``$CONVCORE_SECRET_KEYS`` / ``$CONVCORE_SECRET_KEY_FILE``."""
    try:
        from convcore_scenes import SceneKit
        from convcore_scenes.secret_box import SecretBox
    except ImportError:
        print(
            'convcore serve: chat_app/chat_data/chat_knowledge/chat_flow need pip install "convcore[scenes]"',
            file=sys.stderr,
        )
        return None
    return SceneKit(
        store.records,
        sqlite_roots=list(sqlite_roots),
        secrets=SecretBox.from_env(os.environ),
        store_url=store_url,
    )


def main(argv: Sequence[str]) -> int:
    """Entry point of ``convcore serve``; returns the exit status."""
    try:
        opts = parse_args(argv)
        if opts.workers > 1:
            return serve_workers(opts, argv)
        return asyncio.run(serve(opts))
    except UsageError as exc:
        print(f"convcore serve: {exc}", file=sys.stderr)
        return 2
    except (ConvcoreError, OSError) as exc:
        print(f"convcore serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
