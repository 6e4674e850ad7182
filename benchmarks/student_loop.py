"""The student side shared by the benchmarks' "student view" parts: a small dygraph student and its
distillation training loop, so that every student view measures the same work per step.

Example::

    model = lenet_student()
    optimizer = paddle.optimizer.SGD(learning_rate=0.01, parameters=model.parameters())
    rate = steps_per_second(model, optimizer, reader(), steps=150)
"""
from __future__ import annotations

import time
from typing import Iterable

import numpy as np  # noqa: F401, I001  (numpy before paddle)
import paddle


def lenet_student() -> paddle.nn.Layer:
    """LeNet-like CNN for 1x28x28 inputs and 10 classes, as in the MNIST example."""
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(1, 16, 5), paddle.nn.ReLU(), paddle.nn.MaxPool2D(2, 2),
        paddle.nn.Conv2D(16, 32, 5), paddle.nn.ReLU(), paddle.nn.MaxPool2D(2, 2),
        paddle.nn.Flatten(), paddle.nn.Linear(32 * 4 * 4, 10))


def steps_per_second(model: paddle.nn.Layer, optimizer, source: Iterable, steps: int) -> float:
    """Train on ``(img, label, prediction)`` batches (hard-label + soft-label loss); raises unless exactly
    ``steps`` batches came."""
    started = time.perf_counter()
    count = 0
    for img, label, prediction in source:
        logits = model(paddle.to_tensor(img))
        teacher = paddle.nn.functional.softmax(paddle.to_tensor(prediction) / 1000.0)
        loss = paddle.nn.functional.cross_entropy(logits, paddle.to_tensor(label)) + \
            paddle.nn.functional.cross_entropy(logits, teacher, soft_label=True)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        count += 1
    if count != steps:
        raise RuntimeError(f"{count} steps, expected {steps}")
    return steps / (time.perf_counter() - started)
