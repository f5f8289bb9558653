"""convcore's HTTP adapter: DB-GPT's chat API, OpenAI-compatible, over an engine.

``create_app(engine, api_keys=[...])`` gives an ASGI (FastAPI) app to run
with uvicorn or mount into another service; ``convcore serve`` runs one.
Needs the ``server`` extra: ``pip install "convcore[server]"``.
"""

from .app import API_PREFIX, create_app, error_response
from .auth import APIKeyAuth
from .context import ServerContext, ok
from .errors import ERROR_TABLE, ErrorKind, classify, error_body
from .observability import Observability

__all__ = [
    "API_PREFIX",
    "ERROR_TABLE",
    "APIKeyAuth",
    "ErrorKind",
    "Observability",
    "ServerContext",
    "classify",
    "create_app",
    "error_body",
    "error_response",
    "ok",
]
