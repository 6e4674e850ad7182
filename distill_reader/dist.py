"""``distill_reader.dist``: PaddleSlim's name for in-process distillation, kept for its users.

The code lives in ``distill_reader.inprocess``: a folder named ``dist/`` is what setuptools, wheel and most
``.gitignore`` files take for build output. This module only re-exports ``distill_reader.inprocess``'s public names,
and makes its submodules importable under this name too (``from distill_reader.dist.functional import
kl_div_loss``; ``distill_reader.dist.merge`` the module is ``program_merge``), so that code written against
``distill_reader.dist`` keeps working unchanged.

Example::

    from distill_reader import dist                        # as ``from paddleslim import dist``
    dist.merge(teacher_program, student_program, {"y": "x"}, paddle.CPUPlace())
    loss = dist.functional.kl_div_loss(student_logits, teacher_logits, temperature=4.0)
"""
import importlib as _importlib
import sys as _sys

from .inprocess import *  # noqa: F403 - the alias re-exports every public name
from .inprocess import __all__  # noqa: F401

for _old, _new in (("functional", "functional"), ("losses", "losses"), ("checkpoint", "checkpoint"),
                   ("names", "names"), ("pir", "pir"), ("shapes", "shapes"), ("teacher", "teacher"),
                   ("merge", "program_merge")):
    _sys.modules[f"{__name__}.{_old}"] = _importlib.import_module(f"{__package__}.inprocess.{_new}")
