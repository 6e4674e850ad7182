"""Which teachers are usable, and which one should take the next request: health, backoff, load and speed.

The pool lives in the student process and only keeps state; the I/O (requests and health probes) is done by
the worker processes, which report back. A teacher whose request fails, stalls or is answered wrongly is set
aside and probed again after an exponential backoff with jitter (not hammered); when a probe finds it healthy
it returns to service. The set of teachers can change at any time with ``set_endpoints`` (a fixed list, or
ZooKeeper's fair share delivered from a kazoo thread), so every method takes the pool's lock.

Routing is policy, kept apart (distill_reader.routing): the pool measures each teacher (requests out, a
service-time estimate: an EWMA of its answers' latency divided by the requests it had in flight, i.e. seconds
per request at its throughput; its network round trip from health probes) and asks the ``RoutingPolicy`` to rank
the usable teachers; the default, ``PeakEwmaPolicy``, prefers the one that would finish the request first. When
the preferred teacher has no free in-flight slot the request waits for it in the student rather than going to a
much slower teacher. Each teacher's in-flight window follows its bandwidth-delay product
(``routing.window.InFlightWindow``): ``per_teacher_in_flight`` plus the requests its round trip holds at its
throughput, at most ``max_per_teacher_in_flight``, so a teacher far away still gets its share (stepped once per
round trip, as TCP Vegas, from the round's quickest answer: ``_step_window_locked``); a near teacher
whose latencies have a delay tail (a lossy link: TCP retransmissions) gets the requests it computes meanwhile
(``_delay_tail_locked``), so a lossy teacher keeps most of its share (issue 25).

Example::

    pool = TeacherPool(["127.0.0.1:9292", "127.0.0.1:9293"], per_teacher_in_flight=2)
    endpoint = pool.pick()            # the usable teacher that finishes first and has a free slot, or None
    pool.started(endpoint)
    pool.succeeded(endpoint, latency=0.020, samples=32)
    pool.round_trip_measured(endpoint, 0.300)   # a health probe's round trip: the window grows to match
    pool.failed(endpoint, "gRPC UNAVAILABLE")   # set aside; pool.probes_due() names it after the backoff
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from distill_base.backoff import backoff_delay

from .routing import RoutingPolicy, TeacherView, default_policy
from .routing.window import DEFAULT_MAX_PER_TEACHER_IN_FLIGHT, NEGLIGIBLE_ROUND_TRIP, InFlightWindow

__all__ = ["TeacherPool", "TeacherState", "PoolSnapshot", "backoff_delay"]

logger = logging.getLogger(__name__)

EWMA_WEIGHT = 0.3          # weight of the newest latency in the service-time estimate
LATENCY_SAMPLES = 8        # a round trip is at most the least latency of this many latest answers
READ_AHEAD_FACTOR = 32.0   # read_ahead: a teacher's window counts at most this many times (1.5 s beside 50 ms: 31)
DELAY_SAMPLES = 32         # a teacher's link-delay tail is read from this many latest answers' excess latency
DELAY_MIN_SAMPLES = 8      # ... once this many are known
DELAY_TAIL = 90.0          # the tail percentile of latency (lossy link: ~1 answer in 4 waits for an RTO) ...
DELAY_BASE = 10.0          # ... less this percentile (its answers that waited for nothing but the queue)
RTT_HISTORY = 6            # a teacher's round trip is the minimum of this many latest probes (3 s of them) ...
CHANGE_SAMPLES = 3         # ... or of the latest 3 once they agree on a new, longer one (a fault began) ...
CHANGE_HANDSHAKES = 6      # ... or of the latest 2 once they agree and hold this many TCP handshakes in all ...
HEAL_SAMPLES = 2           # ... or of the latest 2 once they agree on a new, shorter one (it healed)
DELAY_WINDOW_FACTOR = 3    # a delay tail grows a teacher's window to at most this many times the floor
SAMPLE_CLIP = 2.0          # one answer moves a near teacher's service time toward at most this x its recent median
FAR_ANSWERS = 4            # a longer latest probe counts at once when this many latest answers took as long ...
FAR_PROBE = 0.05           # ... and it is at least this long (s) and twice the measured round trip
SPEED_SAMPLES = 32         # a far teacher's first window is its round trip over the median of this many s / request
IDLE_RESTART = 1.0         # s: a connection without an answer this long more than its round trip may restart cold


@dataclass
class TeacherState:
    """What the student knows about one teacher."""

    endpoint: str
    healthy: bool = True
    outstanding: int = 0
    failures: int = 0                 # consecutive failures (requests and probes)
    next_probe_at: float = 0.0
    probing: bool = False
    last_error: str = ""
    last_used: float = 0.0
    service_time: Optional[float] = None   # seconds per request (EWMA), None until the first answer
    refreshed_at: float = 0.0              # when service_time was last updated
    started_at: list = field(default_factory=list)   # start times of the outstanding requests, oldest first
    sent_with: list = field(default_factory=list)    # requests out when each of those was sent (itself included)
    round_trips: deque = field(default_factory=lambda: deque(maxlen=RTT_HISTORY))   # latest probe round trips, s
    handshakes: deque = field(default_factory=lambda: deque(maxlen=RTT_HISTORY))    # ... each the least of this many
    window: int = 0                        # its in-flight window (0: the floor); moves once per round trip
    round_began: float = -1.0              # when its window's current round began (-1: none yet)
    round_best: Optional[tuple] = None     # the round's quickest answer: (latency, requests out, own time or None)
    far_window: int = 0                    # its latest stepped window over a far link (kept when the link changes)
    far_round_trip: float = 0.0            # ... and that link's round trip, s
    link_changed_at: float = -1.0          # when its round trip last changed much (older requests teach nothing)
    least_latency: float = 0.0             # its quickest answer over this link, s (0: none yet)
    least_transit: float = 0.0             # its least answer latency less the teacher's own time (0: not told)
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))   # its latest answers', s
    per_request: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))  # latest s / request samples
    spread: deque = field(default_factory=lambda: deque(maxlen=DELAY_SAMPLES))   # latest answers' latency, s
    spread_gap: float = 0.0                # their DELAY_TAIL-th less DELAY_BASE-th percentile, s (on each answer)
    spread_top: float = 0.0                # ... and their largest less that DELAY_BASE-th percentile, s
    speed: deque = field(default_factory=lambda: deque(maxlen=SPEED_SAMPLES))   # s / request, kept across links
    # per-epoch statistics
    requests: int = 0
    samples: int = 0
    latency_total: float = 0.0
    errors: int = 0


def _median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _consistent(round_trips: list[float]) -> bool:
    """True when probe round trips agree: within 2x of each other, or all near (``NEGLIGIBLE_ROUND_TRIP``)."""
    low, high = min(round_trips), max(round_trips)
    return high < NEGLIGIBLE_ROUND_TRIP or high <= 2 * low


def _link_changed(before: float, after: float) -> bool:
    """True when a round trip moved between near and far (``NEGLIGIBLE_ROUND_TRIP``) or by more than 2x."""
    far_before, far_after = before >= NEGLIGIBLE_ROUND_TRIP, after >= NEGLIGIBLE_ROUND_TRIP
    if far_before != far_after:
        return True
    return far_before and max(before, after) > 2 * min(before, after)


@dataclass
class PoolSnapshot:
    """A copy of the pool's statistics for the epoch summary."""

    teachers: list[TeacherState] = field(default_factory=list)


