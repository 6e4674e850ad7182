"""Copies of what a user's generator yields, so that no reference to the user's memory outlives the next step.

Generators often reuse one buffer (``buf[:] = X[i]; yield buf, i``; several data libraries do so for speed).
A reader that reads ahead of the student (DistillReader's tasks in flight and reorder buffer, the Pantheon
teacher's batching and prefetch) would otherwise send, store and hand back whatever the buffer holds by then.
``snapshot`` copies every numpy array in a slot value (through lists and tuples, ragged slots included) and
every tensor with a ``clone()`` or ``copy()`` method (paddle, torch); other values (Python numbers, strings, ...)
are immutable or not the reader's to copy and are kept as they are.

Example::

    buf = np.zeros(3)
    kept = snapshot((buf, 7))
    buf[:] = 1
    assert kept[0].sum() == 0 and kept[1] == 7
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["snapshot"]


def snapshot(value: Any) -> Any:
    """A copy of ``value`` that owns its memory: arrays copied, lists and tuples rebuilt around copied items.

    Example::

        snapshot([np.arange(3), 4])   # [array([0, 1, 2]), 4], the array a new one
    """
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple)):
        items = [snapshot(item) for item in value]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)   # namedtuples keep their type
    if hasattr(value, "__array__") and not np.isscalar(value):   # a tensor (paddle, torch): a copy of its type
        for method in ("clone", "copy"):
            copy = getattr(value, method, None)
            if callable(copy):
                return copy()
    return value
