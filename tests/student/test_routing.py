"""Routing policy apart from mechanism (distill_reader.routing): the one-method interface, the in-flight window
that follows a teacher's bandwidth-delay product, estimates that recover within a few answers, the stage's rule
objects, and timeouts that follow the round trip (channel_options). Pool-level, with a simulated clock and
simulated serial teachers; the real-network counterpart is benchmarks/bench_network_faults.py."""
from __future__ import annotations

import heapq
import os

import numpy as np
import pytest

from distill_base.serving_config import ServingConfig
from distill_reader import channel_options, teacher_pool
from distill_reader.latency_window import LatencyWindow
from distill_reader.prediction_stage import Task
from distill_reader.remote_stage import RemoteOptions, RemoteStage
from distill_reader.routing import RoutingPolicy, TeacherView
from distill_reader.routing.peak_ewma import PeakEwmaPolicy
from distill_reader.routing.stage_rules import HedgeRule, OutageRule, ProbeRule, StallRule, slow_start_rounds
from distill_reader.routing.window import InFlightWindow
from distill_reader.teacher_pool import TeacherPool


def test_the_window_is_the_bandwidth_delay_product_above_the_floor_up_to_the_cap():
    window = InFlightWindow(floor=2, cap=16)
    assert window.size(0.300, 0.050) == 8, "300 ms of link at one answer per 50 ms holds 6 more requests"
    assert window.size(None, 0.050) == 2 and window.size(0.300, None) == 2, "unknown: the floor"
    assert window.size(0.005, 0.001) == 2, "a round trip under 20 ms (loopback, the student's pipes) adds none"
    assert window.size(3.0, 0.050) == 16, "capped"
    assert InFlightWindow(floor=2, cap=2).size(0.300, 0.050) == 2, "cap == floor fixes the window"
    with pytest.raises(ValueError, match="max_per_teacher_in_flight"):
        InFlightWindow(floor=4, cap=2)
    with pytest.raises(ValueError, match="per_teacher_in_flight must be >= 1"):
        TeacherPool(["a:1"], per_teacher_in_flight=0)


def _simulate(monkeypatch, delays: dict, service: float = 0.05, seconds: float = 12.0, heal_at: float = None,
              on_answer=None, transfer: float = 0.0, **pool_options) -> tuple[dict, dict]:
    """Saturated demand through ``TeacherPool.route`` to serial teachers (``service`` s per request, one-way
    link delay per teacher in ``delays``), as RemoteStage drives it: at most ``total_window()`` tasks, each pass
    routes every waiting task (``queued`` counts those held for a busy teacher); a round-trip probe per teacher
    every 0.5 s. ``heal_at``: the delays become 0 then; ``on_answer(pool, now, endpoint)`` after each answer;
    ``transfer``: seconds a request to a teacher with a delay takes to send on top of it (its bytes at the link's
    rate), which a TCP handshake's round trip does not show.
    Returns answers per teacher before and after the heal."""
    clock = [0.0]
    monkeypatch.setattr(teacher_pool.time, "monotonic", lambda: clock[0])
    pool = TeacherPool(list(delays), **pool_options)
    delays = dict(delays)
    free_at = dict.fromkeys(delays, 0.0)
    events: list = []   # (time, order, kind, endpoint, sent)
    order = iter(range(10 ** 9))
    answers = [dict.fromkeys(delays, 0), dict.fromkeys(delays, 0)]
    out = 0
    next_probe = 0.0
    while clock[0] < seconds:
        if heal_at is not None and clock[0] >= heal_at and any(delays.values()):
            delays = dict.fromkeys(delays, 0.0)
        if clock[0] >= next_probe:
            for endpoint, delay in delays.items():
                pool.round_trip_measured(endpoint, 2 * delay + 0.001)
            next_probe += 0.5
        queued: dict = {}
        for _ in range(max(0, pool.total_window() - out)):
            send_to, wait_for = pool.route(queued=queued)
            if send_to is None:
                if wait_for is None:
                    break
                queued[wait_for] = queued.get(wait_for, 0) + 1
                continue
            pool.started(send_to)
            out += 1
            arrive = clock[0] + delays[send_to] + (transfer if delays[send_to] else 0.0)
            start = max(arrive, free_at[send_to])
            free_at[send_to] = start + service
            heapq.heappush(events, (free_at[send_to] + delays[send_to], next(order), send_to, clock[0]))
        clock[0], _, endpoint, sent = heapq.heappop(events)
        pool.succeeded(endpoint, clock[0] - sent, 8)
        out -= 1
        if on_answer is not None:
            on_answer(pool, clock[0], endpoint)
        if clock[0] > 2.0:   # after the warm-up
            answers[heal_at is not None and clock[0] >= heal_at][endpoint] += 1
    return answers[0], answers[1]


