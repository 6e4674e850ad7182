"""Variable lookup in static programs, with an error that suggests the closest names.

Example::

    from distill_reader.dist.names import find_var
    var = find_var(program, "teacher_fc_0.tmp_1")   # VarNotFoundError lists near names if absent
"""
from __future__ import annotations

import difflib
from typing import Iterable

MAX_SUGGESTIONS = 6


class VarNotFoundError(ValueError):
    """A variable name that does not exist in a program. ``.suggestions`` holds the closest names."""

    def __init__(self, name: str, suggestions: list[str], where: str = "the program"):
        self.name = name
        self.suggestions = suggestions
        hint = f"; closest names: {', '.join(repr(s) for s in suggestions)}" if suggestions else ""
        super().__init__(f"variable {name!r} not found in {where}{hint}")


def closest_names(name: str, candidates: Iterable[str], limit: int = MAX_SUGGESTIONS) -> list[str]:
    """Names from ``candidates`` that look most like ``name``.

    Names that end with ``name`` (the same variable with a prefix, e.g. ``teacher_``) or start with it (a
    prefix of the real name) come first, then difflib's close matches.
    """
    pool = sorted(set(candidates))
    affixed = [c for c in pool if c != name and (c.endswith(name) or c.startswith(name))]
    affixed.sort(key=lambda c: (len(c) - len(name), c))
    close = difflib.get_close_matches(name, pool, n=limit, cutoff=0.5)
    ordered: list[str] = []
    for cand in affixed[:limit] + close:
        if cand not in ordered:
            ordered.append(cand)
    return ordered[:limit]


def all_var_names(program) -> list[str]:
    """Names of the variables of every block of ``program``."""
    return [var.name for block in program.blocks for var in block.vars.values()]


def find_var(program, name: str, what: str = "variable"):
    """The variable ``name`` of ``program``'s global block; VarNotFoundError with near names if absent."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a variable name (str), got {type(name).__name__}")
    block = program.global_block()
    if block.has_var(name):
        return block.var(name)
    raise VarNotFoundError(name, closest_names(name, block.vars.keys()), where=f"the program's global block ({what})")
