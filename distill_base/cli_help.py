"""One --help style for the project's command lines: every optional flag shows its default.

Example::

    parser = argparse.ArgumentParser(prog="python -m teachers.serve", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--port", type=int, default=9393, help="gRPC port")    # --help: "gRPC port (default: 9393)"
"""
from __future__ import annotations

import argparse

_NO_DEFAULT_SHOWN = (argparse._HelpAction, argparse._VersionAction)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each optional flag's help ends with ``(default: X)`` unless it already says its
    default (``None`` reads "none", a list is joined with spaces). Required flags and suppressed help are left as
    they are."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (isinstance(action, _NO_DEFAULT_SHOWN) or action.required or action.help == argparse.SUPPRESS
                or action.default is argparse.SUPPRESS or "default" in text.lower() or not action.option_strings):
            return text
        return f"{text} (default: {_shown(action.default)})"


def _shown(value: object) -> str:
    if value is None:
        text = "none"
    elif isinstance(value, (list, tuple)):
        text = " ".join(str(v) for v in value if str(v) != "") or "none"
    else:
        text = str(value)
    return text.replace("%", "%%")
