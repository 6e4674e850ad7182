"""The default routing policy: earliest expected finish by a peak-EWMA service-time estimate.

Each teacher's estimate is seconds per request at its measured throughput (an EWMA of answer latency divided by
the requests it had in flight, kept by the pool), raised at once by a request out for longer than the estimate
says (Finagle's "peak EWMA"; the teacher's network round trip deducted), and, while it is not refreshed,
decaying toward the fastest teacher's so that a teacher that was slow is tried again (time constant
``decay_s``). The teacher that would finish one more request first,
``(max(0, outstanding - in_transit) + queued + 1) * estimate``, is preferred (requests in transit on a far
teacher's link are not queued at it); ties go to the less loaded, then the least recently used. So a teacher
at 10x the others' latency gets work only when the fast ones have ten times its queue: less, not none. A far
teacher whose window grew with its round trip (routing/window.py) has a per-request estimate as small as a
near one's at the same throughput, so it gets its share.

Example::

    policy = PeakEwmaPolicy()
    best = policy.choose(views, time.monotonic())[0]
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from . import TeacherView

ESTIMATE_DECAY_S = 2.0   # an estimate not refreshed for this long moves 1/e of the way to the fastest teacher's


class PeakEwmaPolicy:
    """Rank teachers by expected finish time ``(outstanding + queued + 1) * peak-EWMA estimate``.

    Args:
        decay_s: time constant (seconds) of a stale estimate's decay toward the fastest teacher's.
    """

    def __init__(self, decay_s: float = ESTIMATE_DECAY_S):
        """Check the arguments.

        Raises:
            ValueError: ``decay_s`` <= 0.
        """
        if decay_s <= 0:
            raise ValueError(f"decay_s must be > 0, not {decay_s}")
        self.decay_s = decay_s

    def choose(self, candidates: Sequence[TeacherView], now: float) -> list[TeacherView]:
        known = [t.service_time for t in candidates if t.service_time is not None]
        fastest = min(known) if known else None
        cost = {t.endpoint: (max(0, t.outstanding - t.in_transit) + t.queued + 1) * self.estimate(t, fastest)
                for t in candidates}
        return sorted(candidates, key=lambda t: (cost[t.endpoint], t.outstanding, t.last_used))

    def estimate(self, view: TeacherView, fastest: Optional[float]) -> float:
        """Seconds per request: the EWMA, raised by a request out for longer, decayed toward ``fastest``."""
        if view.service_time is None or fastest is None:
            estimate = fastest if fastest is not None else 1.0   # unknown: as fast as the best (it gets tried)
        else:
            weight = math.exp(-view.age / self.decay_s)
            estimate = fastest + (view.service_time - fastest) * weight
        if view.outstanding and view.oldest_out > 0:   # the link's round trip is no sign of a slow teacher
            estimate = max(estimate, (view.oldest_out - (view.round_trip or 0.0)) / view.outstanding)
        return estimate
