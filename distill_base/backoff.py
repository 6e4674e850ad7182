"""Exponential backoff with jitter: the one delay rule of the reader's retries and probes and of Pantheon's waits.

``d = min(cap, base * 2**(failures - 1))`` and the delay is drawn uniformly from ``[d/2, d]`` ("equal jitter",
AWS Architecture Blog, "Exponential Backoff And Jitter", 2015): retries of many students spread out instead
of hitting a recovering teacher together, and no delay collapses to zero.

Example::

    >>> import random
    >>> 0.05 <= backoff_delay(1, base=0.1, cap=2.0, rng=random.Random(0)) <= 0.1
    True
"""
from __future__ import annotations

import random


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random = random) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure (1-based): in ``[d/2, d]``, ``d`` as above."""
    exp = min(cap, base * (2 ** max(0, failures - 1)))
    return exp / 2 + rng.uniform(0, exp / 2)
