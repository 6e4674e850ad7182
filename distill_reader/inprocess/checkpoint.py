"""Save and load only the student's parameters of a merged program (no teacher variables in checkpoints).

``merge`` adds the teacher's tensors as plain persistable variables, not Parameters, so the program's
Parameters are exactly the student's (weights, biases, batch-norm statistics). The files are written by
Paddle's ``save_combine`` / ``save`` ops (no pickle).

Example::

    from distill_reader import dist
    dist.save_student_params(exe, "ckpt", student_program, filename="student.pdiparams")
    dist.load_student_params(exe, "ckpt", student_program, filename="student.pdiparams")
"""
from __future__ import annotations

import logging
import os

import paddle

from .pir import require_legacy

__all__ = ["student_parameters", "save_student_params", "load_student_params"]

logger = logging.getLogger(__name__)


def student_parameters(program=None, exclude_prefix: str | None = None) -> list:
    """The Parameters of ``program`` (default main program), skipping names that start with ``exclude_prefix``."""
    program = paddle.static.default_main_program() if program is None else program
    require_legacy("dist.student_parameters", program=program)
    params = program.global_block().all_parameters()
    if exclude_prefix:
        params = [p for p in params if not p.name.startswith(exclude_prefix)]
    return params


def save_student_params(executor, dirname: str | os.PathLike, program=None, filename: str | None = None, scope=None,
                        exclude_prefix: str | None = None) -> list[str]:
    """Write the student's parameters to ``dirname`` (one file each, or all in ``filename``); returns their names.

    Raises:
        ValueError: the program has no student parameters.
    """
    dirname = os.fspath(dirname)
    program = paddle.static.default_main_program() if program is None else program
    params = student_parameters(program, exclude_prefix)
    if not params:
        raise ValueError("the program has no student parameters to save")
    os.makedirs(dirname, exist_ok=True)
    scope = paddle.static.global_scope() if scope is None else scope
    with paddle.static.scope_guard(scope):
        paddle.static.save_vars(executor, dirname, main_program=program, vars=params, filename=filename)
    names = [p.name for p in params]
    logger.info("saved %d student parameters to %s", len(names), os.path.join(dirname, filename or ""))
    return names


def load_student_params(executor, dirname: str | os.PathLike, program=None, filename: str | None = None, scope=None,
                        exclude_prefix: str | None = None) -> list[str]:
    """Load what ``save_student_params`` wrote into ``scope`` (default global scope); returns the names loaded."""
    dirname = os.fspath(dirname)
    program = paddle.static.default_main_program() if program is None else program
    params = student_parameters(program, exclude_prefix)
    scope = paddle.static.global_scope() if scope is None else scope
    with paddle.static.scope_guard(scope):
        paddle.static.load_vars(executor, dirname, main_program=program, vars=params, filename=filename)
    return [p.name for p in params]