def test_a_teacher_300ms_away_gets_its_share(monkeypatch):
    """Before windows followed the round trip, 2 requests in flight over 350 ms capped it at 1/3.5 of a near
    teacher's throughput (per_teacher_in_flight=2 as the cap reproduces that)."""
    delays = {"a:1": 0.0, "b:2": 0.0, "c:3": 0.0, "far:4": 0.15}
    answers, _ = _simulate(monkeypatch, delays, seconds=12.0)
    near = sum(answers[e] for e in ("a:1", "b:2", "c:3")) / 3
    assert answers["far:4"] >= 0.75 * near, answers   # measured 0.82 here; 0.045 with the old fixed window
    fixed, _ = _simulate(monkeypatch, delays, seconds=12.0, max_per_teacher_in_flight=2)
    assert fixed["far:4"] < 0.5 * fixed["a:1"], "the old fixed window starves it (the fault this fixes)"


class _RoundRobin:
    """A whole routing policy in a few lines: the interface is one method."""

    def __init__(self):
        self.turn = 0

    def choose(self, candidates, now):
        self.turn += 1
        return [sorted(candidates, key=lambda t: t.endpoint)[self.turn % len(candidates)]]


def test_a_routing_policy_is_one_class_with_choose():
    policy = _RoundRobin()
    assert isinstance(policy, RoutingPolicy) and isinstance(PeakEwmaPolicy(), RoutingPolicy)
    pool = TeacherPool(["a:1", "b:2", "c:3"], policy=policy)
    picks = []
    for _ in range(6):
        endpoint = pool.pick()
        pool.started(endpoint)
        pool.succeeded(endpoint, 0.01, 1)
        picks.append(endpoint)
    assert picks == ["b:2", "c:3", "a:1", "b:2", "c:3", "a:1"]
    with pytest.raises(TypeError, match="choose"):
        TeacherPool(["a:1"], policy=object())


def _view(endpoint, **fields):
    base = dict(outstanding=0, queued=0, window=2, in_transit=0, service_time=0.05, age=0.0, oldest_out=0.0,
                round_trip=None, last_used=0.0)
    base.update(fields)
    return TeacherView(endpoint, **base)


def test_peak_ewma_counts_requests_in_transit_on_a_far_link_as_not_queued():
    policy = PeakEwmaPolicy()
    near = _view("near:1", outstanding=2)
    far = _view("far:2", outstanding=6, window=8, in_transit=6, round_trip=0.3)
    assert policy.choose([near, far], 0.0)[0].endpoint == "far:2", "6 of its 8 are on the link, not queued"
    stale = _view("slow:3", service_time=0.5, age=4.0)
    fresh = _view("fast:4", outstanding=2)
    assert policy.estimate(stale, 0.05) < 0.05 + 0.45 * 0.14, "a 4 s old estimate has decayed (2 s constant)"
    assert policy.choose([stale, fresh], 0.0)[0].endpoint == "slow:3"