class TeacherPool:
    """Health, load and speed of the student's teachers (thread-safe).

    Args:
        endpoints: initial ``host:port`` list (may be empty and filled later by ``set_endpoints``).
        per_teacher_in_flight: a teacher's in-flight window when its round trip is unknown or negligible.
        max_per_teacher_in_flight: the window's cap for a far teacher (``routing.window``); equal to
            ``per_teacher_in_flight`` fixes every window at that (the behaviour before windows followed the
            round trip).
        probe_backoff: first delay before probing a set-aside teacher again, seconds; doubles per failure.
        max_probe_backoff: cap of that delay, seconds.
        seed: seed of the jitter's random generator (tests).
        policy: the routing policy (``distill_reader.routing``); default ``PeakEwmaPolicy()``.

    Raises:
        ValueError: ``per_teacher_in_flight < 1`` or ``max_per_teacher_in_flight < per_teacher_in_flight``.
    """

    def __init__(self, endpoints: Iterable[str] = (), per_teacher_in_flight: int = 2,
                 probe_backoff: float = 0.2, max_probe_backoff: float = 5.0, seed: Optional[int] = None,
                 max_per_teacher_in_flight: Optional[int] = None, policy: Optional[RoutingPolicy] = None):
        """Check the arguments.

        Raises:
            ValueError: ``per_teacher_in_flight`` < 1, or ``max_per_teacher_in_flight`` below it.
            TypeError: ``policy`` has no ``choose`` method.
        """
        cap = max(per_teacher_in_flight, DEFAULT_MAX_PER_TEACHER_IN_FLIGHT) if max_per_teacher_in_flight is None \
            else max_per_teacher_in_flight
        self.window = InFlightWindow(per_teacher_in_flight, cap)
        self.policy: RoutingPolicy = policy if policy is not None else default_policy()
        if not callable(getattr(self.policy, "choose", None)):
            raise TypeError(f"routing policy {self.policy!r} has no choose(candidates, now) method")
        self.per_teacher_in_flight = per_teacher_in_flight
        self.probe_backoff = probe_backoff
        self.max_probe_backoff = max_probe_backoff
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._teachers: dict[str, TeacherState] = {}
        self._retired: dict[str, TeacherState] = {}   # removed by set_endpoints, kept for statistics
        self._down_since: Optional[float] = time.monotonic()
        self.last_error = ""
        self.dynamic = False   # True when the set comes from discovery (an empty set is then worth waiting for)
        self.discovery_state: Optional[Callable[[], str]] = None   # what discovery knows, for an empty set
        self.set_endpoints(endpoints)

    # -- membership ---------------------------------------------------------------------------------------
    def set_endpoints(self, endpoints: Iterable[str]) -> None:
        """Replace the set of teachers; new ones start usable, removed ones get no new requests."""
        wanted = list(dict.fromkeys(e.strip() for e in endpoints if e and e.strip()))
        with self._lock:
            for endpoint in list(self._teachers):
                if endpoint not in wanted:
                    self._retired[endpoint] = self._teachers.pop(endpoint)
            for endpoint in wanted:
                if endpoint not in self._teachers:
                    state = self._retired.pop(endpoint, None) or TeacherState(endpoint)
                    state.healthy, state.failures, state.probing = True, 0, False
                    self._teachers[endpoint] = state
            self._update_down_locked(time.monotonic())

    @property
    def endpoints(self) -> list[str]:
        with self._lock:
            return list(self._teachers)

    # -- choosing -----------------------------------------------------------------------------------------
    def route(self, avoid: Iterable[str] = (), exclude: Iterable[str] = (),
              queued: Optional[Mapping[str, int]] = None) -> tuple[Optional[str], Optional[str]]:
        """Where the next request should go: ``(send_to, None)``, ``(None, wait_for)`` or ``(None, None)``.

        The usable teacher the routing policy ranks first is chosen; if it has a free in-flight slot (below
        its window) the request goes there now, else it should wait for that teacher (``wait_for``; count it
        in ``queued`` for the requests routed after it in the same pass). ``(None, None)``: no usable teacher.
        Teachers in ``avoid`` (the one a retried request just failed on) are chosen only when no other can take it now;
        teachers in ``exclude`` (those a hedged request is already at) never.
        """
        avoid, exclude, queued = set(avoid), set(exclude), queued or {}
        now = time.monotonic()
        with self._lock:
            usable = [t for t in self._teachers.values() if t.healthy and t.endpoint not in exclude]
            if not usable:
                return None, None
            preferred = [t for t in usable if t.endpoint not in avoid]
            if not any(t.outstanding < self._window_locked(t) for t in preferred):
                preferred = usable
            views = {t.endpoint: self._view_locked(t, queued.get(t.endpoint, 0), now) for t in preferred}
            ranked = self.policy.choose(list(views.values()), now)
            best = views[ranked[0].endpoint] if ranked else min(views.values(), key=lambda v: v.outstanding)
            if best.outstanding < best.window:
                return best.endpoint, None
            return None, best.endpoint

    def all_busy(self) -> bool:
        """True when there are usable teachers and none has a free in-flight slot: ``route`` would send nothing
        now (a pass over the waiting tasks can stop; it was ~15 routes per pass, each ranking every teacher, and
        with a far teacher out the student's own process spent its core on them, issue 25)."""
        with self._lock:
            usable = [t for t in self._teachers.values() if t.healthy]
            return bool(usable) and all(t.outstanding >= self._window_locked(t) for t in usable)

    def pick(self, avoid: Iterable[str] = ()) -> Optional[str]:
        """The teacher a request should go to now, or None (no usable teacher with a free slot is worth it)."""
        return self.route(avoid=avoid)[0]

    def started(self, endpoint: str) -> None:
        now = time.monotonic()
        with self._lock:
            state = self._state_locked(endpoint)
            if state is not None:
                state.outstanding += 1
                state.last_used = now
                state.started_at.append(now)
                state.sent_with.append(state.outstanding)

    def succeeded(self, endpoint: str, latency: float, samples: int, server_time: Optional[float] = None,
                  late: bool = False) -> None:
        """A request answered after ``latency`` seconds: counts, the speed estimate, and the failure streak.
        ``server_time``: the seconds of it at the teacher by its own clock (Paddle Serving's ``profile_time``), when
        the teacher says: the rest is the link's, which a far teacher's estimates then leave out. ``late``: an
        answer to a request given up as stalled, left out of the latency spread (``latency_spread``), so that a
        stall does not lengthen the teacher's next stall clock."""
        now = time.monotonic()
        with self._lock:
            state = self._state_locked(endpoint)
            if state is None:
                return
            state.latencies.append(latency)
            sent_at = state.started_at[0] if state.started_at else now
            sent_with = state.sent_with[0] if state.sent_with else max(1, state.outstanding)
            if server_time is not None and not 0.0 < server_time <= latency:
                server_time = None   # not one request's time at the teacher
            if sent_at >= state.link_changed_at:   # sent over this link
                far = self._far_locked(state)
                measured = per_request = self._per_request_locked(latency, sent_with, state.outstanding, far,
                                                                  server_time)
                if not late:
                    state.spread.append(latency)
                if not late and len(state.spread) >= DELAY_MIN_SAMPLES:   # here, not on every read (routing)
                    tail, base, top = np.percentile(np.fromiter(state.spread, float), [DELAY_TAIL, DELAY_BASE, 100])
                    state.spread_gap, state.spread_top = float(tail - base), float(top - base)
                state.least_latency = min(latency, state.least_latency or latency)
                if server_time is not None:
                    transit = latency - server_time
                    state.least_transit = min(transit, state.least_transit or transit)
                if state.per_request and far is None:
                    # one answer that waited an RTO is not a near teacher twice as slow (a far one's estimate is
                    # not clipped: its slow link then kept most of the reorder buffer, issue 25)
                    per_request = min(measured, SAMPLE_CLIP * _median(state.per_request))
                state.per_request.append(measured)
                state.speed.append(measured)
                state.service_time = per_request if state.service_time is None else (
                    (1 - EWMA_WEIGHT) * state.service_time + EWMA_WEIGHT * per_request)
                state.refreshed_at = now
                self._step_window_locked(state, latency, sent_at, sent_with, now, server_time)
            self._finish_locked(state)
            state.requests += 1
            state.samples += samples
            state.latency_total += latency
            state.failures = 0

    def failed(self, endpoint: str, error: str) -> None:
        """A request to ``endpoint`` failed: set it aside and schedule a probe after the backoff."""
        with self._lock:
            state = self._state_locked(endpoint)
            if state is not None:
                self._finish_locked(state)
                state.errors += 1
            self._set_aside_locked(endpoint, error)

    def set_aside(self, endpoint: str, reason: str) -> None:
        """Stop sending to ``endpoint`` (its requests stall, or it answers wrongly) and probe it with backoff.

        Its outstanding requests still hold their slots until they are answered, fail or are released.
        """
        with self._lock:
            self._set_aside_locked(endpoint, reason)

    def round_trip_measured(self, endpoint: str, seconds: float, handshakes: int = 1) -> None:
        """A probe of ``endpoint`` came back after ``seconds``: its network round trip (the minimum of the latest
        ``RTT_HISTORY``), which sizes its in-flight window. ``handshakes``: the reading is the least of that many
        TCP handshakes timed at once (a lossy link reads long only when every one lost its SYN or SYN-ACK).

        The link changed (a fault began or healed) when the latest probes agree with each other (``_consistent``)
        and differ from the ones before (``_link_changed``): ``HEAL_SAMPLES`` of them for a shorter round trip;
        for a longer one ``CHANGE_SAMPLES``, or ``HEAL_SAMPLES`` holding ``CHANGE_HANDSHAKES`` handshakes in all
        (a far link is then accepted within two of its round trips: ``round_trip_unconfirmed`` asks for the
        second at once). What was learnt over the old link is dropped, so the estimate is re-learnt from the next
        answers instead of decaying for seconds. A lossy link's probes, some held for a retransmission, do not
        agree, so its estimates are kept.
        """
        with self._lock:
            state = self._state_locked(endpoint)
            if state is None or seconds < 0:
                return
            state.round_trips.append(float(seconds))
            state.handshakes.append(max(1, int(handshakes)))
            history = list(state.round_trips)
            # a shorter round trip needs fewer probes (no loss fakes one), and so does a longer one read by enough
            # handshakes at once
            healed = history[-HEAL_SAMPLES:]
            if len(history) > HEAL_SAMPLES and _consistent(healed) and (
                    min(healed) < min(history[:-HEAL_SAMPLES])
                    or sum(list(state.handshakes)[-HEAL_SAMPLES:]) >= CHANGE_HANDSHAKES):
                count = HEAL_SAMPLES
            else:
                count = CHANGE_SAMPLES
            older, recent = history[:-count], history[-count:]
            if older and len(recent) >= HEAL_SAMPLES and _consistent(recent) \
                    and _link_changed(min(older), min(recent)):
                weights = list(state.handshakes)[-len(recent):]
                state.round_trips.clear()
                state.round_trips.extend(recent)
                state.handshakes.clear()
                state.handshakes.extend(weights)
                state.latencies.clear()
                state.per_request.clear()
                state.spread.clear()
                state.spread_gap = state.spread_top = 0.0
                state.service_time = None
                state.window = 0
                state.least_latency = state.least_transit = 0.0
                state.link_changed_at = time.monotonic()

    def round_trip_unconfirmed(self, endpoint: str) -> bool:
        """True when the latest probe of ``endpoint`` read a round trip much longer than its measured one
        (``_link_changed``) that is not yet accepted: another probe now would confirm or refute it, rather than
        after the usual interval (a 1.5 s link's probes take 1.5 s each)."""
        with self._lock:
            state = self._state_locked(endpoint)
            if state is None or not state.round_trips:
                return False
            latest, measured = state.round_trips[-1], self._round_trip_locked(state)
            return latest > measured and _link_changed(measured, latest)

    def round_trip(self, endpoint: str) -> Optional[float]:
        """The measured network round trip of ``endpoint`` in seconds (None before its first probe)."""
        with self._lock:
            state = self._state_locked(endpoint)
            return self._round_trip_locked(state) if state is not None else None

    def stall_round_trip(self, endpoint: str) -> Optional[float]:
        """The round trip a stall clock allows ``endpoint`` (seconds; None before its first probe): the measured
        one (``round_trip``), or the latest probe's when that is longer. A link that has just become long is a
        link change only once its probes agree (``round_trip_measured``), ~2 round trips later; judged by the old
        short round trip meanwhile, its first slow answers would set a healthy teacher aside as stalled (issue 25).
        It also times a link probe's handshakes (``RemoteStage.link_silence_limit``): a black hole answers none."""
        with self._lock:
            state = self._state_locked(endpoint)
            return None if state is None else self._stall_round_trip_locked(state)

    def connection_cold(self, endpoint: str) -> bool:
        """True when its connection may be sending from TCP's initial window: no answer over its current link yet,
        or none for ``IDLE_RESTART`` seconds plus its round trip (Linux restarts a connection idle longer than its
        retransmission timeout from the initial window: tcp_slow_start_after_idle, RFC 2861). Unknown: False."""
        now = time.monotonic()
        with self._lock:
            state = self._state_locked(endpoint)
            if state is None:
                return False
            if not state.least_latency:
                return True
            return now - state.refreshed_at > IDLE_RESTART + (self._stall_round_trip_locked(state) or 0.0)

    def latency_spread(self, endpoint: str) -> float:
        """How far its slowest answer is from its usual ones over its current link: the largest less the
        ``DELAY_BASE``-th percentile of its latest ``DELAY_SAMPLES`` latencies (answers to requests given up as
        stalled left out), in seconds (0 before ``DELAY_MIN_SAMPLES`` answers, or for a teacher not in the pool).
        Its stall clock allows it: the largest, not a percentile, so that the first retransmission timeouts of a
        link that has just become lossy count at once, before the chains of them that outlast the 2 s floor
        (in one bench run of 4 such a chain came before the tail's 90th percentile moved)."""
        with self._lock:
            state = self._state_locked(endpoint)
            return state.spread_top if state is not None else 0.0

    def window_of(self, endpoint: str) -> int:
        """How many requests ``endpoint`` may have out now (its in-flight window)."""
        with self._lock:
            state = self._state_locked(endpoint)
            return self.window.floor if state is None else self._window_locked(state)

    def total_window(self) -> int:
        """The sum of the current teachers' windows (at least ``per_teacher_in_flight``)."""
        with self._lock:
            return max(self.window.floor, sum(self._window_locked(s) for s in self._teachers.values()))

    def read_ahead(self) -> int:
        """Tasks worth holding at once: each teacher's window, times how many of its latencies fit in the slowest
        teacher's latency (at most ``READ_AHEAD_FACTOR``), so that while a far or slow teacher holds the task
        the reorder buffer waits on, the others still have work (at least ``total_window()``). Routing by
        expected finish then gives the far teacher the tasks the near ones would finish last (the youngest).
        Memory: the reader holds up to twice this many tasks (``DistillReader``'s ``max_pending_tasks`` and
        ``max_pending_bytes`` bound them)."""
        with self._lock:
            states = list(self._teachers.values())
            typical = {s.endpoint: sum(s.latencies) / len(s.latencies) for s in states if s.healthy and s.latencies}
            longest = max(typical.values(), default=0.0)
            total = 0.0
            for state in states:
                ratio = longest / typical[state.endpoint] if typical.get(state.endpoint) else 1.0
                total += self._window_locked(state) * min(READ_AHEAD_FACTOR, max(1.0, ratio))
            return max(self.window.floor, int(total))

    def released(self, endpoint: str) -> None:
        """A request was abandoned or refused (no answer counted, no verdict on the teacher)."""
        with self._lock:
            state = self._state_locked(endpoint)
            if state is not None:
                self._finish_locked(state)

    # -- probing ------------------------------------------------------------------------------------------
    def probes_due(self, now: Optional[float] = None) -> list[str]:
        """Set-aside teachers whose backoff has expired; they are marked as being probed."""
        now = time.monotonic() if now is None else now
        due = []
        with self._lock:
            for state in self._teachers.values():
                if not state.healthy and not state.probing and state.next_probe_at <= now:
                    state.probing = True
                    due.append(state.endpoint)
        return due

    def probe_result(self, endpoint: str, healthy: bool, error: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            state = self._teachers.get(endpoint)
            if state is None:
                return
            state.probing = False
            if healthy:
                # failures stay counted until a request succeeds, so a flapping teacher backs off further
                state.healthy = True
            else:
                state.failures += 1
                if error and not state.last_error:   # keep the request's error: it says more than a probe
                    state.last_error = error
                if error and not self.last_error:
                    self.last_error = error
                state.next_probe_at = now + backoff_delay(state.failures, self.probe_backoff,
                                                          self.max_probe_backoff, self._rng)
            self._update_down_locked(now)

    def next_probe_time(self) -> Optional[float]:
        """When the next probe falls due (monotonic seconds), or None."""
        with self._lock:
            times = [s.next_probe_at for s in self._teachers.values() if not s.healthy and not s.probing]
        return min(times) if times else None

    # -- state for the pipeline --------------------------------------------------------------------------
    def down_since(self) -> Optional[float]:
        """Monotonic time since which no teacher has been usable, or None while one is."""
        with self._lock:
            self._update_down_locked(time.monotonic())
            return self._down_since

    def restart_down_timer(self) -> None:
        """Count an outage from now on (called when an epoch starts, so idle time between epochs is not counted)."""
        with self._lock:
            if self._down_since is not None:
                self._down_since = time.monotonic()

    def usable_count(self) -> int:
        with self._lock:
            return sum(1 for s in self._teachers.values() if s.healthy)

    def usable_endpoints(self) -> list[str]:
        with self._lock:
            return [s.endpoint for s in self._teachers.values() if s.healthy]

    def outstanding(self, endpoint: str) -> int:
        """Requests of this student out at ``endpoint`` now."""
        with self._lock:
            state = self._state_locked(endpoint)
            return 0 if state is None else state.outstanding

    def service_time(self, endpoint: str) -> Optional[float]:
        """The current service-time estimate of ``endpoint`` in seconds (None before its first answer)."""
        with self._lock:
            state = self._state_locked(endpoint)
            return None if state is None else state.service_time

    def describe(self) -> str:
        """``a:1 (error ...), b:2 (usable)`` for error messages."""
        with self._lock:
            if not self._teachers:
                return self.discovery_state() if self.discovery_state else "no teachers configured"
            parts = []
            for s in self._teachers.values():
                status = "usable" if s.healthy else f"set aside: {s.last_error or 'failed'}"
                parts.append(f"{s.endpoint} ({status})")
            return ", ".join(parts)

    def take_stats(self) -> PoolSnapshot:
        """Per-teacher statistics since the last call (then reset); every current teacher is listed."""
        with self._lock:
            snapshot = PoolSnapshot()
            for state in list(self._teachers.values()) + list(self._retired.values()):
                if state.endpoint in self._teachers or state.requests or state.errors:
                    snapshot.teachers.append(TeacherState(
                        state.endpoint, requests=state.requests, samples=state.samples,
                        latency_total=state.latency_total, errors=state.errors))
                state.requests = state.samples = state.errors = 0
                state.latency_total = 0.0
            return snapshot

    # -- internals ----------------------------------------------------------------------------------------
    def _state_locked(self, endpoint: str) -> Optional[TeacherState]:
        return self._teachers.get(endpoint) or self._retired.get(endpoint)

    @staticmethod
    def _finish_locked(state: TeacherState) -> None:
        state.outstanding = max(0, state.outstanding - 1)
        if state.started_at:
            state.started_at.pop(0)
        if state.sent_with:
            state.sent_with.pop(0)

    def _set_aside_locked(self, endpoint: str, reason: str) -> None:
        now = time.monotonic()
        self.last_error = reason
        state = self._state_locked(endpoint)
        if state is None:
            return
        state.last_error = reason
        if state.healthy:   # the first failure of a burst sets it aside; later ones only count
            state.failures += 1
            state.healthy = False
            state.probing = False
            delay = backoff_delay(state.failures, self.probe_backoff, self.max_probe_backoff, self._rng)
            state.next_probe_at = now + delay
            logger.warning("teacher %s set aside (%s); health probe in %.2fs", endpoint, reason, delay)
        self._update_down_locked(now)

    def _stall_round_trip_locked(self, state: TeacherState) -> Optional[float]:
        """``stall_round_trip`` of ``state``: the measured round trip, or the latest probe's when longer."""
        if not state.round_trips:
            return None
        return max(self._round_trip_locked(state), state.round_trips[-1])

    @staticmethod
    def _round_trip_locked(state: TeacherState) -> Optional[float]:
        """The least of the latest probe round trips, and no more than the least latency of the latest answers
        (a probe timed in the student also holds a cold worker's start and the student's own delays)."""
        if not state.round_trips:
            return None
        return min(min(state.round_trips), min(state.latencies, default=float("inf")))

    @staticmethod
    def _per_request_locked(latency: float, sent_with: int, outstanding: int, round_trip: Optional[float],
                            server_time: Optional[float] = None) -> float:
        """Seconds per request at the teacher's throughput, from one answer: latency / requests out (this one
        included), as Little's law says, but for a far teacher at most the latency less the round trip (the
        teacher's own part: one request out is not a teacher 7 times slower because its link is long). A far
        teacher's requests out are the more of those out now and those out when it was sent (``sent_with``): its
        latency was spent behind the latter, so a window that shrank meanwhile does not inflate it (issue 25).
        ``round_trip``: the teacher's far round trip (``_far_locked``), None when near. ``server_time`` (the answer's
        time at the teacher by its own clock when it says, within (0, latency]): a far teacher's at most that, which
        holds no link time (a new connection over a 1.5 s link took 15 s for its first answers: 7.8 s a request by
        latency / 2, so requests waited for near teachers rather than go to it, issue 25)."""
        if round_trip is None:
            return latency / max(1, outstanding)
        own = max(latency - round_trip, 0.1 * latency)
        if server_time is not None:
            own = min(own, server_time)
        return min(latency / max(1, outstanding, sent_with), own)

    def _step_window_locked(self, state: TeacherState, latency: float, sent_at: float, sent_with: int,
                            now: float, server_time: Optional[float] = None) -> None:
        """One step of a far teacher's window per round trip, as TCP Vegas steps its window, to keep about
        ``floor`` requests at the teacher itself (one computing, one queued) and the rest on the link.

        A round begins at a step and ends with the first answer to a request sent after it (the feedback of that
        step: stepping on every answer, with the answers of a round trip ago as feedback, swung the window 2-12).
        From the round's quickest answer (latency ``L``, ``n`` requests out when it was sent; the least delay of
        the round, as Vegas takes its least RTT): requests at the teacher ``q = n x (L - transit) / L`` (Little's
        law on the teacher's part of the latency: ``L - transit``, ``transit`` the link's part, ``_transit_locked``;
        or the answer's ``server_time`` when the teacher says: while a new connection ramps, its requests also wait
        in the link's queue, which ``L - transit`` counted as the teacher's, holding the window), its seconds
        per request ``s = (L - transit) / max(1, q)``, and the target ``floor + transit / s`` (the bandwidth-delay
        product, routing.window). ``q`` under ``floor - 1/2``: the window grows to the target, by at least one (a
        quarter while ``n x (L - its quickest answer over the link) / L`` is under 1/2: nothing queues anywhere, the
        teacher is underfed, as a far one is whose own speed is unknown; by one a round it took 20 rounds of 1.5 s
        to fill) and at most doubling; over ``floor + 1/2``: it shrinks to the target, by at least one."""
        round_trip = self._far_locked(state)
        if round_trip is None or latency <= 0:   # near: the floor (_base_window_locked), no rounds
            state.window, state.round_began, state.round_best, state.far_window = 0, -1.0, None, 0
            return
        current = state.window = self._stepped_window_locked(state, round_trip)
        state.far_window, state.far_round_trip = current, round_trip
        if state.round_began < 0 or state.round_began < state.link_changed_at:   # the first answer over this link
            state.round_began, state.round_best = now, None
            return
        if state.round_best is None or latency < state.round_best[0]:
            state.round_best = (latency, sent_with, server_time)
        if sent_at < state.round_began:
            return   # an answer to a request sent before the last step: the round goes on
        best, out, own = state.round_best
        state.round_began, state.round_best = now, None
        if best <= round_trip:
            return   # an answer quicker than the round trip: the link has become shorter (the probes will say)
        transit = self._transit_locked(state, round_trip)
        own = max(0.0, best - transit) if own is None else own
        at_teacher = out * own / best
        per_request = max(own, 1e-6) / max(1.0, at_teacher)
        target = self.window.floor + int(transit / per_request + 0.5)
        floor = self.window.floor
        if at_teacher < floor - 0.5:
            step = 1 if out * (best - state.least_latency) > 0.5 * best else max(1, current // 4)
            state.window = self._clamp_window(max(current + step, min(target, 2 * current)))
        elif at_teacher > floor + 0.5:
            state.window = self._clamp_window(min(current - 1, target))
        state.far_window = state.window

    @staticmethod
    def _transit_locked(state: TeacherState, round_trip: float) -> float:
        """Seconds a request and its answer spend on the link: the handshakes' round trip, or more when sending a
        request adds to it (its bytes at the connection's rate, both sides' stacks): its quickest answer over this
        link less one of its own seconds per request (what that answer spent at the teacher), as Vegas reads its
        base RTT from the least RTT seen. With the round trip alone, that time counted as the teacher's queue: a
        100 KB request 300 ms away (~0.45 s in transit) was held to a window of 7 where 10 keep the teacher busy
        (tests/student/test_routing.py's model: 0.77 of its share with 100 ms to send, 0.40 with 150 ms).
        When the teacher tells its own time per answer (``least_transit``: Paddle Serving's ``profile_time``), the
        least latency less that instead. Unknown (no answer or speed yet): the round trip."""
        if state.least_transit:   # the teacher says what each answer spent with it
            return max(round_trip, state.least_transit)
        if not state.least_latency or not state.speed:
            return round_trip
        return max(round_trip, state.least_latency - _median(state.speed))

    def _clamp_window(self, window: int) -> int:
        return min(self.window.cap, max(self.window.floor, window))

    def _delay_tail_locked(self, state: TeacherState) -> float:
        """Seconds of delay in the tail of its answers that its queue does not explain: the ``DELAY_TAIL``-th less
        the ``DELAY_BASE``-th percentile of its latest ``DELAY_SAMPLES`` latencies, less the ``floor - 1``
        service times a queue of its floor window spreads them by (0 before ``DELAY_MIN_SAMPLES`` answers).
        A lossy link (TCP hides a lost segment as a retransmission timeout, >= 200 ms, and the answers behind it
        on the connection wait too) has a tail of an RTO; a teacher that is slow or has a long queue throughout
        has its latencies close together, so it gets none (a full queue raises both percentiles).
        """
        if len(state.spread) < DELAY_MIN_SAMPLES or not state.service_time or self._far_locked(state) is not None:
            return 0.0   # (a far teacher's window follows its round trip: _step_window_locked)
        return max(0.0, state.spread_gap - (self.window.floor - 1) * state.service_time)

    def _far_locked(self, state: TeacherState) -> Optional[float]:
        """Its round trip when 20 ms or more (``NEGLIGIBLE_ROUND_TRIP``), else None: the measured one
        (``_round_trip_locked``), or already the latest probe's when that is ``FAR_PROBE`` or more and twice the
        measured one and its latest ``FAR_ANSWERS`` answers all took at least that plus half its seconds per
        request (a link that has just become long, before the probes that make a link change agree: 1.5-3 s at
        300 ms in which its window stayed at the floor; a lossy link's probe held for a retransmission has most
        answers quicker than it, a near teacher's slow probe on a loaded machine answers of one service time)."""
        round_trip = self._round_trip_locked(state)
        latest = state.round_trips[-1] if state.round_trips else 0.0
        if latest >= FAR_PROBE and (round_trip is None or latest > 2 * round_trip) \
                and len(state.latencies) >= FAR_ANSWERS:
            own = 0.5 * _median(state.speed) if state.speed else 0.0   # an answer also holds the teacher's part
            if min(list(state.latencies)[-FAR_ANSWERS:]) >= latest + own:
                round_trip = latest
        return round_trip if round_trip is not None and round_trip >= NEGLIGIBLE_ROUND_TRIP else None

    def _base_window_locked(self, state: TeacherState) -> int:
        """Its window without a delay tail: the Vegas-stepped one of a far teacher, the floor for a near one."""
        far = self._far_locked(state)
        if far is None:
            return self.window.floor   # near (or the link healed): the floor at once
        return self._stepped_window_locked(state, far)

    def _stepped_window_locked(self, state: TeacherState, far: float) -> int:
        """Its Vegas-stepped window (``state.window``) within the floor and the cap, without a delay tail; before
        its first step over a far link (``state.window`` 0), the bandwidth-delay product at the median of its
        latest ``SPEED_SAMPLES`` seconds per request (its own speed, kept when the link changes), at most twice
        the floor (as slow start's first doubling: a connection that has just become far, or a new one, carries
        little per round trip at first; a 1.5 s link given 32 at once held the reorder buffer for seconds); or the
        window it had already stepped to over a link of about this round trip (``_link_changed``: no), which the
        probes that make the link change (``round_trip_measured``) would otherwise throw away. ``far``: its far
        round trip (``_far_locked``, not None)."""
        window = state.window
        if window == 0 and state.far_window and not _link_changed(state.far_round_trip, far):
            window = state.far_window
        elif window == 0 and state.speed:
            window = min(2 * self.window.floor, self.window.size(far, _median(state.speed)))
        return self._clamp_window(window)

    def _window_locked(self, state: TeacherState) -> int:
        """Its window: the Vegas-stepped one of a far teacher (the floor for a near one), and for a teacher with a
        delay tail (a lossy link) at least ``floor + tail / service time``: the requests it computes while an
        answer waits for its retransmission, so it is not left idle (capped by ``max_per_teacher_in_flight``)."""
        base = self._base_window_locked(state)
        tail = self._delay_tail_locked(state)
        if tail > 0 and state.service_time:
            base = max(base, self.window.floor + min(int(tail / state.service_time),
                                                     (DELAY_WINDOW_FACTOR - 1) * self.window.floor))
        return min(self.window.cap, base)

    def _view_locked(self, state: TeacherState, queued: int, now: float) -> TeacherView:
        round_trip, window = self._round_trip_locked(state), self._window_locked(state)
        return TeacherView(
            endpoint=state.endpoint, outstanding=state.outstanding, queued=queued,
            window=window, in_transit=window - self.window.floor,
            service_time=state.service_time,
            age=max(0.0, now - state.refreshed_at) if state.service_time is not None else 0.0,
            oldest_out=max(0.0, now - state.started_at[0]) if state.started_at else 0.0,
            round_trip=None if round_trip is None else max(round_trip, self._delay_tail_locked(state)),
            last_used=state.last_used)

    def _update_down_locked(self, now: float) -> None:
        if any(s.healthy for s in self._teachers.values()):
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
