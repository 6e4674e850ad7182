"""The remote stage's gray-failure rules as small objects it consults: when to hedge, when a teacher has
stalled, when an outage ends the epoch, and how long a probe may take.

``RemoteStage`` (the mechanism: task tables, dispatch, retries) keeps the clocks and asks these rules for the
numbers and verdicts; a different rule is a different object here, not an edit of the stage.

- ``HedgeRule``: the head task is sent once more to another teacher after ``percentile x factor`` of recent
  latencies (clamped; plus the round trip of a far teacher it is at), within a budget of ``budget`` x requests
  + ``burst``. Dean and Barroso, "The Tail at Scale" (CACM 56(2), 2013).
- ``StallRule``: no answer after ``factor`` x the 99th percentile of recent latencies (clamped between
  ``min_timeout`` and ``max(min_timeout, request_timeout)``; plus, for a far teacher, 3 round trips and one per
  slow-start round that carries its requests out; and ``factor`` x the spread of the teacher's own latencies) means
  the teacher stalled.
- ``OutageRule``: no usable teacher (or a task no teacher can take) for ``timeout`` seconds ends the epoch.
- ``ProbeRule``: a health probe may take ``max(probe_timeout, factor x round trip)``, so a far teacher's probe
  can finish; a black-holed near one is still given up after ``probe_timeout``.

Example::

    hedge = HedgeRule(budget=0.05, percentile=95, factor=2.0, min_delay=0.02, max_delay=1.0)
    hedge.delay(window)                          # seconds the head task may be out before it is hedged
    hedge.allowed(hedges=3, requests=100)        # within the budget?
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..latency_window import LatencyWindow

__all__ = ["HedgeRule", "StallRule", "OutageRule", "ProbeRule", "HEDGE_BURST", "slow_start_rounds"]

HEDGE_BURST = 2   # hedges allowed beyond the budget's share, so the first stalls of an epoch can be hedged
UNKNOWN_STALL_TIMEOUT = 5.0   # seconds, before latency percentiles are known (or stall factor x the longest seen)
ROUND_TRIP_STALL_FACTOR = 3.0   # a far teacher's stall timeout: this many of its round trips more ...
INITIAL_WINDOW_BYTES = 10 * 1460   # ... and one per doubling of TCP's initial window (RFC 6928: 10 segments) that
# carries what it has out: a connection that is new, or idle longer than its retransmission timeout, starts there


def _far(round_trip: Optional[float]) -> float:
    from .window import NEGLIGIBLE_ROUND_TRIP

    return round_trip if round_trip is not None and round_trip >= NEGLIGIBLE_ROUND_TRIP else 0.0


@dataclass(frozen=True)
class HedgeRule:
    """When the head task is hedged, and how many hedges the budget allows."""

    budget: float = 0.05
    percentile: float = 95.0
    factor: float = 2.0
    min_delay: float = 0.02
    max_delay: float = 1.0
    burst: int = HEDGE_BURST

    def delay(self, latencies: LatencyWindow, round_trip: Optional[float] = None) -> float:
        """Seconds the head task may be out before it is hedged (``max_delay`` until latencies are known), plus
        the network ``round_trip`` of the teacher it is at (20 ms or more; a far teacher is not a slow one)."""
        return latencies.scaled(self.percentile, self.factor, self.min_delay, self.max_delay,
                                unknown=self.max_delay) + _far(round_trip)

    def allowed(self, hedges: int, requests: int) -> bool:
        """True while one more hedge stays within ``budget`` x ``requests`` + ``burst``."""
        return self.budget > 0 and hedges < self.budget * requests + self.burst


@dataclass(frozen=True)
class StallRule:
    """How long a request may go unanswered before its teacher counts as stalled."""

    factor: float = 4.0
    min_timeout: float = 2.0
    request_timeout: float = 30.0

    def timeout(self, latencies: LatencyWindow, round_trip: Optional[float] = None, spread: float = 0.0,
                bytes_out: int = 0) -> float:
        """Seconds without an answer after which a teacher counts as stalled (at most ``request_timeout``).

        Before the percentiles are known: 5 s, or ``factor`` x the longest latency seen so far, so that a
        teacher whose every answer takes longer than 5 s is not called stalled on each of its first requests.
        A teacher ``round_trip`` away (20 ms or more) gets ``ROUND_TRIP_STALL_FACTOR`` round trips more (the
        percentiles are of every teacher's latencies, mostly near ones'), and ``slow_start_rounds(bytes_out)``
        more: the requests it has out (``bytes_out``, their feeds' bytes) over a connection that starts at TCP's
        initial window, as a new one does and one idle for longer than its retransmission timeout (Linux's
        tcp_slow_start_after_idle, RFC 2861); 1.5 s away the first two 100 KB requests of a new connection took
        more than the 6.5 s that 3 round trips allowed, and the teacher was set aside twice before its first
        answer (issue 25). A teacher whose own latencies ``spread`` (seconds between its usual and its slow
        answers, ``TeacherPool.latency_spread``) gets ``factor`` spreads more, as TCP's retransmission timeout
        allows four deviations (RFC 6298), at most doubling the clock: behind a lossy link one answer in a few
        waits for retransmissions (200 ms, then 400, 800 ... as the timeout doubles), and a chain of them passed
        the 2 s floor while the teacher answered everything (issue 25)."""
        ceiling = max(self.min_timeout, self.request_timeout)
        seen = latencies.largest()
        unknown = max(self.min_timeout, UNKNOWN_STALL_TIMEOUT, self.factor * seen if seen is not None else 0.0)
        base = latencies.scaled(99, self.factor, self.min_timeout, ceiling, unknown=min(ceiling, unknown))
        far = _far(round_trip)
        rounds = ROUND_TRIP_STALL_FACTOR + slow_start_rounds(bytes_out) if far else 0.0
        clock = base + rounds * far
        return min(ceiling, clock + min(clock, self.factor * max(0.0, spread)))


def slow_start_rounds(nbytes: int) -> int:
    """Round trips TCP's slow start takes to send ``nbytes`` from its initial window (``INITIAL_WINDOW_BYTES``,
    doubling each round trip: RFC 5681, RFC 6928): 0 for none, 1 up to 14.6 KB, 4 for 200 KB."""
    return math.ceil(math.log2(1 + max(0, nbytes) / INITIAL_WINDOW_BYTES))


@dataclass(frozen=True)
class OutageRule:
    """How long the stage waits with no usable teacher before the epoch fails."""

    timeout: float = 60.0

    def deadline(self, *starts: Optional[float]) -> Optional[float]:
        """The monotonic time the outage that began at the earliest of ``starts`` ends the epoch (None: none)."""
        known = [t for t in starts if t is not None]
        return min(known) + self.timeout if known else None


@dataclass(frozen=True)
class ProbeRule:
    """How long one health probe may take: ``max(timeout, factor x round_trip)``."""

    timeout: float = 2.0
    factor: float = 4.0   # a probe on a new connection: TCP handshake, HTTP/2 settings, the check, + margin

    def probe_timeout(self, round_trip: Optional[float]) -> float:
        return self.timeout if round_trip is None else max(self.timeout, self.factor * round_trip)