def test_the_stage_rules_give_the_numbers_the_stage_used():
    window = LatencyWindow()
    assert HedgeRule().delay(window) == 1.0 and StallRule().timeout(window) == 5.0
    for latency in (0.02, 0.02, 0.02, 0.04):
        window.add(latency)
    assert HedgeRule().delay(window) == pytest.approx(2 * window.percentile(95))
    assert StallRule().timeout(window) == 2.0, "4 x p99 is under the 2 s floor"
    assert StallRule().timeout(window, round_trip=1.5) == 6.5, "a far teacher: 3 round trips more"
    assert StallRule().timeout(window, round_trip=0.005) == 2.0, "a near one: none"
    assert HedgeRule().delay(window, round_trip=0.3) == pytest.approx(2 * window.percentile(95) + 0.3)
    assert HedgeRule(budget=0.05).allowed(hedges=2, requests=10) and not HedgeRule().allowed(7, 100)
    assert OutageRule(60).deadline(None, 5.0, 3.0) == 63.0 and OutageRule(60).deadline(None) is None
    assert ProbeRule(2.0).probe_timeout(None) == 2.0 and ProbeRule(2.0).probe_timeout(1.5) == 6.0


def test_a_far_teachers_stall_clock_allows_slow_start_to_send_what_it_has_out():
    """A connection starts at TCP's initial window (10 segments, RFC 6928) and doubles it each round trip, when it
    is new and again after an idle spell: 1.5 s away the first two 100 KB requests of a new connection took longer
    than the 6.5 s that 3 round trips allowed (bench_network_faults --far_from_start: set aside twice, first answer
    after 15 s). The stall clock now allows a round trip per doubling needed to send the bytes out; a near
    teacher's clock does not change with them."""
    window = LatencyWindow()
    for latency in (0.02, 0.02, 0.02, 0.04):
        window.add(latency)
    assert [slow_start_rounds(n) for n in (0, 1, 14_600, 14_601, 200_000, 3_200_000)] == [0, 1, 1, 2, 4, 8]
    assert StallRule().timeout(window, round_trip=1.5, bytes_out=200_000) == pytest.approx(2.0 + (3 + 4) * 1.5)
    assert StallRule().timeout(window, round_trip=1.5) == 6.5, "nothing out: 3 round trips, as before"
    assert StallRule().timeout(window, round_trip=0.005, bytes_out=10**8) == 2.0, "a near one: none"
    assert StallRule(request_timeout=10.0).timeout(window, round_trip=1.5, bytes_out=10**8) == 10.0, "capped"
    assert StallRule().timeout(window, spread=10.0) == 4.0, "a spread at most doubles the clock"


def test_the_slow_start_allowance_holds_while_a_connection_may_be_cold(monkeypatch):
    """A connection that carries answers has grown its window: the allowance for its bytes out applies only before
    its first answer over the link, after an idle spell of a second more than its round trip (Linux restarts such a
    connection from the initial window), or while a request is out on a connection a worker has just made to it
    (each worker has its own: a far teacher answering one worker was set aside when a second worker's first
    requests took their slow start), so a far teacher's clock in steady state stays 3 round trips."""
    clock = [0.0]
    monkeypatch.setattr(teacher_pool.time, "monotonic", lambda: clock[0])
    pool = TeacherPool(["far:1"])
    pool.round_trip_measured("far:1", 1.5)
    stage = RemoteStage(pool, ServingConfig(feeds=[], fetches=[]), ["prediction"], RemoteOptions())
    for latency in (0.02, 0.02, 0.02, 0.04):
        stage.latencies.add(latency)
    assert pool.connection_cold("far:1")
    assert stage.stall_timeout("far:1", out=(200_000, False)) == pytest.approx(2.0 + 7 * 1.5), "no answer: cold"
    pool.started("far:1")
    clock[0] = 1.6
    pool.succeeded("far:1", 1.6, 32, server_time=0.05)
    assert not pool.connection_cold("far:1")
    assert stage.stall_timeout("far:1", out=(200_000, False)) == pytest.approx(6.5), "answering: a grown window"
    assert stage.stall_timeout("far:1", out=(200_000, True)) == pytest.approx(2.0 + 7 * 1.5), \
        "but a request out on a connection another worker has just made to it starts that one's slow start"
    clock[0] = 1.6 + 1.5 + 1.0 + 0.1
    assert pool.connection_cold("far:1"), "idle longer than its round trip and a second: it may restart cold"


