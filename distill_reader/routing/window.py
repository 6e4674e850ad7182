"""A teacher's in-flight window: how many requests one student keeps out at it, from its bandwidth-delay product.

A teacher answering one request every ``service_time`` seconds (its measured throughput, 1 / service_time)
across a network round trip of ``round_trip`` seconds is kept busy only with ``round_trip / service_time``
requests in the link on top of those it computes or queues: the bandwidth-delay product, as TCP's congestion
window and gRPC's BDP probing size their windows (window ~ throughput x min RTT). So the window is
``floor + round_trip / service_time`` (rounded down; a round trip under ``NEGLIGIBLE_ROUND_TRIP`` counts as none),
between ``floor`` (``per_teacher_in_flight``: one computing,
one queued for a near teacher) and ``cap`` (``max_per_teacher_in_flight``). A near teacher (round trip well below
its service time) keeps ``floor``; a teacher 300 ms away answering every 50 ms gets ``floor + 6``. The round trip
is the network's alone: the minimum of recent health-probe round trips (a health check costs the teacher
nothing), so it is not confused with the service time; unknown, the window is ``floor``. Both inputs follow the
link as it changes (a probe every ``RTT_PROBE_INTERVAL``, an EWMA per answer), so the window shrinks again within
a few answers once a slow link heals.

Example::

    window = InFlightWindow(floor=2, cap=16)
    window.size(round_trip=0.300, service_time=0.050)   # 8
    window.size(round_trip=None, service_time=0.050)    # 2
"""
from __future__ import annotations

import math
from typing import Optional

__all__ = ["InFlightWindow", "DEFAULT_MAX_PER_TEACHER_IN_FLIGHT", "RTT_PROBE_INTERVAL", "RTT_SAMPLES"]

DEFAULT_MAX_PER_TEACHER_IN_FLIGHT = 32   # the window's cap unless set (a 1.5 s round trip at 50 ms a request: 32)
RTT_PROBE_INTERVAL = 0.5   # seconds between round-trip probes of a usable teacher
RTT_SAMPLES = 2            # the round trip is the minimum of this many latest probes (~1 s of history)
NEGLIGIBLE_ROUND_TRIP = 0.02   # seconds: a round trip below this (loopback, a LAN, the student's own pipes) adds none


class InFlightWindow:
    """``clamp(floor + round_trip // service_time, floor, cap)`` requests.

    Args:
        floor: the window with an unknown or negligible round trip (>= 1).
        cap: the largest window (>= floor); ``cap == floor`` fixes the window.

    Raises:
        ValueError: ``floor < 1`` or ``cap < floor``.
    """

    def __init__(self, floor: int, cap: int = DEFAULT_MAX_PER_TEACHER_IN_FLIGHT):
        """Check the arguments.

        Raises:
            ValueError: ``floor`` < 1 or ``cap`` < ``floor``.
        """
        if floor < 1:
            raise ValueError(f"per_teacher_in_flight must be >= 1, not {floor}")
        if cap < floor:
            raise ValueError(f"max_per_teacher_in_flight ({cap}) must be >= per_teacher_in_flight ({floor})")
        self.floor, self.cap = floor, cap

    def in_transit(self, round_trip: Optional[float], service_time: Optional[float]) -> int:
        """Requests the link holds at the teacher's throughput (the window's part above ``floor``)."""
        if round_trip is None or not service_time or service_time <= 0 or round_trip < NEGLIGIBLE_ROUND_TRIP:
            return 0
        return max(0, min(self.cap - self.floor, math.floor(round_trip / service_time + 1e-9)))

    def size(self, round_trip: Optional[float], service_time: Optional[float]) -> int:
        """The window in requests for a teacher of this round trip and service time (seconds)."""
        return self.floor + self.in_transit(round_trip, service_time)
