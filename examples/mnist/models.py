"""Static-graph networks of the example: a LeNet-style teacher CNN and a small student MLP.

Each builder takes the ``img`` data variable (``[None, 1, 28, 28]`` float32) and returns ``(logits, prediction)``
where ``prediction`` is the softmax the teacher serves and the student is evaluated on.

Example::

    paddle.enable_static()
    with paddle.static.program_guard(main, startup):
        img = paddle.static.data("img", [None, 1, 28, 28], "float32")
        logits, prediction = build_model("teacher", img)
"""
from __future__ import annotations

import numpy  # noqa: F401  (numpy before paddle)
import paddle
import paddle.nn.functional as F

STUDENT_HIDDEN = 128


def teacher_cnn(img):
    """Two conv(5x5)+ReLU+max-pool blocks (20 and 50 filters, batch norm between) and a linear layer: the seed's
    LeNet. About 99% on MNIST after a few epochs."""
    x = paddle.static.nn.conv2d(img, num_filters=20, filter_size=5, act="relu")
    x = F.max_pool2d(x, kernel_size=2, stride=2)
    x = paddle.static.nn.batch_norm(x)
    x = paddle.static.nn.conv2d(x, num_filters=50, filter_size=5, act="relu")
    x = F.max_pool2d(x, kernel_size=2, stride=2)
    logits = paddle.static.nn.fc(paddle.flatten(x, 1), size=10)
    return logits, F.softmax(logits)


def student_mlp(img, hidden: int = STUDENT_HIDDEN):
    """784 -> ``hidden`` (ReLU) -> 10: small and fast (128 units: 102k weights), weaker than the teacher."""
    x = paddle.static.nn.fc(paddle.flatten(img, 1), size=hidden, activation="relu")
    logits = paddle.static.nn.fc(x, size=10)
    return logits, F.softmax(logits)


MODELS = {"teacher": teacher_cnn, "student": student_mlp}


def build_model(kind: str, img, student_hidden: int = STUDENT_HIDDEN):
    """``kind`` is ``teacher`` (CNN) or ``student`` (MLP with ``student_hidden`` units)."""
    if kind == "teacher":
        return teacher_cnn(img)
    if kind == "student":
        return student_mlp(img, student_hidden)
    raise ValueError(f"unknown model {kind!r}; choose one of {sorted(MODELS)}")


def distill_loss(logits, prediction, soft_label, temperature: float = 1.0):
    """Soft-label cross entropy of the student against the teacher's served softmax ``soft_label``.

    With ``temperature == 1`` this is the seed's ``cross_entropy(prediction, soft_label, soft_label=True)``.
    Above 1 both sides are softened (Hinton et al.): the teacher's probabilities become
    ``softmax(log(p) / T)``, the student's ``softmax(logits / T)``, and the loss is scaled by ``T**2``.
    ``log(p)`` is the teacher's logits minus a per-sample constant, so the softened target equals
    ``softmax(teacher_logits / T)`` (probabilities that underflowed to 0 in float32 are clipped at 1e-30).
    """
    if temperature == 1.0:
        per_sample = F.cross_entropy(prediction, soft_label, soft_label=True, use_softmax=False, reduction="none")
        return paddle.mean(per_sample)
    # softmax(log(p) / T) == p ** (1 / T) / sum(p ** (1 / T)), written without log and sum: paddle 3.3's legacy
    # static mode (FLAGS_enable_pir_api=0, which this static-graph example uses) has neither for legacy Variables.
    powered = paddle.pow(paddle.clip(soft_label, min=1e-30), 1.0 / temperature)
    target = powered / (paddle.mean(powered, axis=-1, keepdim=True) * float(soft_label.shape[-1]))
    per_sample = F.cross_entropy(logits / temperature, target, soft_label=True, use_softmax=True, reduction="none")
    return paddle.mean(per_sample) * (temperature ** 2)
