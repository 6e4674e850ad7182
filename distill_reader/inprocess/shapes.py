"""Shape checks for distillation losses: mismatches fail with both shapes in the message.

Unknown dimensions (-1 or None, e.g. the batch dimension of static variables) match any size.
"""
from __future__ import annotations

from typing import Sequence


class ShapeMismatchError(ValueError):
    """Teacher and student variables whose shapes cannot be combined by a loss."""


def _dims(shape) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


def dims_compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    """True when both shapes have the same rank and every pair of known dimensions is equal."""
    a, b = _dims(a), _dims(b)
    return len(a) == len(b) and all(x < 0 or y < 0 or x == y for x, y in zip(a, b))


def check_same_shape(loss_name: str, teacher, student, teacher_label: str, student_label: str) -> None:
    """Raise ShapeMismatchError unless ``teacher`` and ``student`` have compatible shapes.

    Raises:
        ShapeMismatchError: the shapes are not compatible (names the loss and both variables).
    """
    if not dims_compatible(teacher.shape, student.shape):
        raise ShapeMismatchError(
            f"{loss_name}: teacher {teacher_label} has shape {_dims(teacher.shape)} but student {student_label} has "
            f"shape {_dims(student.shape)}; the shapes must match")


def check_fsp_shapes(pairs: dict[str, tuple[object, object]], labels: dict[str, tuple[str, str]]) -> None:
    """Checks for fsp_loss.

    ``pairs`` maps "teacher"/"student" to (var1, var2). Each var is 4-D [N, C, H, W]; var1 and var2 of one model
    share N, H and W; the teacher's and student's channel counts match (so their FSP matrices have one shape).

    Raises:
        ShapeMismatchError: a variable is not 4-D, a model's pair differs in N/H/W, or teacher and student channel
            counts differ.
    """
    for role, (v1, v2) in pairs.items():
        l1, l2 = labels[role]
        s1, s2 = _dims(v1.shape), _dims(v2.shape)
        for label, shape in ((l1, s1), (l2, s2)):
            if len(shape) != 4:
                raise ShapeMismatchError(f"fsp_loss: {role} {label} has shape {shape}; expected 4-D [N, C, H, W]")
        if not dims_compatible([s1[0], s1[2], s1[3]], [s2[0], s2[2], s2[3]]):
            raise ShapeMismatchError(
                f"fsp_loss: {role} {l1} has shape {s1} and {role} {l2} has shape {s2}; they must agree in every "
                "dimension but the channels (1)")
    (t1, t2), (s1, s2) = pairs["teacher"], pairs["student"]
    for idx, (tv, sv) in enumerate(((t1, s1), (t2, s2)), start=1):
        tc, sc = _dims(tv.shape)[1], _dims(sv.shape)[1]
        if tc >= 0 and sc >= 0 and tc != sc:
            raise ShapeMismatchError(
                f"fsp_loss: teacher {labels['teacher'][idx - 1]} has shape {_dims(tv.shape)} but student "
                f"{labels['student'][idx - 1]} has shape {_dims(sv.shape)}; their channel counts must match")
