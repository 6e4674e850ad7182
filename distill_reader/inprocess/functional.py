"""Distillation losses on tensors, for dygraph training loops (they also build ops on static variables).

Teacher arguments may be paddle Tensors or NumPy arrays (e.g. the predictions DistillReader appends to a
batch); they are detached, so gradients reach the student only.

Example::

    import numpy as np
    import paddle
    from distill_reader.inprocess import functional as DF

    student_logits = student(images)                      # Tensor, requires grad
    loss = DF.kl_div_loss(student_logits, teacher_logits_np, temperature=2.0)
    loss.backward()

Two soft-label losses, not to be confused: ``kl_div_loss`` is the Kullback-Leibler divergence KL(teacher || student)
of the temperature softmaxes, scaled by T^2 (Hinton et al. 2015): 0 when the student equals the teacher, the loss to
reach for. ``soft_label_loss`` is PaddleSlim's soft-label *cross entropy* H(teacher, student) = KL + H(teacher):
same gradient for the student at T=1, but its value never reaches 0 (it keeps the teacher's entropy) and it is not
scaled by T^2; it is kept for PaddleSlim compatibility.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F

from .pir import legacy_op_errors
from .shapes import check_fsp_shapes, check_same_shape

__all__ = ["fsp_matrix", "fsp_loss", "l2_loss", "kl_div_loss", "soft_label_loss", "loss"]

REDUCTIONS = ("batchmean", "sum", "none")


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


def kl_div_loss(student_logits, teacher_logits, temperature: float = 1.0, reduction: str = "batchmean"):
    """KL(teacher || student) of the temperature softmaxes over the last axis, times ``temperature ** 2``.

    Per row: ``T^2 * sum_k p_k * (log p_k - log q_k)`` with ``p = softmax(teacher / T)``, ``q = softmax(student /
    T)``. It is 0 when the student's logits equal the teacher's, and the T^2 factor keeps the gradient's size
    independent of T (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"). Exact for any logit gap
    (no clipped log). The teacher (a Tensor, a static variable or a NumPy array such as the predictions
    DistillReader appends to a batch) is detached: gradients reach the student only. Works in dygraph, in
    ``paddle.jit.to_static`` functions and on static variables (PIR, and legacy programs of paddle 2.6 and 3.x).
    Not the same as ``soft_label_loss`` (PaddleSlim's cross entropy, which adds the teacher's entropy).

    Args:
        student_logits: the student's logits ``[..., K]`` (pre-softmax).
        teacher_logits: the teacher's logits, same shape.
        temperature: T > 0 for both softmaxes.
        reduction: ``"batchmean"`` (mean over rows of the per-row divergence; for 2-D logits PyTorch's
            ``batchmean``), ``"sum"`` (sum over rows) or ``"none"`` (per row, shape ``[...]``).

    Raises:
        ValueError: ``temperature`` is not a finite positive number, or ``reduction`` is unknown.
        ShapeMismatchError: the teacher's and the student's shapes differ.

    Example::

        loss = kl_div_loss(student(images), batch_teacher_logits, temperature=4.0)
        loss.backward()
    """
    temperature = _check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"kl_div_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    student_logits = _as_student(student_logits)
    teacher_logits = _as_teacher(teacher_logits, student_logits)
    check_same_shape("kl_div_loss", teacher_logits, student_logits, "teacher_logits", "student_logits")
    return _kl_div_loss(student_logits, teacher_logits, temperature, reduction)


def _check_temperature(temperature) -> float:
    value = float(temperature)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def _kl_div_loss(student_logits, teacher_logits, temperature: float, reduction: str):
    teacher_scaled = teacher_logits / temperature
    teacher_log_prob = _log_softmax(teacher_scaled)
    student_log_prob = _log_softmax(student_logits / temperature)
    gap = paddle.subtract(teacher_log_prob, student_log_prob)
    # einsum, mean, reshape: ops that paddle 3's legacy static mode supports (it has no sum/multiply/exp/log there).
    rows = paddle.einsum("...k,...k->...", F.softmax(teacher_scaled, axis=-1), gap) * (temperature * temperature)
    if reduction == "none":
        return rows
    if reduction == "batchmean":
        return paddle.mean(rows)
    flat = paddle.reshape(rows, [-1])
    return paddle.einsum("i,i->", flat, paddle.ones_like(flat))


def soft_label_loss(teacher_var, student_var, teacher_temperature: float = 1.0, student_temperature: float = 1.0):
    """PaddleSlim's soft-label loss: the cross entropy of the student's softmax against the teacher's, mean over rows.

    A cross entropy, not a divergence: its value is ``KL(teacher || student) + H(teacher)``, which never reaches 0
    while the teacher is uncertain. For a loss that is 0 at equality (and scaled by T^2) use ``kl_div_loss``.

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

    Raises:
        ValueError: a name in ``teacher_args`` is not one of the keyword arguments.
        LegacyOpError: on legacy static variables of paddle 3, ``loss_func`` used an op legacy mode lacks.

    Example::

        def hint(t, s):
            return paddle.mean(paddle.abs(s - t))
        value = loss(hint, teacher_args=("t",), t=teacher_out, s=student_out)
    """
    unknown = [name for name in teacher_args if name not in kwargs]
    if unknown:
        raise ValueError(f"teacher_args {unknown} are not keyword arguments of this call (got {sorted(kwargs)})")
    call_args = {name: (_as_teacher(value) if name in teacher_args else value) for name, value in kwargs.items()}
    with legacy_op_errors("dist.functional.loss"):
        return loss_func(**call_args)
