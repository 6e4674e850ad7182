"""In-process distillation on static graphs: merge a teacher program into a student program, add losses.

Imported by PaddleSlim users under its name there, ``distill_reader.dist`` (an alias module).

The API of PaddleSlim's ``dist`` module (``merge``, ``fsp_loss``, ``l2_loss``, ``soft_label_loss``, ``loss``) on
legacy static graphs (paddle 2.6, or paddle 3 with ``FLAGS_enable_pir_api=0`` set before paddle is imported: PIR
programs raise PirProgramError), plus multi-block teachers, name suggestions, shape checks, student-only checkpoints and
dygraph counterparts of the losses in ``dist.functional``.

Example::

    import numpy as np
    import paddle
    from distill_reader import dist
    paddle.enable_static()
    dist.merge(teacher_program, student_program, {"y": "x"}, paddle.CPUPlace())
    with paddle.static.program_guard(student_program):
        distill = dist.l2_loss("teacher_t2.tmp_1", "s2.tmp_1", student_program)
"""
import numpy  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)

from distill_base.paddle_compat import import_paddle

import_paddle("distill_reader.inprocess")  # one clear ImportError (naming the cpu/gpu extras) without paddle

from . import functional  # noqa: E402
from .checkpoint import load_student_params, save_student_params, student_parameters  # noqa: E402
from .losses import fsp_loss, kl_div_loss, l2_loss, loss, soft_label_loss  # noqa: E402
from .names import TeacherNameError, VarNotFoundError, find_var  # noqa: E402
from .pir import LegacyOpError, PirProgramError  # noqa: E402
from .program_merge import MergeError, merge  # noqa: E402
from .shapes import ShapeMismatchError  # noqa: E402
from .teacher import FrozenTeacher, TeacherFormatError, load_teacher, load_teacher_program  # noqa: E402

__all__ = [
    "merge", "fsp_loss", "l2_loss", "kl_div_loss", "soft_label_loss", "loss", "functional",
    "save_student_params", "load_student_params", "student_parameters",
    "MergeError", "VarNotFoundError", "TeacherNameError", "ShapeMismatchError", "PirProgramError", "LegacyOpError",
    "find_var", "load_teacher", "load_teacher_program", "FrozenTeacher", "TeacherFormatError",
]
