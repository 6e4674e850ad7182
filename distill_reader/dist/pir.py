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

from distill_reader.paddle_compat import LEGACY_HINT, is_pir_program


class PirProgramError(TypeError):
    """A paddle 3 PIR program given to a part of ``dist`` that works on legacy static programs only."""


def require_legacy(api: str, **programs) -> None:
    """Raise PirProgramError naming ``api`` and the argument when one of ``programs`` is a PIR program."""
    for arg, program in programs.items():
        if program is not None and is_pir_program(program):
            raise PirProgramError(
                f"{api}: {arg} is a paddle 3 PIR program, and {api} needs a legacy static program (it addresses "
                f"variables and ops by name, which PIR programs do not have); {LEGACY_HINT}. On PIR values, "
                "distill_reader.dist.functional builds the same losses")