def test_keepalive_and_connect_timeouts_follow_the_round_trip():
    near = dict(channel_options.grpc_channel_options(1.0, round_trip=0.001))
    assert near["grpc.keepalive_timeout_ms"] == 3000, "LINK_SLACK: a near link may slow to ~2 s uncut"
    assert near["grpc.min_reconnect_backoff_ms"] == 2000
    far = dict(channel_options.grpc_channel_options(1.0, round_trip=1.5))
    assert far["grpc.keepalive_timeout_ms"] == 7000, "TCP_USER_TIMEOUT above a 1.5 s round trip"
    assert far["grpc.http2.ping_timeout_ms"] == 7000 and far["grpc.min_reconnect_backoff_ms"] == 6500
    assert far["grpc.keepalive_time_ms"] == 2500, "pings no faster than the round trip"
    assert near["grpc.keepalive_time_ms"] == 1000
    assert channel_options.probe_timeout_for(2.0, 1.5) == 6.0 and channel_options.probe_timeout_for(2.0, 0.01) == 2.0
    assert channel_options.http_timeouts(30.0, 1.0, 1.5) == (5.5, 30.0)
    channel_options.note_round_trip("x:1", 2.0)
    channel_options.note_round_trip("x:1", 1.5)
    assert channel_options.round_trip_of("x:1") == 1.5 and channel_options.round_trip_of("y:1") is None
    assert channel_options.is_link_timeout("recvmsg:Connection timed out") and \
        channel_options.is_link_timeout("ping timeout") and not channel_options.is_link_timeout("Connection refused")
    assert channel_options.round_trip_moved(1.5, 0.0) and not channel_options.round_trip_moved(0.04, 0.0)


def test_a_healed_link_is_back_to_its_share_within_two_seconds(monkeypatch):
    delays = {"a:1": 0.0, "b:2": 0.0, "c:3": 0.0, "d:4": 0.15}
    _, after = _simulate(monkeypatch, delays, seconds=12.0, heal_at=10.0)
    rate = {e: n / 2.0 for e, n in after.items()}
    assert min(rate.values()) >= 0.9 * max(rate.values()), rate


def test_a_failed_probe_remeasures_a_link_that_became_far():
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    endpoint = f"127.0.0.1:{server.getsockname()[1]}"
    def accept():
        try:
            for _ in range(2):
                server.accept()[0].close()
        except OSError:
            pass   # closed at the end of the test

    threading.Thread(target=accept, daemon=True).start()
    try:
        for _ in range(3):
            channel_options.note_round_trip(endpoint, 1.5)     # noted while the link was slow
        assert channel_options.remeasure_round_trip(endpoint, 2.0) < 0.02, "near again: replaced at once"
        channel_options.note_round_trip(endpoint, 0.001)
        assert channel_options.remeasure_round_trip(endpoint, 2.0) < 0.02, "no change: kept"
    finally:
        server.close()


def test_a_far_teachers_window_settles_at_its_bandwidth_delay_product(monkeypatch):
    """300 ms away at 50 ms a request: 2 + 0.3 / 0.05 = 8. Stepped on every answer, with its feedback a round trip
    (~7 answers) late, the window swung 5-11 here (2-12 on a real link) and the teacher got 0.82 of a near one's
    answers; stepped once per round trip it stays within 1 of 8 and gets its share."""
    windows = []

    def watch(pool, now, endpoint):
        if endpoint == "far:4" and now > 3.0:
            windows.append(pool.window_of(endpoint))

    delays = {"a:1": 0.0, "b:2": 0.0, "c:3": 0.0, "far:4": 0.15}
    answers, _ = _simulate(monkeypatch, delays, seconds=12.0, on_answer=watch)
    assert len(windows) > 100 and 7 <= min(windows) and max(windows) <= 9, (min(windows), max(windows))
    near = sum(answers[e] for e in ("a:1", "b:2", "c:3")) / 3
    assert answers["far:4"] >= 0.95 * near, answers


