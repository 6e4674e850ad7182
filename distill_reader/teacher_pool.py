"""Which teachers are usable right now: health, backoff and load state of the student's teachers.

The pool lives in the student process and only keeps state; the I/O (requests and health probes) is done by
the worker processes, which report back. A teacher whose request fails is set aside and probed again after an
exponential backoff with jitter (not hammered); when a probe finds it healthy it returns to service. The set of
teachers can change at any time with ``set_endpoints`` (a fixed list, or ZooKeeper's fair share delivered from
a kazoo thread), so every method takes the pool's lock.

Example::

    pool = TeacherPool(["127.0.0.1:9292", "127.0.0.1:9293"], per_teacher_in_flight=2)
    endpoint = pool.pick()            # least loaded usable teacher with spare capacity, or None
    pool.started(endpoint)
    pool.failed(endpoint, "gRPC UNAVAILABLE")   # set aside; pool.probes_due() names it after the backoff
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random = random) -> float:
    """Exponential backoff with jitter: ``d = min(cap, base * 2**(failures-1))``, a delay in ``[d/2, d]``."""
    exp = min(cap, base * (2 ** max(0, failures - 1)))
    return exp / 2 + rng.uniform(0, exp / 2)


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
    # per-epoch statistics
    requests: int = 0
    samples: int = 0
    latency_total: float = 0.0
    errors: int = 0


@dataclass
class PoolSnapshot:
    """A copy of the pool's statistics for the epoch summary."""

    teachers: list[TeacherState] = field(default_factory=list)


class TeacherPool:
    """Health and load of the student's teachers (thread-safe).

    Args:
        endpoints: initial ``host:port`` list (may be empty and filled later by ``set_endpoints``).
        per_teacher_in_flight: requests outstanding at one teacher at most.
        probe_backoff: first delay before probing a failed teacher again, seconds; doubles per failure.
        max_probe_backoff: cap of that delay.
    """

    def __init__(self, endpoints: Iterable[str] = (), per_teacher_in_flight: int = 2,
                 probe_backoff: float = 0.2, max_probe_backoff: float = 5.0, seed: Optional[int] = None):
        if per_teacher_in_flight < 1:
            raise ValueError(f"per_teacher_in_flight must be >= 1, not {per_teacher_in_flight}")
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
                    self._teachers[endpoint] = self._retired.pop(endpoint, None) or TeacherState(endpoint)
                    self._teachers[endpoint].healthy = True
                    self._teachers[endpoint].failures = 0
                    self._teachers[endpoint].probing = False
            self._update_down_locked(time.monotonic())

    @property
    def endpoints(self) -> list[str]:
        with self._lock:
            return list(self._teachers)

    # -- choosing -----------------------------------------------------------------------------------------
    def pick(self, avoid: Iterable[str] = ()) -> Optional[str]:
        """The usable teacher with the fewest outstanding requests and spare capacity, or None.

        Teachers in ``avoid`` (e.g. the one a retried request just failed on) are chosen only when no other
        teacher has capacity.
        """
        avoid = set(avoid)
        with self._lock:
            candidates = [t for t in self._teachers.values()
                          if t.healthy and t.outstanding < self.per_teacher_in_flight]
            if not candidates:
                return None
            preferred = [t for t in candidates if t.endpoint not in avoid] or candidates
            best = min(preferred, key=lambda t: (t.outstanding, t.last_used))
            return best.endpoint

    def started(self, endpoint: str) -> None:
        with self._lock:
            state = self._state_locked(endpoint)
            if state is not None:
                state.outstanding += 1
                state.last_used = time.monotonic()

    def succeeded(self, endpoint: str, latency: float, samples: int) -> None:
        with self._lock:
            state = self._state_locked(endpoint)
            if state is None:
                return
            state.outstanding = max(0, state.outstanding - 1)
            state.requests += 1
            state.samples += samples
            state.latency_total += latency
            state.failures = 0

    def failed(self, endpoint: str, error: str) -> None:
        """A request to ``endpoint`` failed: set it aside and schedule a probe after the backoff."""
        now = time.monotonic()
        with self._lock:
            self.last_error = error
            state = self._state_locked(endpoint)
            if state is None:
                return
            state.outstanding = max(0, state.outstanding - 1)
            state.errors += 1
            state.last_error = error
            if state.healthy:   # the first failure of a burst sets it aside; later ones only count
                state.failures += 1
                state.healthy = False
                state.probing = False
                state.next_probe_at = now + backoff_delay(state.failures, self.probe_backoff,
                                                          self.max_probe_backoff, self._rng)
            self._update_down_locked(now)

    def released(self, endpoint: str) -> None:
        """A request was abandoned (no answer will be counted)."""
        with self._lock:
            state = self._state_locked(endpoint)
            if state is not None:
                state.outstanding = max(0, state.outstanding - 1)

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

    def describe(self) -> str:
        """``a:1 (error ...), b:2 (healthy)`` for error messages."""
        with self._lock:
            if not self._teachers:
                return "no teachers configured"
            parts = []
            for s in self._teachers.values():
                status = "usable" if s.healthy else f"set aside: {s.last_error or 'failed'}"
                parts.append(f"{s.endpoint} ({status})")
            return ", ".join(parts)

    def take_stats(self) -> PoolSnapshot:
        """Per-teacher statistics since the last call (then reset)."""
        with self._lock:
            snapshot = PoolSnapshot()
            for state in list(self._teachers.values()) + list(self._retired.values()):
                if state.requests or state.errors:
                    snapshot.teachers.append(TeacherState(
                        state.endpoint, requests=state.requests, samples=state.samples,
                        latency_total=state.latency_total, errors=state.errors))
                state.requests = state.samples = state.errors = 0
                state.latency_total = 0.0
            return snapshot

    # -- internals ----------------------------------------------------------------------------------------
    def _state_locked(self, endpoint: str) -> Optional[TeacherState]:
        return self._teachers.get(endpoint) or self._retired.get(endpoint)

    def _update_down_locked(self, now: float) -> None:
        if any(s.healthy for s in self._teachers.values()):
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
