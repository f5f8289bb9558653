"""Help text for the benchmark commands: each default shown once, under the command typed."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["DefaultsOnce", "command_typed"]


class DefaultsOnce(argparse.HelpFormatter):
    """Each default once, as it would be typed: options whose help already
    names their default, flags and options without one get no suffix."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or default == []
        ):
            return text
        shown = ",".join(str(v) for v in default) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def command_typed(sub: str = "") -> str:
    """The command as the user typed it (``convcore bench``, ``python -m
    benchmarks``), and ``sub`` after it."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 == "__main__.py":
        package = os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0])))
        command = f"python -m {package}"
    else:
        command = "convcore bench"
    return f"{command} {sub}" if sub else command