def test_a_far_teachers_window_holds_what_sending_its_requests_adds_to_the_round_trip(monkeypatch):
    """300 ms away and 100 ms to send each request (100 KB at ~1 MB/s): 0.45 s a request before the teacher's own
    50 ms, where a handshake reads 0.3 s. Its window is the link's transit over its seconds per request, read from
    its quickest answer less its own time (2 + 0.4 / 0.05 = 10), not the handshake's (2 + 6 = 8, which left the
    teacher idle: the window shrank to 7 and it got 0.77 of a near one's answers; 0.40 at 150 ms to send)."""
    windows = []

    def watch(pool, now, endpoint):
        if endpoint == "far:4" and now > 4.0:
            windows.append(pool.window_of(endpoint))

    for transfer, least in ((0.1, 9), (0.15, 10)):
        windows.clear()
        delays = {"a:1": 0.0, "b:2": 0.0, "c:3": 0.0, "far:4": 0.15}
        answers, _ = _simulate(monkeypatch, delays, seconds=20.0, on_answer=watch, transfer=transfer)
        near = sum(answers[e] for e in ("a:1", "b:2", "c:3")) / 3
        assert answers["far:4"] >= 0.8 * near, (transfer, answers)
        assert np.median(windows) >= least, (transfer, np.median(windows))


def test_a_far_teachers_estimate_is_not_inflated_when_its_window_shrinks(monkeypatch):
    """An answer sent with 12 requests out (11 ahead of it) that arrives once the window has shrunk and the others
    are answered is 50 ms a request (0.6 s / 12), not 0.3 s (0.6 s / 1, capped at latency - round trip): the
    spike after each shrink."""
    clock = [0.0]
    monkeypatch.setattr(teacher_pool.time, "monotonic", lambda: clock[0])
    pool = TeacherPool(["far:1"])
    pool.round_trip_measured("far:1", 0.3)
    for _ in range(12):
        pool.started("far:1")
    clock[0] = 0.6
    for _ in range(11):
        pool.released("far:1")
    pool.succeeded("far:1", 0.6, 32)
    assert pool.service_time("far:1") == pytest.approx(0.05)


def test_a_link_that_became_long_gets_its_window_before_the_probes_agree(monkeypatch):
    """A near teacher of 50 ms a request whose link becomes 300 ms long: once its latest probe reads 0.3 s and its
    latest 4 answers took as long, its window starts growing toward the bandwidth-delay product at its known speed
    (2 + 6; at first at most twice the floor, as slow start), not at the floor until 3 probes agree (1.5-3 s); a
    probe held for a retransmission alone (answers quicker) moves nothing."""
    clock = [0.0]
    monkeypatch.setattr(teacher_pool.time, "monotonic", lambda: clock[0])
    pool = TeacherPool(["t:1"])
    pool.round_trip_measured("t:1", 0.001)
    pool.started("t:1")
    for _ in range(32):   # near: 2 out, each answered 100 ms after it was sent
        pool.started("t:1")
        pool.succeeded("t:1", 0.1, 32)
    pool.round_trip_measured("t:1", 0.3)
    assert pool.window_of("t:1") == 2, "one long probe alone (a lossy link's, held for an RTO) is no far link"
    for _ in range(4):
        pool.started("t:1")
        pool.succeeded("t:1", 0.4, 32)
    assert pool.window_of("t:1") == 4


def test_reading_a_teachers_window_costs_no_percentile(monkeypatch):
    """A teacher's delay tail (90th less 10th percentile of its latest latencies) is computed once per answer: read
    on every route and read-ahead (thousands a second), np.percentile took the student's whole core with a far
    teacher out (9.7 s of CPU in a 10 s epoch at +300 ms) and its near teachers went short of requests."""
    pool = TeacherPool(["a:1", "b:2", "far:3"], per_teacher_in_flight=2)
    pool.round_trip_measured("far:3", 0.3)
    for endpoint, latency in (("a:1", 0.1), ("b:2", 0.1), ("far:3", 0.4)):
        for i in range(40):
            pool.started(endpoint)
            pool.succeeded(endpoint, latency + (0.3 if i % 4 == 0 else 0.0), 32)   # a lossy-looking tail
    window = pool.window_of("a:1")
    assert window > 2, "the tail still widens a lossy near teacher's window"
    calls = []
    percentile = np.percentile
    monkeypatch.setattr(np, "percentile", lambda *a, **k: calls.append(1) or percentile(*a, **k))
    for _ in range(200):
        pool.route()
        pool.read_ahead()
        pool.total_window()
    assert calls == [] and pool.window_of("a:1") == window
    pool.started("a:1")
    pool.succeeded("a:1", 0.1, 32)
    assert len(calls) == 1, "one answer: one percentile"


