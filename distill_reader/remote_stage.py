"""The remote stage: tasks to teachers through worker processes, with retries, hedges and stall detection.

One task may have several requests out at once (a hedge, or a re-issue after its teacher stalled); the first
correct answer wins, the others are discarded when they arrive (counted as ``late_answers``), so each task is
answered exactly once. What happens to a request, by how it ends:

=====================  ============================================================================
answered correctly     the task's result; the teacher's speed estimate and the latency window learn
transient failure      gRPC UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED / INTERNAL / UNKNOWN /
                       CANCELLED, err_no 10000 (predictor failed), HTTP 5xx: the teacher is set aside and
                       probed with backoff; the task is retried on another teacher after a backoff
refused as invalid     err_no 5000, INVALID_ARGUMENT, HTTP 4xx: the task goes to a teacher that has not
                       refused it; refused by every teacher -> ``TeacherRequestRefused``
wrong answer           missing fetch, wrong rows: the teacher is set aside (it may run another model) and
                       the task retried elsewhere; wrong at every teacher -> ``TeacherAnswerInvalid``
stalled                no answer after ``stall_timeout`` (adaptive): the teacher is set aside and probed,
                       its tasks are re-issued elsewhere; a late answer is discarded
credentials refused    gRPC UNAUTHENTICATED / PERMISSION_DENIED, HTTP 401 / 403: as a wrong answer;
                       refused by every teacher -> ``TeacherAuthRefused``
error in the worker    re-raised in the student with its type and the worker's traceback
=====================  ============================================================================

Hedging: when the task the reorder buffer waits on (the lowest unanswered ``seq``) has been out longer than
``hedge_delay`` (a percentile of recent latencies times a factor, clamped), it is sent once more to another
teacher, within a budget of ``hedge_budget`` x requests (+2). Dean and Barroso, "The Tail at Scale" (2013).
The numbers and verdicts (hedge delay and budget, stall timeout, outage deadline, probe timeout) come from the
rule objects of ``distill_reader.routing.stage_rules``; where a request goes, from the pool's routing policy.
While tasks are out, each usable teacher's link gets a probe of ``PROBE_HANDSHAKES`` TCP handshakes every
``RTT_PROBE_INTERVAL`` whose round trip sizes that teacher's in-flight window (``routing.window``); two probes in a
row that no handshake answers set it aside as a black hole (``_link_silent``).

Example (``DistillReader`` builds this)::

    stage = RemoteStage(pool, config, ["prediction"], RemoteOptions(request_timeout=30))
    stage.begin_epoch(1); stage.submit(task)
    results = stage.poll(timeout=0.5)    # [TaskResult(task_id, {"prediction": array})]
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from distill_base.backoff import backoff_delay
from distill_base.serving_config import ServingConfig

from .channel_options import LINK_SLACK, is_tcp_endpoint
from .errors import (
    AllTeachersDownError,
    DistillReaderError,
    TeacherAnswerInvalid,
    TeacherAuthRefused,
    TeacherRequestRefused,
)
from .feeds import feed_nbytes
from .latency_window import LatencyWindow
from .prediction_stage import PredictionStage, Task, TaskResult
from .routing.stage_rules import HEDGE_BURST, HedgeRule, OutageRule, ProbeRule, StallRule
from .routing.window import RTT_PROBE_INTERVAL
from .teacher_pool import TeacherPool
from .worker_messages import (
    Connecting,
    Done,
    Failed,
    FailureKind,
    FromWorker,
    ProbeResult,
    Ready,
    Sent,
    WorkerDied,
    WorkerSettings,
)
from .workers import WorkerPool

logger = logging.getLogger(__name__)

__all__ = ["RemoteStage", "RemoteOptions", "HEDGE_BURST"]


@dataclass(frozen=True)
class RemoteOptions(WorkerSettings):
    """Settings of the remote stage; ``DistillReader``'s keyword options of the same names (seconds).

    The workers' settings (``request_timeout``, ``keepalive_time``, ``protocol``, ``num_workers``, ...) are
    ``WorkerSettings``' fields, inherited with their one default; the fields below are the stage's own.
    """

    max_retries: int = 10
    retry_backoff: float = 0.05
    max_retry_backoff: float = 2.0
    probe_timeout: float = 2.0
    all_teachers_down_timeout: float = 60.0
    hedge_budget: float = 0.05
    hedge_percentile: float = 95.0
    hedge_factor: float = 2.0
    hedge_min_delay: float = 0.02
    hedge_max_delay: float = 1.0
    stall_factor: float = 4.0
    stall_min_timeout: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.hedge_budget <= 1.0:
            raise ValueError(f"hedge_budget must be in [0, 1], not {self.hedge_budget}")
        if not 0 < self.hedge_percentile <= 100:
            raise ValueError(f"hedge_percentile must be in (0, 100], not {self.hedge_percentile}")
        if self.hedge_min_delay > self.hedge_max_delay:
            raise ValueError(f"hedge_min_delay {self.hedge_min_delay} exceeds hedge_max_delay {self.hedge_max_delay}")
        if self.stall_min_timeout <= 0:
            raise ValueError(f"stall_min_timeout must be > 0, not {self.stall_min_timeout}")


PROBE_HANDSHAKES = 3   # TCP handshakes timed at once per link probe of a usable teacher (the least is its round trip)
MAX_LINK_PROBES = 4    # link probes out at once per teacher (each lasts up to its round trip + LINK_SLACK)
SILENT_PROBES = 2      # link probes in a row with no handshake answered set a teacher aside (a black hole)
COLD_WORKER_GRACE = 60.0   # seconds a request may wait for its worker process to start, or for its worker's first
# connection to its teacher, before its stall clock runs


@dataclass
class _Request:
    """One request out. ``sent_at`` (``time.monotonic()``) starts its hedge clock and ``stall_from`` its stall
    clock: when it was handed to a started worker, which sends it at once; one handed to a worker still starting
    (a cold worker: a fresh interpreter importing gRPC, seconds on a loaded machine) gets both started when that
    worker reports ready, or after ``COLD_WORKER_GRACE`` seconds if it never does, so the wait is not counted as
    the teacher's. A worker that must first make its connection to the teacher (``Connecting``: a health check
    that learns the wire form, the round trip, a connection with pings; ~4 round trips, 6 s 1.5 s away) has the
    stall clock wait until it says the request is sent (``Sent``): that connection has timeouts of its own
    (``TeacherClient.connect``), and the hedge clock runs on, as another teacher may answer sooner."""
    request_id: int
    task_id: int
    endpoint: str
    sent_at: float
    hedge: bool = False
    stalled: bool = False
    nbytes: int = 0        # its feeds' bytes (the stall clock of a far teacher allows TCP's slow start to send them)
    stall_from: float = 0.0   # when its stall clock starts (``time.monotonic()``; 0: ``sent_at``)
    new_connection: bool = False   # it went out on a connection its worker made for it (``Sent``)

    def __post_init__(self) -> None:
        self.stall_from = self.stall_from or self.sent_at


@dataclass
class _TaskState:
    task: Task
    failures: int = 0                                    # transient failures: the retry budget
    tried: list[str] = field(default_factory=list)
    live: set[int] = field(default_factory=set)          # request ids out
    queued: bool = False                                 # in the waiting queue or the retry heap
    hedges: int = 0
    refused: dict[str, str] = field(default_factory=dict)   # endpoint -> why it refused the request
    wrong: dict[str, str] = field(default_factory=dict)     # endpoint -> what was wrong with its answer
    unroutable_since: Optional[float] = None


class RemoteStage(PredictionStage):
    """Send tasks to teachers through worker processes; retry, hedge and re-issue; answer each task once.

    Workers are started on the first ``submit`` (so a stage that is never asked costs nothing) and persist
    across epochs until ``close()``.
    """

    def __init__(self, pool: TeacherPool, config: ServingConfig, fetch: Sequence[str], options: RemoteOptions):
        self.pool = pool
        self.config = config
        self.fetch = list(fetch)
        self.options = options
        self.workers: Optional[WorkerPool] = None
        self._ids = itertools.count(1)
        self._tasks: dict[int, _TaskState] = {}
        self._requests: dict[int, _Request] = {}
        self._orphans: dict[int, _Request] = {}   # requests of ended epochs still at a teacher: they hold its slot
        self._waiting: list[tuple[int, int, int, bool]] = []   # heap (seq, order, task_id, hedge)
        self._delayed: list[tuple[float, int, int]] = []        # heap (due, order, task_id): retry backoff
        self._probing: dict[int, str] = {}
        self._known_endpoints: set[str] = set()
        self._results: list[TaskResult] = []
        self._rtt_probes: dict[int, tuple[str, float, int]] = {}   # probe id -> (endpoint, sent at, handshakes)
        self._rtt_probed: dict[str, float] = {}              # endpoint -> when its last round-trip probe went
        self._rtt_answered: dict[str, float] = {}            # endpoint -> when its last one came back
        self._silent: dict[str, int] = {}                    # endpoint -> handshake probes unanswered in a row
        self.latencies = LatencyWindow()
        self.counts = self._zero_counts()
        self._stopped_mid_epoch = False
        o = options
        self.hedge_rule = HedgeRule(o.hedge_budget, o.hedge_percentile, o.hedge_factor, o.hedge_min_delay,
                                    o.hedge_max_delay)
        self.stall_rule = StallRule(o.stall_factor, o.stall_min_timeout, o.request_timeout)
        self.outage_rule = OutageRule(o.all_teachers_down_timeout)
        self.probe_rule = ProbeRule(o.probe_timeout)

    # -- PredictionStage ----------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        self._reset_epoch()
        self._stopped_mid_epoch = False
        self.pool.restart_down_timer()

    def in_flight_limit(self) -> int:
        """Tasks the stage takes at once: the teachers' windows, each counted as many times as its latency fits
        in the slowest teacher's (``TeacherPool.read_ahead``): the fast ones keep working while a far or slow
        one holds the task the reorder buffer waits on."""
        return self.pool.read_ahead()

    def capacity(self) -> int:
        return self.in_flight_limit() - len(self._tasks)

    def submit(self, task: Task) -> None:
        """Queue ``task`` for a worker process and a teacher.

        Raises:
            DistillReaderError: no teacher is configured.
        """
        if not self.pool.dynamic and not self.pool.endpoints:
            raise DistillReaderError("no teacher configured: call set_fixed_teacher(...) or set_dynamic_teacher(...)")
        self._ensure_workers()
        state = _TaskState(task)
        self._tasks[task.task_id] = state
        self._queue(state)
        self._dispatch()

    def poll(self, timeout: float) -> list[TaskResult]:
        """The tasks answered within ``timeout`` seconds; retries, hedges and failures are handled here.

        Raises:
            DistillReaderError: the worker processes were stopped during the epoch, or a task failed for good
                (AllTeachersDownError, TeacherAnswerInvalid, TeacherRequestRefused, TeacherAuthRefused).
            FeedError: a worker found a feed that does not fit (re-raised with its type).
        """
        if self._stopped_mid_epoch:
            raise DistillReaderError("the reader's worker processes were stopped (close()) during this epoch")
        self._dispatch()
        if self.workers is not None and self._busy():
            now = time.monotonic()
            wake = min([now + max(0.0, timeout)] + [t for t in self._wake_times() if t is not None])
            for worker, message in self.workers.receive(timeout=0.0 if self._results else max(0.0, wake - now)):
                if isinstance(message, Ready):
                    self._worker_ready(worker)
                elif isinstance(message, (Connecting, Sent)):
                    self._connection_news(message)
                else:
                    self._handle(message)
            self._check_stalls()
            self._maybe_hedge()
            self._check_down()
            self._dispatch()
        results, self._results = self._results, []
        return results

    def end_epoch(self, complete: bool) -> dict[str, Any]:
        stats = dict(self.counts)
        self._reset_epoch()
        return stats

    def close(self) -> None:
        self._stopped_mid_epoch = bool(self._tasks)
        if self.workers is not None:
            self.workers.close()
            self.workers = None
        self._reset_epoch()
        for request in self._orphans.values():   # lost with the workers
            self.pool.released(request.endpoint)
        self._orphans.clear()
        for endpoint in self._probing.values():   # lost with the workers: probe again after the backoff
            self.pool.probe_result(endpoint, False)
        self._probing.clear()
        self._rtt_probes.clear()

    @property
    def worker_pids(self) -> list[int]:
        return self.workers.pids if self.workers is not None else []

    def hedge_delay(self, endpoint: Optional[str] = None) -> float:
        """Seconds the head task may be out (at ``endpoint``) before it is hedged (``HedgeRule``)."""
        return self.hedge_rule.delay(self.latencies, self.pool.round_trip(endpoint) if endpoint else None)

    def stall_timeout(self, endpoint: Optional[str] = None, out: Optional[tuple[int, bool]] = None) -> float:
        """Seconds without an answer after which a teacher (``endpoint``) counts as stalled (``StallRule``: its
        round trip, the spread of its latencies and, while a connection to it may be cold, the bytes of its
        requests out allowed: one went out on a connection its worker has just made (``Sent``), or the teacher
        has not answered lately (``TeacherPool.connection_cold``)). ``out``: (those bytes, whether one went out on
        a new connection) when the caller has them (``_requests_out``)."""
        if endpoint is None:
            return self.stall_rule.timeout(self.latencies)
        bytes_out, fresh = out if out is not None else self._requests_out().get(endpoint, (0, False))
        if not fresh and not self.pool.connection_cold(endpoint):
            bytes_out = 0   # connections in use send from the windows they have grown, not from slow start
        return self.stall_rule.timeout(self.latencies, self.pool.stall_round_trip(endpoint),
                                       self.pool.latency_spread(endpoint), bytes_out)

    def _requests_out(self) -> dict[str, tuple[int, bool]]:
        """endpoint -> (the feed bytes of its requests out, whether one of them went out on a connection made for
        it), of the requests not given up as stalled."""
        out: dict[str, tuple[int, bool]] = {}
        for r in self._requests.values():
            if not r.stalled:
                nbytes, fresh = out.get(r.endpoint, (0, False))
                out[r.endpoint] = (nbytes + r.nbytes, fresh or r.new_connection)
        return out

    # -- queueing and sending -----------------------------------------------------------------------------
    @staticmethod
    def _zero_counts() -> dict[str, int]:
        return {"requests": 0, "retries": 0, "hedges": 0, "hedge_wins": 0, "late_answers": 0, "stalls": 0}

    def _reset_epoch(self) -> None:
        """Forget the epoch's tasks. Requests still out become orphans: they keep their teacher's slot until
        they end, and how they end still counts for the teacher's health and speed, not for any task."""
        self._orphans.update(self._requests)
        self._tasks.clear()
        self._requests.clear()
        self._waiting.clear()
        self._delayed.clear()
        self._results.clear()
        self.counts = self._zero_counts()

    def _busy(self) -> bool:
        return bool(self._tasks or self._requests or self._probing)

    def _queue(self, state: _TaskState, hedge: bool = False) -> None:
        if not hedge:
            state.queued = True
        heapq.heappush(self._waiting, (state.task.seq, next(self._ids), state.task.task_id, hedge))

    def _retry_later(self, state: _TaskState, text: str) -> None:
        state.failures += 1
        if state.failures > self.options.max_retries:
            raise DistillReaderError(
                f"task {state.task.seq} (samples from {state.task.sample_start}) failed {state.failures} times on "
                f"teachers {sorted(set(state.tried))}; last error: {text}")
        delay = backoff_delay(state.failures, self.options.retry_backoff, self.options.max_retry_backoff)
        logger.info("retrying task %d in %.0f ms: %s", state.task.seq, delay * 1000, text)
        state.queued = True
        heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._ids), state.task.task_id))

    def _ensure_workers(self) -> None:
        if self.workers is not None and self.workers.owner_pid != os.getpid():
            # a forked child of the student (e.g. a multiprocess data loader): start workers of its own
            # (WorkerPool.close only drops the sockets here; lost probes are rescheduled)
            tasks = list(self._tasks.values())
            self.close()
            for state in tasks:
                state.live.clear()
                self._tasks[state.task.task_id] = state
                self._queue(state)
        if self.workers is None or self.workers.closed:
            from google.protobuf import text_format

            config_text = text_format.MessageToString(self.config.to_proto())
            self.workers = WorkerPool(WorkerSettings.pick(self.options), config_text, self.config.source, self.fetch)

    def _dispatch(self) -> None:
        if self.workers is None:
            return
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, task_id = heapq.heappop(self._delayed)
            state = self._tasks.get(task_id)
            if state is not None:
                heapq.heappush(self._waiting, (state.task.seq, next(self._ids), task_id, False))
        self._follow_membership()
        for endpoint in self.pool.probes_due(now):
            probe_id = next(self._ids)
            self._probing[probe_id] = endpoint
            self.workers.send_probe(probe_id, endpoint, self.probe_rule.probe_timeout(self.pool.round_trip(endpoint)))
        self._probe_round_trips(now)
        queued: dict[str, int] = {}
        held = []
        while self._waiting:
            entry = heapq.heappop(self._waiting)
            _, _, task_id, hedge = entry
            state = self._tasks.get(task_id)
            if state is None or (hedge and not state.live):
                continue   # answered meanwhile, or the hedged request failed and the task was re-queued
            exclude = {self._requests[r].endpoint for r in state.live} | set(state.refused) | set(state.wrong)
            send_to, wait_for = self.pool.route(avoid=state.tried[-1:], exclude=exclude, queued=queued)
            if send_to is None:
                if wait_for is not None:
                    queued[wait_for] = queued.get(wait_for, 0) + 1
                elif state.unroutable_since is None and not hedge:   # (a hedge is optional: no outage)
                    state.unroutable_since = now
                held.append(entry)
                if wait_for is not None and self.pool.all_busy():
                    break   # the rest would wait too
                continue
            state.unroutable_since = None
            self._send(state, send_to, hedge)
        for entry in held:
            heapq.heappush(self._waiting, entry)

    def _send(self, state: _TaskState, endpoint: str, hedge: bool) -> None:
        request = _Request(next(self._ids), state.task.task_id, endpoint, time.monotonic(), hedge=hedge,
                           nbytes=feed_nbytes(state.task.feeds))
        if not hedge:
            state.queued = False
        state.live.add(request.request_id)
        state.tried.append(endpoint)
        self._requests[request.request_id] = request
        self.pool.started(endpoint)
        self.counts["requests"] += 1
        self.counts["hedges"] += hedge
        worker = self.workers.send_task(request.request_id, endpoint, state.task.feeds, state.task.size,
                                        request.nbytes)
        if not getattr(worker, "ready", True):   # a cold worker: the clocks start when it is ready (_worker_ready)
            request.sent_at += COLD_WORKER_GRACE
            request.stall_from = request.sent_at

    def _worker_ready(self, worker: Any) -> None:
        """A worker finished starting: the requests waiting in it are sent now, their clocks start now."""
        now = time.monotonic()
        for request_id in worker.outstanding:
            request = self._requests.get(request_id) or self._orphans.get(request_id)
            if request is not None:
                request.sent_at, request.stall_from = min(request.sent_at, now), min(request.stall_from, now)

    def _connection_news(self, message: Union[Connecting, Sent]) -> None:
        """A worker is making its connection for a request (its stall clock waits, at most ``COLD_WORKER_GRACE``)
        or has sent it on the connection made (its stall clock starts now)."""
        request = self._requests.get(message.request_id) or self._orphans.get(message.request_id)
        if request is not None:
            now = time.monotonic()
            request.stall_from = now + COLD_WORKER_GRACE if isinstance(message, Connecting) else now
            request.new_connection = isinstance(message, Sent)

    def _probe_round_trips(self, now: float) -> None:
        """While tasks are out: each usable teacher's link probed every ``RTT_PROBE_INTERVAL`` with
        ``PROBE_HANDSHAKES`` TCP handshakes at once (a worker's ``ProbeResult``: the least of them, its network
        round trip, which sizes its in-flight window), and at once when its latest probe read a much longer round
        trip that is not yet confirmed (``TeacherPool.round_trip_unconfirmed``). Several may be out per teacher
        (at most ``MAX_LINK_PROBES``): each has ``link_silence_limit`` seconds, and ``SILENT_PROBES`` in a row
        with no handshake answered set the teacher aside (``_link_silent``)."""
        if not self._tasks:
            return
        out: dict[str, int] = {}
        for endpoint, _, _ in self._rtt_probes.values():
            out[endpoint] = out.get(endpoint, 0) + 1
        for endpoint in self.pool.usable_endpoints():
            last = self._rtt_probed.get(endpoint, -1e9)
            confirm = self.pool.round_trip_unconfirmed(endpoint) and last < self._rtt_answered.get(endpoint, -1e9)
            if out.get(endpoint, 0) >= MAX_LINK_PROBES or (now - last < RTT_PROBE_INTERVAL and not confirm):
                continue
            probe_id = next(self._ids)
            handshakes = PROBE_HANDSHAKES if is_tcp_endpoint(endpoint) else 0   # else a health check, timed here
            self._rtt_probes[probe_id] = (endpoint, now, handshakes)
            self._rtt_probed[endpoint] = now
            timeout = self.link_silence_limit(endpoint) if handshakes else \
                self.probe_rule.probe_timeout(self.pool.round_trip(endpoint))
            self.workers.send_probe(probe_id, endpoint, timeout, handshakes)

    def link_silence_limit(self, endpoint: str) -> float:
        """Seconds a teacher's TCP handshakes may go unanswered before that probe counts as silent:
        ``LINK_SLACK`` (2 s) plus its round trip as the stall clock allows it (``TeacherPool.stall_round_trip``), so
        a black hole 1.5 s away is noticed about 2 s after its round trip, not after its own multi-second latencies
        (which the stall clock's percentiles hold). A link that slows by less than ``LINK_SLACK`` answers in time,
        as its keepalive survives it (channel_options); one that slows by more looks like a black hole until a
        health probe finds it. A lost SYN or SYN-ACK costs 1 s (its retransmission), so a lossy link's handshakes
        are mostly in time, and every one of two probes in a row late almost never (~0.09^6)."""
        return LINK_SLACK + (self.pool.stall_round_trip(endpoint) or 0.0)

    def _link_silent(self, endpoint: str, message: str) -> None:
        """A usable teacher's handshake probe got no answer: ``SILENT_PROBES`` in a row (a lossy link loses every
        handshake of one probe rarely, of two in a row almost never) set it aside as a black hole, its requests
        re-issued elsewhere as for a stall."""
        self._silent[endpoint] = self._silent.get(endpoint, 0) + 1
        if self._silent[endpoint] < SILENT_PROBES or endpoint not in self.pool.usable_endpoints():
            return
        self._silent[endpoint] = 0
        reason = f"its link is silent: {message} ({SILENT_PROBES} probes in a row)"
        logger.warning("teacher %s: %s; set aside", endpoint, reason)
        self._give_up_on(endpoint, reason)

    def _follow_membership(self) -> None:
        current = set(self.pool.endpoints)
        for gone in self._known_endpoints - current:
            self.workers.forget(gone)
        self._known_endpoints = current

    def _wake_times(self) -> list[Optional[float]]:
        """When ``poll`` must look again even without a message: retry, probe, outage, hedge, stall."""
        times = [self._delayed[0][0] if self._delayed else None, self.pool.next_probe_time(), self._down_deadline()]
        oldest: dict[str, float] = {}
        for r in self._requests.values():
            if not r.stalled:
                oldest[r.endpoint] = min(r.stall_from, oldest.get(r.endpoint, r.stall_from))
        out = self._requests_out()
        times += [sent + self.stall_timeout(endpoint, out[endpoint]) for endpoint, sent in oldest.items()]
        head = self._head()
        if head is not None and head.live and not head.hedges:
            first = min((self._requests[r] for r in head.live), key=lambda r: r.sent_at)
            times.append(first.sent_at + self.hedge_delay(first.endpoint))
        return times

    # -- answers and failures -------------------------------------------------------------------------------
    def _handle(self, message: Union[FromWorker, WorkerDied]) -> None:
        """One message of the pool: ``Done`` / ``Failed`` / ``ProbeResult`` / ``WorkerDied`` (others: ignored)."""
        if isinstance(message, (Done, Failed)):
            request = self._requests.pop(message.request_id, None) or self._orphans.pop(message.request_id, None)
            if request is None:
                return   # a request of an abandoned epoch
            state = self._tasks.get(request.task_id)
            if state is not None:
                state.live.discard(request.request_id)
            if isinstance(message, Done):
                self._answered(request, state, message.outputs, message.latency, message.server_time)
            else:
                self._failed(request, state, message)
        elif isinstance(message, ProbeResult):
            probe = self._rtt_probes.pop(message.probe_id, None)
            if probe is not None:   # a usable teacher's link: its round trip, or no handshake answered
                _, sent, handshakes = probe
                self._rtt_answered[message.endpoint] = now = time.monotonic()
                if message.healthy:
                    self._silent[message.endpoint] = 0
                    self.pool.round_trip_measured(message.endpoint, message.round_trip if message.round_trip
                                                  is not None else now - sent, max(1, handshakes))
                elif handshakes:   # (a failed health check says nothing: requests do)
                    self._link_silent(message.endpoint, message.message)
                return
            if self._probing.pop(message.probe_id, None) is None:
                return   # a probe lost with a closed pool (close() rescheduled it)
            self._silent[message.endpoint] = 0
            self.pool.probe_result(message.endpoint, message.healthy, message.message)
            if message.healthy:
                logger.info("teacher %s is healthy again; back in service", message.endpoint)
        elif isinstance(message, WorkerDied):
            probes = message.probes
            for request_id in message.request_ids:
                request = self._requests.pop(request_id, None) or self._orphans.pop(request_id, None)
                if request is None:
                    continue
                self.pool.released(request.endpoint)
                state = self._tasks.get(request.task_id)
                if state is not None:
                    state.live.discard(request_id)
                    if not state.live and not state.queued:
                        self._queue(state)
            for probe_id, endpoint in probes.items():
                if self._rtt_probes.pop(probe_id, None) is not None:
                    continue
                self._probing.pop(probe_id, None)
                self.pool.probe_result(endpoint, False, "probe lost with a dead worker")

    def _answered(self, request: _Request, state: Optional[_TaskState], outputs: dict, latency: float,
                  server_time: Optional[float] = None) -> None:
        problem = _answer_problem(self.fetch, outputs, request.endpoint,
                                  state.task.size if state is not None else None)
        if problem is not None:
            self.pool.failed(request.endpoint, problem)
            if state is not None:
                self._wrong_answer(state, request.endpoint, problem)
            return
        self.pool.succeeded(request.endpoint, latency, len(next(iter(outputs.values()), ())), server_time,
                            late=request.stalled)
        self.latencies.add(latency)
        if state is None:
            self.counts["late_answers"] += 1   # another request of the task answered first
            return
        del self._tasks[request.task_id]
        self.counts["hedge_wins"] += request.hedge   # requests still out: discarded when their answers come
        self._results.append(TaskResult(request.task_id, outputs))

    def _failed(self, request: _Request, state: Optional[_TaskState], failure: Failed) -> None:
        endpoint, kind, text = request.endpoint, failure.kind, failure.message
        if kind is FailureKind.UNAVAILABLE:
            self.pool.failed(endpoint, text)
            if state is not None and not state.live and not state.queued:
                self.counts["retries"] += 1
                self._retry_later(state, text)
            return
        if kind in (FailureKind.ANSWER, FailureKind.AUTH):
            self.pool.failed(endpoint, text)
            if state is not None:
                self._wrong_answer(state, endpoint, text, auth=kind is FailureKind.AUTH)
            return
        self.pool.released(endpoint)
        if state is None:
            return   # the task was answered by another request, or its epoch ended
        if kind is FailureKind.REJECTED:
            self._refused(state, endpoint, text)
        elif failure.error is not None:   # FailureKind.ERROR: re-raised with its type and the worker's traceback
            raise failure.error.rebuild(DistillReaderError)
        else:
            raise DistillReaderError(f"in a DistillReader worker process: {text}")

    def _wrong_answer(self, state: _TaskState, endpoint: str, text: str, auth: bool = False) -> None:
        """The teacher is already set aside (and logged by the pool); retry elsewhere unless every one was wrong."""
        state.wrong[endpoint] = text
        if set(self.pool.endpoints) <= set(state.wrong):
            answers = "; ".join(f"{e}: {t}" for e, t in state.wrong.items())
            if auth:
                raise TeacherAuthRefused(f"every teacher refused this student's credentials or TLS settings "
                                         f"(token, tls_ca, client certificate): {answers}")
            raise TeacherAnswerInvalid(endpoint, f"no teacher answered task {state.task.seq} (samples from "
                                                 f"{state.task.sample_start}) correctly: {answers}")
        if not state.live:
            self._reissue(state)

    def _refused(self, state: _TaskState, endpoint: str, text: str) -> None:
        state.refused[endpoint] = text
        if set(self.pool.endpoints) <= set(state.refused):
            task = state.task
            slots = [f"{name} {np.asarray(a).dtype} {list(np.shape(a))}" for name, a in task.feeds.items()]
            raise TeacherRequestRefused(
                f"every teacher refused task {task.seq} (samples {task.sample_start}.."
                f"{task.sample_start + task.size - 1}) as an invalid request; slots sent: {', '.join(slots)}; "
                + "; ".join(f"{e}: {t}" for e, t in state.refused.items()), task.sample_start, list(task.feeds))
        if not state.live:
            self._reissue(state)

    def _reissue(self, state: _TaskState) -> None:
        """Send the task again at once (another teacher: the route excludes the ones that failed it)."""
        if not state.queued:
            self.counts["retries"] += 1
            self._queue(state)

    # -- gray failures: hedges, stalls, outages --------------------------------------------------------------
    def _head(self) -> Optional[_TaskState]:
        """The unanswered task with the lowest ``seq``: the one the reorder buffer waits on."""
        return min(self._tasks.values(), key=lambda s: s.task.seq, default=None)

    def _maybe_hedge(self) -> None:
        head = self._head()
        if head is None or not head.live or head.hedges or self.hedge_rule.budget <= 0:
            return
        first = min((self._requests[r] for r in head.live), key=lambda r: r.sent_at)
        if time.monotonic() - first.sent_at < self.hedge_delay(first.endpoint):
            return
        if not self.hedge_rule.allowed(self.counts["hedges"], self.counts["requests"]):
            return
        if len(self.pool.usable_endpoints()) < 2:
            return   # nowhere else to send it
        head.hedges += 1
        self._queue(head, hedge=True)

    def _check_stalls(self) -> None:
        """A teacher with a request out longer than ``stall_timeout``: set aside, all its tasks re-issued."""
        now = time.monotonic()
        limits = {e: self.stall_timeout(e, out) for e, out in self._requests_out().items()}
        stalled = {r.endpoint for r in self._requests.values()
                   if not r.stalled and now - r.stall_from > limits[r.endpoint]}
        for endpoint in stalled:
            limit = limits[endpoint]
            age = now - min(r.stall_from for r in self._requests.values() if r.endpoint == endpoint and not r.stalled)
            logger.warning("teacher %s: no answer for %.1fs (stall timeout %.2fs); set aside, its request(s) "
                           "re-issued elsewhere", endpoint, age, limit)
            self._give_up_on(endpoint, f"requests stalled: no answer for {age:.1f}s")

    def _give_up_on(self, endpoint: str, reason: str) -> None:
        """Set ``endpoint`` aside (counted as a stall) and re-issue elsewhere every task whose requests out are
        all at stalled teachers; a late answer is still taken."""
        requests = [r for r in self._requests.values() if r.endpoint == endpoint and not r.stalled]
        self.counts["stalls"] += 1
        self.pool.set_aside(endpoint, reason)
        for request in requests:
            request.stalled = True
        for request in requests:
            state = self._tasks.get(request.task_id)
            if state is not None and all(self._requests[r].stalled for r in state.live):
                self._reissue(state)

    def _down_deadline(self) -> Optional[float]:
        since = self.pool.down_since()
        stuck = min((s.unroutable_since for s in self._tasks.values() if s.unroutable_since is not None),
                    default=None)
        return self.outage_rule.deadline(since, stuck)

    def _check_down(self) -> None:
        deadline = self._down_deadline()
        if deadline is None or not self._tasks or time.monotonic() < deadline:
            return
        raise AllTeachersDownError(
            f"no teacher was usable for {self.outage_rule.timeout:g}s; teachers: "
            f"{self.pool.describe()}; last error: {self.pool.last_error or 'none'}")


def _answer_problem(fetch: Sequence[str], outputs: dict, endpoint: str, size: Optional[int]) -> Optional[str]:
    """What is wrong with an answer (a missing fetch, rows that are not the task's samples), or None."""
    for name in fetch:
        value = outputs.get(name)
        if value is None:
            return f"teacher {endpoint}: answer lacks fetch {name!r}"
        per_sample = isinstance(value, list)   # a variable-length fetch: one array per sample (distill_reader.feeds)
        if (not per_sample and np.ndim(value) == 0) or (size is not None and len(value) != size):
            shape = f"{len(value)} per-sample arrays" if per_sample else f"shape {list(np.shape(value))}"
            return f"teacher {endpoint}: fetch {name!r} has {shape} for a request of {size}"
    return None
