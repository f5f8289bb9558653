"""load_registry: files (TOML, JSON), $CONVCORE_MODELS (a path or inline JSON), errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from convcore import DEFAULT_MODEL, InvalidRequestError, LocalBackend, MissingDependencyError, ModelRegistry
from convcore.model_config import ENV_VAR, load_registry, parse_models

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "adapters" / "convcore_openai" / "README.md"

TOML = """
[[models]]
name = "remote"
backend = "openai"
base_url = "http://127.0.0.1:9/v1/"
api_key_env = "CONVCORE_TEST_KEY"
context_window = 16000
max_new_tokens = 1000
upstream = "served-name"
encoding = "o200k_base"
timeout = 30
max_retries = 1
owned_by = "acme"

[[models]]
name = "local-fast"
backend = "local"
context_window = 4096
tokens_per_second = 500.0
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("CONVCORE_TEST_KEY", "sk-from-env")
    yield


def names(registry: ModelRegistry) -> list[str]:
    return [spec.name for spec in registry]


def test_neither_path_nor_env_gives_the_default_registry() -> None:
    registry = load_registry()
    assert names(registry) == [DEFAULT_MODEL]
    assert registry.get(None).context_window == 8192


def test_empty_env_gives_the_default_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "  ")
    assert names(load_registry()) == [DEFAULT_MODEL]


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(TOML)
    registry = load_registry(str(path))
    assert names(registry) == ["remote", "local-fast"]
    remote = registry.get("remote")
    assert (remote.context_window, remote.max_new_tokens) == (16000, 1000)
    assert (remote.upstream, remote.encoding, remote.owned_by) == ("served-name", "o200k_base", "acme")
    backend = remote.backend
    assert type(backend).__name__ == "OpenAIBackend"
    assert backend.base_url == "http://127.0.0.1:9/v1"  # type: ignore[attr-defined]
    assert backend._headers["Authorization"] == "Bearer sk-from-env"  # type: ignore[attr-defined]
    assert backend._max_retries == 1  # type: ignore[attr-defined]
    assert "sk-from-env" not in repr(backend)
    local = registry.get("local-fast")
    assert isinstance(local.backend, LocalBackend)
    assert (local.upstream, local.max_new_tokens, local.owned_by) == ("local-fast", 512, "convcore")
    assert registry.get(None).name == "remote", "the first model is the default"


def test_json_file_and_env_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"name": "j", "backend": "local", "context_window": 100}]}))
    monkeypatch.setenv(ENV_VAR, str(path))
    registry = load_registry()
    assert names(registry) == ["j"]
    assert registry.get("j").max_new_tokens == 50, "half a window smaller than 1024"
    # An explicit path wins over the environment.
    other = tmp_path / "other.toml"
    other.write_text('[[models]]\nname = "t"\nbackend = "local"\ncontext_window = 900\n')
    assert names(load_registry(str(other))) == ["t"]


def test_file_without_a_known_suffix(tmp_path: Path) -> None:
    as_json = tmp_path / "models.conf"
    as_json.write_text('{"models": [{"name": "a", "backend": "local", "context_window": 64}]}')
    assert names(load_registry(str(as_json))) == ["a"]
    as_toml = tmp_path / "models.cfg"
    as_toml.write_text('[[models]]\nname = "b"\nbackend = "local"\ncontext_window = 64\n')
    assert names(load_registry(str(as_toml))) == ["b"]


