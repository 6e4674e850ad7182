"""Distillation losses on a merged static program, addressed by variable name (PaddleSlim's ``dist`` API).

The ops are added to ``program`` (default: the default main program); unknown names fail with the closest names,
mismatched teacher/student shapes fail with both shapes. A teacher name that is a student variable whose merged
teacher copy exists (``"fc_1.tmp_1"`` for ``"teacher_fc_1.tmp_1"``) raises TeacherNameError naming both. No gradient
flows into the teacher side; a loss never sets ``stop_gradient`` on the variables it is given (a teacher side that is
not a merged teacher copy is read through a gradient-free copy).

Example::

    import paddle
    from distill_reader import dist
    dist.merge(teacher_program, student_program, {"image": "image"}, paddle.CPUPlace())
    with paddle.static.program_guard(student_program):
        distill = dist.l2_loss("teacher_fc_0.tmp_1", "fc_0.tmp_1", student_program)
"""
from __future__ import annotations

from typing import Callable

import paddle

from . import functional
from .names import find_teacher_var, find_var
from .pir import legacy_op_errors, require_legacy
from .shapes import check_fsp_shapes, check_same_shape

__all__ = ["fsp_loss", "l2_loss", "kl_div_loss", "soft_label_loss", "loss"]


def _program(program, api: str):
    program = paddle.static.default_main_program() if program is None else program
    require_legacy(f"dist.{api}", program=program)
    return program


def _no_grad(var):
    """``var`` itself when no gradient reaches it (merged teacher copies); else a gradient-free copy of it, so
    the loss never changes ``stop_gradient`` of a variable the student trains through."""
    if var.stop_gradient:
        return var
    copy = paddle.assign(var)
    copy.stop_gradient = True
    return copy


def fsp_loss(teacher_var1_name: str, teacher_var2_name: str, student_var1_name: str, student_var2_name: str,
             program=None):
    """FSP loss: mean squared difference of the teacher's and the student's FSP matrices.

    Each variable is a 4-D feature map ``[N, C, H, W]``; var1 and var2 of one model share N, H and W, and the
    teacher's channel counts equal the student's. Returns a scalar loss variable.

    Example::

        distill = dist.fsp_loss("teacher_t1.tmp_1", "teacher_t2.tmp_1", "s1.tmp_1", "s2.tmp_1", student_program)
    """
    program = _program(program, "fsp_loss")
    names = {"teacher": (teacher_var1_name, teacher_var2_name), "student": (student_var1_name, student_var2_name)}
    pairs = {role: tuple((find_teacher_var if role == "teacher" else find_var)(program, n, f"{role} var{i + 1}")
                         for i, n in enumerate(pair))
             for role, pair in names.items()}
    check_fsp_shapes(pairs, {role: tuple(repr(n) for n in pair) for role, pair in names.items()})
    with paddle.static.program_guard(program):
        return functional._fsp_loss(*(_no_grad(var) for var in pairs["teacher"]), *pairs["student"])


def l2_loss(teacher_var_name: str, student_var_name: str, program=None):
    """``mean((student - teacher) ** 2)``; the two variables must have the same shape.

    Example::

        distill = dist.l2_loss("teacher_t2.tmp_1", "s2.tmp_1", student_program)
    """
    program = _program(program, "l2_loss")
    teacher_var = find_teacher_var(program, teacher_var_name, "teacher var")
    student_var = find_var(program, student_var_name, "student var")
    check_same_shape("l2_loss", teacher_var, student_var, repr(teacher_var_name), repr(student_var_name))
    with paddle.static.program_guard(program):
        return functional._l2_loss(_no_grad(teacher_var), student_var)


def kl_div_loss(student_var_name: str, teacher_var_name: str, program=None, temperature: float = 1.0,
                reduction: str = "batchmean"):
    """KL(teacher || student) of the temperature softmaxes, times T^2 (``dist.functional.kl_div_loss`` by name).

    0 when the student's logits equal the teacher's; the student comes first, as in ``functional.kl_div_loss``.

    Raises:
        VarNotFoundError: a name is not a variable of ``program``.
        ShapeMismatchError: the two variables' shapes differ.
        ValueError: a bad ``temperature`` or ``reduction``.

    Example::

        distill = dist.kl_div_loss("s2.tmp_1", "teacher_t2.tmp_1", student_program, temperature=4.0)
    """
    program = _program(program, "kl_div_loss")
    student_var = find_var(program, student_var_name, "student var")
    teacher_var = find_teacher_var(program, teacher_var_name, "teacher var")
    with paddle.static.program_guard(program):
        return functional.kl_div_loss(student_var, _no_grad(teacher_var), temperature, reduction)


def soft_label_loss(teacher_var_name: str, student_var_name: str, program=None, teacher_temperature: float = 1.0,
                    student_temperature: float = 1.0):
    """PaddleSlim's soft-label cross entropy: ``mean(-sum(softmax(t / Tt) * log(softmax(s / Ts)), axis=-1))``.

    Not 0 when student equals teacher (it keeps the teacher's entropy); ``kl_div_loss`` is the divergence.

    Example::

        distill = dist.soft_label_loss("teacher_t2.tmp_1", "s2.tmp_1", student_program, 1., 1.)
    """
    program = _program(program, "soft_label_loss")
    teacher_var = find_teacher_var(program, teacher_var_name, "teacher var")
    student_var = find_var(program, student_var_name, "student var")
    check_same_shape("soft_label_loss", teacher_var, student_var, repr(teacher_var_name), repr(student_var_name))
    with paddle.static.program_guard(program):
        return functional._soft_label_loss(_no_grad(teacher_var), student_var, teacher_temperature, student_temperature)


def loss(loss_func: Callable, program=None, **kwargs):
    """A custom loss: every keyword whose value is a str is replaced by that variable of ``program``.

    Other keyword values are passed through unchanged. The ops ``loss_func`` builds go into ``program``.

    Example::

        def adaptation_loss(t_var, s_var):
            return paddle.mean(paddle.square(s_var - t_var))
        distill = dist.loss(adaptation_loss, student_program, t_var="teacher_t2.tmp_1", s_var="s2.tmp_1")
    """
    program = _program(program, "loss")
    call_args = {key: (find_var(program, value, f"argument {key!r}") if isinstance(value, str) else value)
                 for key, value in kwargs.items()}
    with paddle.static.program_guard(program), legacy_op_errors("dist.loss"):
        return loss_func(**call_args)
