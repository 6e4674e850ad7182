"""Recent request latencies and the delays derived from them (when to hedge, when a teacher has stalled).

Hedging follows Dean and Barroso, "The Tail at Scale" (CACM 56(2), 2013): a request still unanswered after a
high percentile of recent latencies is sent again to another server. The window holds the last ``size``
successful latencies of all teachers.

Example::

    window = LatencyWindow()
    for latency in (0.020, 0.021, 0.019, 0.050):
        window.add(latency)
    window.percentile(95)              # None until ``min_samples`` latencies were seen
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import numpy as np


class LatencyWindow:
    """The last ``size`` latencies (seconds); percentiles once ``min_samples`` were seen."""

    def __init__(self, size: int = 256, min_samples: int = 4):
        self._values: deque[float] = deque(maxlen=size)
        self._min_samples = min_samples
        self._cache: dict[float, float] = {}

    def add(self, latency: float) -> None:
        self._values.append(float(latency))
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._values)

    def percentile(self, q: float) -> Optional[float]:
        """The ``q``-th percentile (0-100) in seconds, or None with fewer than ``min_samples`` latencies."""
        if len(self._values) < self._min_samples:
            return None
        if q not in self._cache:
            self._cache[q] = float(np.percentile(np.fromiter(self._values, float), q))
        return self._cache[q]

    def largest(self) -> Optional[float]:
        """The longest latency in the window (seconds), or None before the first one; known from one latency on."""
        return max(self._values) if self._values else None

    def scaled(self, q: float, factor: float, floor: float, ceiling: float, unknown: float) -> float:
        """``clamp(percentile(q) * factor, floor, ceiling)``; ``unknown`` while the window is too small."""
        value = self.percentile(q)
        if value is None:
            return unknown
        return min(ceiling, max(floor, value * factor))
