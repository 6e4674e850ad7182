"""Paddle 3's PIR programs and the name-addressed static API of ``dist``.

``merge`` rewrites a teacher program's variables and op descriptions by name, and the static losses find
variables by name; PIR programs (paddle 3's default static programs) have neither named variables nor editable op
descriptions, so these parts need legacy programs. On PIR values use ``dist.functional`` instead (it builds the
same losses on ``Value``s or dygraph tensors).

Example::

    import os
    os.environ["FLAGS_enable_pir_api"] = "0"   # before paddle is imported: legacy static programs on paddle 3
    import paddle
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

from distill_base.paddle_compat import LEGACY_HINT, is_pir_program

_MISSING_OP = re.compile(r"(\w+)\(\): argument \(position \d+\) must be Value, but got Variable")
LEGACY_OPS_HINT = ("ops that work on legacy variables in every paddle line include paddle.mean, paddle.max, "
                   "paddle.square, paddle.subtract, paddle.add, paddle.einsum (for sums and products), "
                   "paddle.reshape, F.softmax, F.log_softmax and the + - * / operators")


class LegacyOpError(TypeError):
    """A custom loss used an op that paddle 3's legacy static mode does not offer for legacy variables."""

    def __init__(self, message: str, op: str):
        super().__init__(message)
        self.op = op


@contextlib.contextmanager
def legacy_op_errors(api: str) -> Iterator[None]:
    """Turn paddle 3's raw ``abs(): argument ... must be Value, but got Variable`` into a LegacyOpError naming the op.

    Raises:
        LegacyOpError: an op inside the block has no legacy-variable form in this paddle.
    """
    try:
        yield
    except TypeError as exc:
        found = _MISSING_OP.search(str(exc))
        if found is None:
            raise
        op = found.group(1)
        raise LegacyOpError(
            f"{api}: paddle.{op} (used by the loss function) has no legacy static form in this paddle: paddle 3's "
            f"legacy mode (FLAGS_enable_pir_api=0 / OldIrGuard) runs only some ops on legacy variables; "
            f"{LEGACY_OPS_HINT}. Or leave legacy mode: build the student in dygraph or PIR and use "
            "distill_reader.dist.functional (a paddle 3 teacher: distill_reader.dist.load_teacher)", op) from exc


class PirProgramError(TypeError):
    """A paddle 3 PIR program given to a part of ``dist`` that works on legacy static programs only."""


def require_legacy(api: str, **programs) -> None:
    """Raise PirProgramError naming ``api`` and the argument when one of ``programs`` is a PIR program.

    Raises:
        PirProgramError: one of ``programs`` is a PIR program (names ``api`` and the argument).
    """
    for arg, program in programs.items():
        if program is not None and is_pir_program(program):
            raise PirProgramError(
                f"{api}: {arg} is a paddle 3 PIR program, and {api} needs a legacy static program (it addresses "
                f"variables and ops by name, which PIR programs do not have); {LEGACY_HINT}. Or, without legacy "
                "mode: load the teacher with distill_reader.dist.load_teacher(path) and call it inside a dygraph or "
                "paddle.jit.to_static student, with the losses of distill_reader.dist.functional (they also build "
                "on PIR values)")