@pytest.mark.parametrize("shape", ["list", "object"])
def test_inline_json_in_the_env(monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    entries = [
        {
            "name": "ollama",
            "backend": "openai",
            "base_url": "http://ollama:11434/v1",
            "context_window": 8192,
            "upstream": "llama3",
        },
        {"name": "demo", "backend": "local", "context_window": 2048, "latency": 0.1},
    ]
    value = json.dumps(entries if shape == "list" else {"models": entries})
    monkeypatch.setenv(ENV_VAR, "  " + value)
    registry = load_registry()
    assert names(registry) == ["ollama", "demo"]
    assert registry.get("ollama").upstream == "llama3"
    assert "Authorization" not in registry.get("ollama").backend._headers  # type: ignore[attr-defined]


def test_identical_connection_settings_share_one_backend() -> None:
    def openai(name: str, **extra: object) -> dict[str, object]:
        return {
            "name": name,
            "backend": "openai",
            "base_url": "http://h:1/v1",
            "context_window": 1000,
        } | extra

    registry = parse_models(
        [
            openai("a", api_key_env="CONVCORE_TEST_KEY"),
            openai("b", upstream="other", max_new_tokens=10, api_key_env="CONVCORE_TEST_KEY"),
            openai("c", api_key="sk-from-env"),  # the same key, given inline: same settings
            openai("d", api_key_env="CONVCORE_TEST_KEY", timeout=5.0),
            openai("e"),
            {"name": "l1", "backend": "local", "context_window": 100},
            {"name": "l2", "backend": "local", "context_window": 200},
            {"name": "l3", "backend": "local", "context_window": 200, "latency": 1.0},
        ]
    )
    backend = {spec.name: spec.backend for spec in registry}
    assert backend["a"] is backend["b"] is backend["c"]
    assert backend["d"] is not backend["a"] and backend["e"] is not backend["a"]
    assert backend["l1"] is backend["l2"] and backend["l3"] is not backend["l1"]
    assert len(registry.backends()) == 5


def test_readme_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    toml = re.search(r"```toml\n(.*?)```", text, re.S)
    inline = re.search(r"CONVCORE_MODELS='(.*?)'", text)
    assert toml and inline
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme")
    path = tmp_path / "models.toml"
    path.write_text(toml.group(1))
    registry = load_registry(str(path))
    assert names(registry) == ["gpt-4o-mini", "o3-mini", "qwen", "qwen-long-replies", "convcore-echo"]
    assert registry.get("gpt-4o-mini").defaults == {"temperature": 0.2, "seed": 7}
    assert registry.get("o3-mini").instruction_role == "developer"
    assert registry.get("gpt-4o-mini").instruction_role == "system"
    assert registry.get("qwen").backend is registry.get("qwen-long-replies").backend
    assert len(registry.backends()) == 3
    monkeypatch.setenv(ENV_VAR, inline.group(1))
    assert names(load_registry()) == ["llama3"]


def test_module_docstring_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import convcore.model_config as module

    doc = module.__doc__ or ""
    example = doc.split("::\n\n", 1)[1].split("\n\nThe JSON form", 1)[0]
    path = tmp_path / "doc.toml"
    path.write_text("\n".join(line.removeprefix("    ") for line in example.splitlines()))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-doc")
    registry = load_registry(str(path))
    assert names(registry) == ["gpt-4o-mini", "convcore-echo"]
    assert registry.get("gpt-4o-mini").defaults == {"temperature": 0.2, "top_p": 0.9}


# -- errors ----------------------------------------------------------------


def entry(**fields: object) -> dict[str, object]:
    return {"name": "m", "backend": "openai", "base_url": "http://h/v1", "context_window": 100} | fields


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        ([entry(base_url=None)], "models[0].base_url", "valid string"),
        ([{k: v for k, v in entry().items() if k != "base_url"}], "models[0].base_url", "required"),
        ([entry(base_url="ftp://h")], "models[0].base_url", "http"),
        ([entry(backend="magic")], "models[0].backend", "'local' or 'openai'"),
        ([{"name": "m", "context_window": 10}], "models[0].backend", "'local' or 'openai'"),
        ([entry(context_window="100")], "models[0].context_window", "integer"),
        ([entry(context_window=1)], "models[0].context_window", "greater than or equal to 2"),
        ([entry(max_new_tokens=100)], "models[0].max_new_tokens", "below context_window"),
        ([entry(max_retries=-1)], "models[0].max_retries", "greater than or equal"),
        ([entry(timeout=0)], "models[0].timeout", "greater than"),
        ([entry(temperature=0.3)], "models[0].temperature", "not permitted"),
        ([entry(latency=1.0)], "models[0].latency", "not permitted"),
        ([entry(api_key="k", api_key_env="CONVCORE_TEST_KEY")], "models[0].api_key", "not both"),
        ([entry(api_key_env="CONVCORE_NO_SUCH_VAR")], "models[0].api_key_env", "CONVCORE_NO_SUCH_VAR"),
        ([entry(), entry(name="n"), entry(name="m")], "models[2].name", "repeats"),
        ([entry(), "oops"], "models[1]", "table"),
        ([], "models", "non-empty"),
        ({"models": [entry()], "default": "m"}, "models", "unknown top-level"),
        ({"model": [entry()]}, "models", "unknown top-level"),
        ("just text", "models", "non-empty list"),
    ],
)
def test_bad_config_names_the_entry_and_field(data: object, field: str, says: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_models(data)
    assert info.value.field == field
    assert says in str(info.value)
    if field.startswith("models[") and isinstance(data, list) and isinstance(data[-1], dict):
        assert "model 'm'" in str(info.value), "the entry is named"


def test_errors_never_show_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (
        entry(api_key="sk-LEAK", api_key_env="CONVCORE_TEST_KEY"),
        entry(api_key="sk-LEAK", context_window="x"),
        entry(api_key="sk-LEAK", max_new_tokens=500),
        entry(api_key=["sk-LEAK"]),
    ):
        with pytest.raises(InvalidRequestError) as info:
            parse_models([bad])
        shown = f"{info.value} {info.value!r} {info.value.__cause__!r} {info.value.__context__!r}"
        assert "LEAK" not in shown


def test_unreadable_and_malformed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_registry(str(tmp_path / "missing.toml"))
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[[models]\nname = ")
    with pytest.raises(InvalidRequestError, match="not valid TOML"):
        load_registry(str(bad_toml))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{nope")
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        load_registry(str(bad_json))
    monkeypatch.setenv(ENV_VAR, "[{broken")
    with pytest.raises(InvalidRequestError, match=r"\$CONVCORE_MODELS is not valid JSON"):
        load_registry()


def test_a_bad_entry_opens_no_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import convcore_openai

    built: list[object] = []

    class Spy(convcore_openai.OpenAIBackend):
        def __init__(self, *args: object, **kwargs: object) -> None:
            built.append(args)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convcore_openai, "OpenAIBackend", Spy)
    with pytest.raises(InvalidRequestError):
        parse_models([entry(name="ok"), entry(name="bad", api_key_env="CONVCORE_NO_SUCH_VAR")])
    assert built == []


def test_missing_httpx_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "convcore_openai" or name.startswith("convcore_openai."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "httpx", None)  # makes `import httpx` fail
    with pytest.raises(MissingDependencyError, match=r'pip install "convcore\[openai\]"') as info:
        parse_models([entry()])
    assert info.value.extra == "openai"
    # A local-only file needs no extra.
    assert names(parse_models([{"name": "l", "backend": "local", "context_window": 10}])) == ["l"]


def test_importing_the_module_pulls_in_no_http_client() -> None:
    code = (
        "import sys, convcore.model_config\n"
        "leaked = [m for m in ('httpx', 'convcore_openai') if m in sys.modules]\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
