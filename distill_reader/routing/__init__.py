"""Routing policy apart from mechanism: which usable teacher the next request should go to.

The mechanism (``TeacherPool``: membership, health, probes, slots, the outage clock; ``RemoteStage``: tasks,
dispatch, retries) asks a ``RoutingPolicy`` one question, as Ray Serve's request router asks its
``choose_replicas``: given the usable teachers that may take this request, in which order are they preferred?
The pool sends the request to the first one if it has a free in-flight slot, and otherwise holds it for that
teacher (so a policy never sees slots, only load). Every policy reads the same measurements (``TeacherView``):
requests out and queued, the in-flight window, the service-interval estimate and its age, the measured network
round trip.

Adding a policy is one new file in this package with a class that has ``choose``; pass an instance as
``DistillReader(..., routing_policy=MyPolicy())`` or ``TeacherPool(..., policy=MyPolicy())``. The default is
``PeakEwmaPolicy`` (routing/peak_ewma.py), the expected-finish-time rule the reader always had.

Example (a policy of one file)::

    class LeastLoaded:
        def choose(self, candidates, now):
            return sorted(candidates, key=lambda t: (t.outstanding + t.queued) / t.window)

The in-flight window (how many requests one teacher may have out) is ``InFlightWindow`` (routing/window.py);
the hedging, stall and outage rules the stage consults are in routing/stage_rules.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

__all__ = ["RoutingPolicy", "TeacherView", "default_policy"]


@dataclass(frozen=True)
class TeacherView:
    """What a routing policy may know about one usable teacher when it chooses (all times in seconds).

    Attributes:
        endpoint: ``host:port``.
        outstanding: this student's requests out at it now.
        queued: requests already held for it in this dispatch pass (routed to wait for it).
        window: its in-flight window now (requests it may have out at once, >= 1).
        in_transit: the part of ``window`` its network round trip holds at its throughput (0 for a near
            teacher): requests on the way there or back, not queued at the teacher.
        service_time: seconds per request at its measured throughput (EWMA of latency / requests in flight),
            None before its first answer.
        age: seconds since ``service_time`` was last refreshed (0 when never).
        oldest_out: seconds the oldest of its outstanding requests has been out (0 when none).
        round_trip: measured network round trip (the minimum of recent health probes), None when unknown.
        last_used: monotonic time of its last request (0 when never).
    """

    endpoint: str
    outstanding: int
    queued: int
    window: int
    in_transit: int
    service_time: Optional[float]
    age: float
    oldest_out: float
    round_trip: Optional[float]
    last_used: float


@runtime_checkable
class RoutingPolicy(Protocol):
    """One method: the teachers in order of preference for the next request."""

    def choose(self, candidates: Sequence[TeacherView], now: float) -> Sequence[TeacherView]:
        """Rank ``candidates`` (never empty) best first; the pool uses the first (it may return just that one).

        ``now`` is ``time.monotonic()`` of this pass. Must not block or raise.
        """
        ...


def default_policy() -> RoutingPolicy:
    """The reader's default: ``PeakEwmaPolicy()``."""
    from .peak_ewma import PeakEwmaPolicy

    return PeakEwmaPolicy()
