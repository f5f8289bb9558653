"""Exact, offline token counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from convcore import (
    TokenizerError,
    count_message,
    encoding_for_model,
    get_tokenizer,
    register_encoding_file,
    tokens,
)
from convcore.tokens import REPLY_PRIMING_TOKENS

# OpenAI cookbook "How to count tokens with tiktoken": these messages are
# 129 prompt tokens for gpt-4-0613 / gpt-3.5-turbo-0613 (cl100k_base) and
# 124 for gpt-4o (o200k_base).
COOKBOOK = [
    (
        "system",
        None,
        "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    ),
    ("system", "example_user", "New synergies will help drive top-line growth."),
    ("system", "example_assistant", "Things working well together will increase revenue."),
    (
        "system",
        "example_user",
        "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    ),
    ("system", "example_assistant", "Let's talk later when we're less busy about how to do better."),
    ("user", None, "This late pivot means we don't have time to boil the ocean for the client deliverable."),
]


@pytest.mark.parametrize(("encoding", "expected"), [("cl100k_base", 129), ("o200k_base", 124)])
def test_chat_format_count_matches_openai_cookbook(encoding: str, expected: int) -> None:
    tok = get_tokenizer(encoding)
    total = REPLY_PRIMING_TOKENS + sum(count_message(tok, r, c, n) for r, n, c in COOKBOOK)
    assert total == expected


def test_known_token_ids() -> None:
    assert get_tokenizer("cl100k_base").encode("hello world") == [15339, 1917]
    assert get_tokenizer("o200k_base").encode("hello world") == [24912, 2375]


def test_special_token_text_counts_as_plain_text() -> None:
    tok = get_tokenizer()
    assert tok.count("<|endoftext|>") > 1
    assert tok.decode(tok.encode("<|endoftext|> 你好")) == "<|endoftext|> 你好"


def test_model_to_encoding_map_and_fallback() -> None:
    assert encoding_for_model("gpt-4o-mini") == "o200k_base"
    assert encoding_for_model("gpt-4.1") == "o200k_base"
    assert encoding_for_model("gpt-4-0613") == "cl100k_base"
    assert encoding_for_model("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_for_model("qwen2.5-7b") == "cl100k_base"
    assert encoding_for_model(None) == "cl100k_base"


def test_user_supplied_file_is_used_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "p50k_base.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setenv("CONVCORE_TIKTOKEN_DIR", str(tmp_path))
    with pytest.raises(TokenizerError, match="SHA-256 mismatch"):
        get_tokenizer("p50k_base")
    register_encoding_file("r50k_base", tmp_path / "missing.tiktoken")
    with pytest.raises(TokenizerError, match="CONVCORE_TIKTOKEN_DIR"):
        get_tokenizer("r50k_base")


def test_unknown_encoding_is_a_clear_error() -> None:
    with pytest.raises(TokenizerError, match="unknown encoding 'nope'"):
        get_tokenizer("nope")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network (a download fails the test), no files but the installed
    packages' own, and files registered here forgotten afterwards."""
    import requests
    import tiktoken.load

    def download(*args: object, **kwargs: object) -> None:
        pytest.fail(f"tried to download {args}")

    monkeypatch.setattr(tiktoken.load, "read_file", download)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", download)
    monkeypatch.setattr(requests.Session, "request", download)
    for var in ("CONVCORE_TIKTOKEN_DIR", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tokens, "_extra_files", {})
    monkeypatch.setattr(tokens, "_cache", dict(tokens._cache))


@pytest.mark.usefixtures("offline")
def test_gpt2_without_its_file_names_the_file_to_supply() -> None:
    with pytest.raises(TokenizerError, match=r"r50k_base\.tiktoken"):
        get_tokenizer("gpt2")


@pytest.mark.usefixtures("offline")
def test_o200k_harmony_counts_with_o200k_base_ranks() -> None:
    text = "Hello, world! Ünïcödé and 12345 <|start|>"
    harmony, base = get_tokenizer("o200k_harmony"), get_tokenizer("o200k_base")
    assert harmony.name == "o200k_harmony"
    assert harmony.encode(text) == base.encode(text)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("registered_as", ["gpt2", "r50k_base"])
def test_gpt2_file_is_checked_against_r50k_base_digest(registered_as: str, tmp_path: Path) -> None:
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    register_encoding_file(registered_as, bad)
    with pytest.raises(TokenizerError, match="not the official r50k_base file"):
        get_tokenizer("gpt2")


@pytest.mark.usefixtures("offline")
def test_unknown_encoding_lists_every_supported_name() -> None:
    with pytest.raises(TokenizerError, match=r"unknown encoding 'gpt3'.*gpt2.*o200k_harmony"):
        get_tokenizer("gpt3")
