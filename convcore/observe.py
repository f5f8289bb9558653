"""Hooks a host fills to see inside a turn: spans, events and attributes.

The engine marks the parts of a turn (``convcore.prepare``,
``convcore.store.read``, ``convcore.generate``, ``convcore.store.append``),
the first token of a stream (event ``first_token``) and what the turn was
(:func:`annotate`: chat_mode, model, outcome, tokens). Nothing happens
unless an :class:`Observer` is installed for the running task with
:func:`observing`; the HTTP adapter installs one per request that feeds
Prometheus metrics and, if installed, OpenTelemetry. This module imports
neither, so ``import convcore`` stays free of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Protocol

__all__ = ["Attr", "Observer", "Span", "annotate", "observing", "span"]

Attr = str | int | float | bool


class Span(Protocol):
    """One timed part of a turn, as the observer keeps it."""

    def set_attribute(self, key: str, value: Attr) -> None: ...

    def add_event(self, name: str) -> None: ...


class Observer(Protocol):
    """Receives the spans and attributes of the turns run while it is installed."""

    def start_span(self, name: str, attributes: Mapping[str, Attr]) -> AbstractContextManager[Span]:
        """A span around a part of the turn; an exception leaving it is the part's failure."""
        ...

    def annotate(self, attributes: Mapping[str, Attr]) -> None:
        """Facts about the whole turn (or request): chat_mode, outcome, token counts."""
        ...


class _NoSpan:
    def set_attribute(self, key: str, value: Attr) -> None:
        return None

    def add_event(self, name: str) -> None:
        return None


_NO_SPAN = _NoSpan()
_current: ContextVar[Observer | None] = ContextVar("convcore_observer", default=None)


@contextmanager
def observing(observer: Observer | None) -> Iterator[None]:
    """Install ``observer`` for this task (and tasks it starts) until the block ends."""
    token = _current.set(observer)
    try:
        yield
    finally:
        _current.reset(token)


class _NoSpanBlock:
    """The block of a span nobody observes: entered and left for nothing."""

    def __enter__(self) -> Span:
        return _NO_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN_BLOCK = _NoSpanBlock()


def span(name: str, **attributes: Attr) -> AbstractContextManager[Span]:
    """A span on the installed observer; a no-op without one (one shared
    object: a turn opens several spans, most of them unobserved)."""
    observer = _current.get()
    if observer is None:
        return _NO_SPAN_BLOCK
    return observer.start_span(name, attributes)


def annotate(**attributes: Attr | None) -> None:
    """Tell the installed observer (if any) facts about the turn; None values are left out."""
    observer = _current.get()
    if observer is not None:
        observer.annotate({k: v for k, v in attributes.items() if v is not None})
