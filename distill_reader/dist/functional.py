"""Distillation losses on tensors, for dygraph training loops (they also build ops on static variables).

Teacher arguments may be paddle Tensors or NumPy arrays (e.g. the predictions DistillReader appends to a
batch); they are detached, so gradients reach the student only.

Example::

    import numpy as np
    import paddle
    from distill_reader.dist import functional as DF

    student_logits = student(images)                      # Tensor, requires grad
    loss = DF.soft_label_loss(teacher_logits_np, student_logits, teacher_temperature=2.0)
    loss.backward()
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F

from .shapes import check_fsp_shapes, check_same_shape

__all__ = ["fsp_matrix", "fsp_loss", "l2_loss", "soft_label_loss", "loss"]


def _as_teacher(value, like=None):
    """A Tensor that carries no gradient: NumPy arrays become tensors, tensors are detached."""
    if isinstance(value, np.ndarray):
        dtype = like.dtype if like is not None else None
        return paddle.to_tensor(value, dtype=dtype, stop_gradient=True)
    if paddle.in_dynamic_mode():
        return value.detach()
    value.stop_gradient = True
    return value


def _as_student(value):
    if isinstance(value, np.ndarray):
        return paddle.to_tensor(value)
    return value


def fsp_matrix(x, y):
    """FSP matrix of two 4-D feature maps: ``x [N, C1, H, W]`` and ``y [N, C2, H, W]`` -> ``[N, C1, C2]``.

    ``out[n, i, j] = sum_hw x[n, i, hw] * y[n, j, hw] / (H * W)`` (the C++ ``fsp`` op's definition).
    """
    _, c1, h, w = x.shape
    c2 = y.shape[1]
    x_flat = paddle.reshape(x, [0, c1, -1])
    y_flat = paddle.reshape(y, [0, c2, -1])
    # einsum, not matmul: paddle 3's legacy static mode (FLAGS_enable_pir_api=0) has no matmul/sum/multiply/exp/log
    # for legacy Variables; einsum, max, mean, softmax and log_softmax work in every mode of 2.6 and 3.x.
    product = paddle.einsum("nip,njp->nij", x_flat, y_flat)
    if h is not None and w is not None and h > 0 and w > 0:
        return product / float(h * w)
    area = paddle.cast(paddle.shape(x_flat)[2], product.dtype)
    return product / area


def fsp_loss(teacher_var1, teacher_var2, student_var1, student_var2):
    """Mean squared difference between the student's and the teacher's FSP matrices.

    Example::

        loss = fsp_loss(t_conv1, t_conv3, s_conv1, s_conv2)   # 4-D maps, channels of t1/s1 and t2/s2 equal
    """
    student_var1, student_var2 = _as_student(student_var1), _as_student(student_var2)
    teacher_var1, teacher_var2 = _as_teacher(teacher_var1, student_var1), _as_teacher(teacher_var2, student_var2)
    check_fsp_shapes({"teacher": (teacher_var1, teacher_var2), "student": (student_var1, student_var2)},
                     {"teacher": ("var1", "var2"), "student": ("var1", "var2")})
    return _fsp_loss(teacher_var1, teacher_var2, student_var1, student_var2)


def _fsp_loss(teacher_var1, teacher_var2, student_var1, student_var2):
    teacher_fsp = fsp_matrix(teacher_var1, teacher_var2)
    student_fsp = fsp_matrix(student_var1, student_var2)
    return paddle.mean(paddle.square(paddle.subtract(student_fsp, teacher_fsp)))


def l2_loss(teacher_var, student_var):
    """``mean((student - teacher) ** 2)`` over all elements; shapes must match.

    Example::

        loss = l2_loss(teacher_features, student_features)
    """
    student_var = _as_student(student_var)
    teacher_var = _as_teacher(teacher_var, student_var)
    check_same_shape("l2_loss", teacher_var, student_var, "var", "var")
    return _l2_loss(teacher_var, student_var)


def _l2_loss(teacher_var, student_var):
    return paddle.mean(paddle.square(paddle.subtract(student_var, teacher_var)))


def soft_label_loss(teacher_var, student_var, teacher_temperature: float = 1.0, student_temperature: float = 1.0):
    """Cross entropy of the student's softmax against the teacher's softmax (soft labels), mean over rows.

    ``mean_rows(-sum_last_axis(softmax(t / Tt) * log_softmax(s / Ts)))``, computed stably (teacher logits
    ``[10, 0, 0]`` against student ``[0, 100, 0]`` give 99.995, not a value capped by a clipped log).

    Example::

        loss = soft_label_loss(teacher_logits, student_logits, teacher_temperature=4.0, student_temperature=4.0)
    """
    student_var = _as_student(student_var)
    teacher_var = _as_teacher(teacher_var, student_var)
    check_same_shape("soft_label_loss", teacher_var, student_var, "var", "var")
    return _soft_label_loss(teacher_var, student_var, teacher_temperature, student_temperature)


def _soft_label_loss(teacher_var, student_var, teacher_temperature, student_temperature):
    teacher_prob = F.softmax(teacher_var / float(teacher_temperature), axis=-1)
    student_log_prob = _log_softmax(student_var / float(student_temperature))
    return paddle.mean(-paddle.einsum("...k,...k->...", teacher_prob, student_log_prob))


def _log_softmax(x):
    """``log_softmax`` over the last axis, exact for any logit gap.

    Paddle's CPU ``log_softmax`` kernel clips its results at -64, so a confidently wrong student would get a capped
    loss and no gradient. ``log_softmax(x) = (x - max(x)) - logsumexp(x - max(x))``, and the second term (between
    0 and log(K)) is minus the largest entry of the kernel's own ``log_softmax``, which is never clipped. Only ops
    that paddle 2.6 and 3.x (PIR and legacy mode) all support: max, log_softmax, subtract, add.
    """
    shifted = paddle.subtract(x, paddle.max(x, axis=-1, keepdim=True))
    return paddle.add(shifted, paddle.max(F.log_softmax(x, axis=-1), axis=-1, keepdim=True))


def loss(loss_func: Callable, teacher_args: tuple[str, ...] = (), **kwargs):
    """Call ``loss_func(**kwargs)``; arguments named in ``teacher_args`` are detached (NumPy -> Tensor).

    Example::

        def hint(t, s):
            return paddle.mean(paddle.abs(s - t))
        value = loss(hint, teacher_args=("t",), t=teacher_out, s=student_out)
    """
    unknown = [name for name in teacher_args if name not in kwargs]
    if unknown:
        raise ValueError(f"teacher_args {unknown} are not keyword arguments of this call (got {sorted(kwargs)})")
    call_args = {name: (_as_teacher(value) if name in teacher_args else value) for name, value in kwargs.items()}
    return loss_func(**call_args)
