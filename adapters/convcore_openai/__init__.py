"""convcore's OpenAI-compatible model backend (the ``openai`` extra: httpx).

``OpenAIBackend(base_url, api_key=...)`` talks to any server that speaks
``POST {base_url}/chat/completions``: OpenAI, vLLM, Ollama, DB-GPT, convcore.
``convcore.model_config.load_registry()`` builds these from a config file;
the format is in this package's README.md.
"""

from __future__ import annotations

from convcore.errors import MissingDependencyError

try:
    import httpx  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("the OpenAI-compatible backend", "openai") from exc

from .backend import OpenAIBackend

__all__ = ["OpenAIBackend"]