def test_the_read_ahead_keeps_near_teachers_busy_for_a_far_teachers_whole_latency():
    """While a far teacher's request is out (1.55 s) the reorder buffer may wait on it, so the near teachers (50
    ms) need that long's worth of tasks in hand: their windows 31 times over. Counted at most 8 times, they went
    idle behind it (issue 25's bench, 1.5 s phase: the near teachers fell to 9-16 answers a second of 20 at times,
    and with the far teacher the reader gave 0.73 of fault-free throughput, less than the 0.75 of the near three
    alone)."""
    pool = TeacherPool(["a:1", "b:2", "c:3", "far:4"], per_teacher_in_flight=2)
    for endpoint, latency in (("a:1", 0.05), ("b:2", 0.05), ("c:3", 0.05), ("far:4", 1.55)):
        for _ in range(8):
            pool.started(endpoint)
            pool.succeeded(endpoint, latency, 32)
    near = sum(pool.window_of(endpoint) for endpoint in ("a:1", "b:2", "c:3"))
    assert pool.read_ahead() >= near * 1.55 / 0.05 + pool.window_of("far:4") - 1, (near, pool.read_ahead())
    for endpoint in ("a:1", "b:2", "c:3", "far:4"):   # all alike: no teacher's window counts twice
        for _ in range(8):
            pool.started(endpoint)
            pool.succeeded(endpoint, 0.05, 32)
    assert pool.read_ahead() == pool.total_window()


class _Workers:
    """The worker processes' side of RemoteStage, which is not under test here: takes requests, sends nothing."""

    def __init__(self):
        self.owner_pid, self.closed, self.sent = os.getpid(), False, []

    def send_task(self, request_id, endpoint, feeds, size, nbytes=None):
        self.sent.append(endpoint)

    def send_probe(self, *args):
        pass

    def forget(self, endpoint):
        pass

    def receive(self, timeout):
        return []


def test_a_dispatch_pass_stops_when_every_teachers_window_is_full(monkeypatch):
    """50 tasks waiting and both teachers' windows full: the pass asks the router once, not once per task (~15
    routes per pass, each ranking every teacher, were most of the student's CPU with a far teacher out); once one
    frees a slot, the next task in order goes there."""
    pool = TeacherPool(["a:1", "b:2"], per_teacher_in_flight=2)
    stage = RemoteStage(pool, ServingConfig(feeds=[], fetches=[]), ["prediction"], RemoteOptions())
    stage.workers = _Workers()
    for seq in range(54):
        stage.submit(Task(task_id=seq, seq=seq, sample_start=seq, size=1, feeds={}))
    assert sorted(stage.workers.sent) == ["a:1", "a:1", "b:2", "b:2"], "each window filled, the rest wait"
    routes = []
    route = pool.route
    monkeypatch.setattr(pool, "route", lambda *a, **k: routes.append(1) or route(*a, **k))
    stage.poll(0.0)   # two passes (before and after reading the workers' messages)
    assert len(routes) == 2 and len(stage.workers.sent) == 4
    pool.succeeded("a:1", 0.1, 1)   # a slot frees: the next task in order goes out
    stage.poll(0.0)
    assert stage.workers.sent[-1] == "a:1" and len(stage.workers.sent) == 5


def test_a_far_teachers_window_grows_by_a_quarter_per_round_while_no_answer_waits(monkeypatch):
    """1.5 s away with 200 ms to send each request, far from the start (so its own speed is not known: latency less
    the round trip reads 0.25 s a request, 5x its 50 ms). While its answers take no longer than its quickest (no
    queue anywhere), its window grows by a quarter per round: it reaches the cap, 32, in ~8 rounds, where by one a
    round it was 19 after 30 s and the teacher got 0.22 of a near one's answers."""
    windows = []

    def watch(pool, now, endpoint):
        if endpoint == "far:4":
            windows.append((now, pool.window_of(endpoint)))

    delays = {"a:1": 0.0, "b:2": 0.0, "c:3": 0.0, "far:4": 0.75}
    answers, _ = _simulate(monkeypatch, delays, seconds=30.0, on_answer=watch, transfer=0.2)
    assert max(w for t, w in windows if t < 22.0) == 32, windows[-5:]
    near = sum(answers[e] for e in ("a:1", "b:2", "c:3")) / 3
    assert answers["far:4"] >= 0.4 * near, answers


