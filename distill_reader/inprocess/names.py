"""Variable lookup in static programs, with an error that suggests the closest names.

Example::

    from distill_reader.inprocess.names import find_var
    var = find_var(program, "teacher_fc_0.tmp_1")   # VarNotFoundError lists near names if absent
"""
from __future__ import annotations

import difflib
from typing import Iterable, Optional

MAX_SUGGESTIONS = 6
DEFAULT_PREFIX = "teacher_"
_COPIES_ATTR = "_distill_teacher_copies"   # on a student program: {teacher copy's name: teacher's own name}


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
    """The variable ``name`` of ``program``'s global block; VarNotFoundError with near names if absent.

    Raises:
        TypeError: ``name`` is not a string.
        VarNotFoundError: no such variable (the message lists near names).
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a variable name (str), got {type(name).__name__}")
    block = program.global_block()
    if block.has_var(name):
        return block.var(name)
    raise VarNotFoundError(name, closest_names(name, block.vars.keys()), where=f"the program's global block ({what})")


class TeacherNameError(ValueError):
    """A teacher variable given by the name of a student variable while the teacher's merged copy exists.

    ``.name`` is the name given, ``.teacher_name`` the teacher's copy (e.g. ``teacher_fc_1.tmp_1``).
    """

    def __init__(self, name: str, teacher_name: str, what: str):
        self.name, self.teacher_name = name, teacher_name
        super().__init__(f"{what} {name!r} is a variable of the student program, not the teacher's: the teacher's "
                         f"copy is {teacher_name!r} (teacher and student share generated names; dist.merge renamed "
                         f"the teacher's). Use {teacher_name!r}: a loss between the student and itself is 0 and "
                         "teaches nothing")


def record_teacher_copies(program, copies: dict) -> None:
    """Remember on ``program`` which of its variables are teacher copies made by ``dist.merge`` (``{copy's
    name: the teacher's own name}``); several merges add up."""
    recorded = dict(getattr(program, _COPIES_ATTR, None) or {})
    recorded.update(copies)
    setattr(program, _COPIES_ATTR, recorded)


def teacher_copy_of(program, name: str) -> Optional[str]:
    """The merged teacher copy of ``name`` when ``name`` is a student variable whose teacher twin exists, else
    None. Uses the record ``dist.merge`` left on ``program``; without one (a program merged elsewhere, or cloned)
    ``teacher_`` + ``name``."""
    block = program.global_block()
    copies = getattr(program, _COPIES_ATTR, None)
    if copies is None:
        candidate = DEFAULT_PREFIX + name
        return candidate if block.has_var(candidate) and not name.startswith(DEFAULT_PREFIX) else None
    if name in copies:
        return None   # the teacher's copy itself
    twins = sorted(copy for copy, original in copies.items() if original == name and block.has_var(copy))
    return twins[0] if twins else None


def find_teacher_var(program, name: str, what: str = "teacher var"):
    """The teacher variable ``name`` of ``program``; TeacherNameError naming both when ``name`` is the student's
    variable and the teacher's copy exists (``teacher_copy_of``), VarNotFoundError when absent.

    Raises:
        TeacherNameError: ``name`` is the student's variable and the teacher's copy exists.
        VarNotFoundError: no such variable.
    """
    var = find_var(program, name, what)
    twin = teacher_copy_of(program, name)
    if twin is not None:
        raise TeacherNameError(name, twin, what)
    return var