def test_a_far_teachers_window_counts_its_own_time_not_the_links_queue_when_it_says(monkeypatch):
    """While a new connection 1.5 s away ramps (TCP's startup), requests also wait in the link's queue: an answer
    of 3 s where the link's transit is 1.55 s and the teacher's own time 50 ms. Read from latency less transit,
    that wait was the teacher's queue (1.45 s at the teacher), so the window grew by one a round (8, 9, ...)
    while the teacher idled (bench_network_faults --far_only --far_seconds 40: 0.16-0.39 of its ideal).
    With the teacher's own time per answer (Paddle Serving's profile_time) the requests at the teacher are
    counted from it: the window doubles each round toward the bandwidth-delay product (32), and shrinks to it only
    when the teacher's own time shows a queue there."""
    clock = [0.0]
    monkeypatch.setattr(teacher_pool.time, "monotonic", lambda: clock[0])
    pool = TeacherPool(["far:1"], per_teacher_in_flight=2)
    pool.round_trip_measured("far:1", 1.5)

    def round_of(sent: int, latency: float, own: float) -> int:
        """``sent`` requests sent now, answered ``latency`` later, each ``own`` s of it at the teacher."""
        for _ in range(sent):
            pool.started("far:1")
        clock[0] += latency
        for _ in range(sent):
            pool.succeeded("far:1", latency, 32, server_time=own)
        clock[0] += 0.01
        return pool.window_of("far:1")

    assert round_of(2, 1.6, 0.05) == 4, "its first answers: twice the floor (the link's transit: 1.55 s)"
    assert round_of(4, 3.0, 0.05) == 8
    assert round_of(8, 3.0, 0.05) == 16
    assert round_of(16, 3.0, 0.05) == 32
    for _ in range(32):   # a full window, then half answered and sent again: the next ones go with 17-32 out
        pool.started("far:1")
    clock[0] += 3.0
    for _ in range(16):
        pool.succeeded("far:1", 3.0, 32, server_time=0.05)
    for _ in range(16):
        pool.started("far:1")
    for _ in range(16):   # sent with 17-32 out, the round's quickest: 1.2 s each at the teacher
        pool.succeeded("far:1", 2.9, 32, server_time=1.2)
    clock[0] += 3.0
    pool.succeeded("far:1", 2.9, 32, server_time=1.2)
    at_teacher = 17 * 1.2 / 2.9   # Little's law on its own time: 7 requests there, 0.17 s each
    assert pool.window_of("far:1") == 2 + round(1.55 / (1.2 / at_teacher)) == 11, "a queue there: the target"


def test_a_far_teachers_estimate_holds_only_its_own_time_when_it_says(monkeypatch):
    """A new connection over a 1.5 s link took 15 s for its first 2 answers (TCP's handshake and startup): by
    latency / requests out, 7.5 s a request, so requests waited for the near teachers and it got 0.009 of its
    share in 40 s. With the teacher's own time per answer (Paddle Serving's profile_time: 50 ms) the estimate is
    that, and the link's part (its transit) is the rest."""
    clock = [0.0]
    monkeypatch.setattr(teacher_pool.time, "monotonic", lambda: clock[0])
    pool = TeacherPool(["far:1"])
    pool.round_trip_measured("far:1", 1.5)
    pool.started("far:1")
    pool.started("far:1")
    clock[0] = 15.0
    pool.succeeded("far:1", 15.0, 32, server_time=0.05)
    pool.succeeded("far:1", 15.0, 32, server_time=0.05)
    assert pool.service_time("far:1") == pytest.approx(0.05)
    told = TeacherPool(["far:1"])
    told.round_trip_measured("far:1", 1.5)
    told.started("far:1")
    told.started("far:1")
    told.succeeded("far:1", 15.0, 32)
    assert told.service_time("far:1") == pytest.approx(7.5), "not told: latency / requests out, as before"
