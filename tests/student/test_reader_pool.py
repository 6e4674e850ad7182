"""TeacherPool on its own (it only keeps state; the I/O is tested with real teachers in test_reader*.py):
least-loaded choice, setting a failed teacher aside, probes with exponential backoff and jitter, flapping
teachers backing off further, membership changes, and the all-teachers-down clock."""
from __future__ import annotations

import random
import time

import pytest

from distill_reader.distill_reader import parse_endpoints
from distill_reader.teacher_pool import TeacherPool, backoff_delay


def test_backoff_delay_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(1)
    for failures in range(1, 10):
        exp = min(5.0, 0.2 * 2 ** (failures - 1))
        delays = [backoff_delay(failures, 0.2, 5.0, rng) for _ in range(200)]
        assert exp / 2 <= min(delays) and max(delays) <= exp
        assert max(delays) - min(delays) > exp / 4, "jitter spreads the delays"


def test_pick_prefers_the_least_loaded_and_respects_capacity():
    pool = TeacherPool(["a:1", "b:2"], per_teacher_in_flight=2)
    picks = []
    for _ in range(4):
        endpoint = pool.pick()
        pool.started(endpoint)
        picks.append(endpoint)
    assert sorted(picks) == ["a:1", "a:1", "b:2", "b:2"]
    assert pool.pick() is None, "both teachers at capacity"
    pool.succeeded("b:2", 0.01, 8)
    assert pool.pick() == "b:2"
    assert pool.pick(avoid=["b:2"]) == "b:2", "avoid only when another teacher has room"
    pool.succeeded("a:1", 0.01, 8)
    assert pool.pick(avoid=["b:2"]) == "a:1"


def _probe_delay(pool, action):
    """(earliest, latest) possible backoff that ``action()`` scheduled, robust to the test being preempted."""
    before = time.monotonic()
    action()
    after = time.monotonic()
    due = pool.next_probe_time()
    return due - after, due - before


def test_failed_teacher_is_set_aside_probed_with_backoff_and_returns():
    pool = TeacherPool(["a:1", "b:2"], probe_backoff=0.2, max_probe_backoff=5.0, seed=3)
    pool.started("a:1")
    low, high = _probe_delay(pool, lambda: pool.failed("a:1", "gRPC UNAVAILABLE"))
    assert 0.1 <= high and low <= 0.2, "first delay in [0.1, 0.2]"
    assert pool.usable_count() == 1
    assert [pool.pick() for _ in range(3)] == ["b:2"] * 3
    assert pool.probes_due(pool.next_probe_time() - 0.01) == [], "not probed before the backoff"
    due = pool.next_probe_time()
    assert pool.probes_due(due) == ["a:1"]
    assert pool.probes_due(due + 10) == [], "one probe at a time"
    low, high = _probe_delay(pool, lambda: pool.probe_result("a:1", False, "still down"))
    assert 0.2 <= high and low <= 0.4, "the second delay doubles: [0.2, 0.4]"
    pool.probes_due(time.monotonic() + 1)
    pool.probe_result("a:1", True)
    assert pool.usable_count() == 2 and "a:1 (usable)" in pool.describe()
    # healthy by probe, failing again by request: the failure count was not reset, so the backoff keeps growing
    pool.started("a:1")
    low, high = _probe_delay(pool, lambda: pool.failed("a:1", "gRPC UNAVAILABLE again"))
    assert 0.4 <= high and low <= 0.8, "third delay: [0.4, 0.8]"
    # a successful request resets it
    pool.probes_due(time.monotonic() + 1)
    pool.probe_result("a:1", True)
    pool.started("a:1")
    pool.succeeded("a:1", 0.02, 4)
    pool.started("a:1")
    low, high = _probe_delay(pool, lambda: pool.failed("a:1", "once more"))
    assert 0.1 <= high and low <= 0.2


def test_down_clock_and_membership_changes():
    pool = TeacherPool(["a:1"])
    assert pool.down_since() is None
    pool.started("a:1")
    pool.failed("a:1", "gRPC UNAVAILABLE: connection refused")
    since = pool.down_since()
    assert since is not None and "connection refused" in pool.last_error
    assert "a:1 (set aside: gRPC UNAVAILABLE: connection refused)" in pool.describe()
    pool.set_endpoints(["b:2"])          # a new teacher arrives (e.g. from ZooKeeper): usable at once
    assert pool.down_since() is None and pool.endpoints == ["b:2"] and pool.pick() == "b:2"
    pool.set_endpoints([])
    assert pool.down_since() is not None and pool.describe() == "no teachers configured"
    pool.set_endpoints(["a:1"])          # a teacher that comes back through discovery starts usable
    assert pool.usable_count() == 1


def test_parse_endpoints_forms():
    assert parse_endpoints("127.0.0.1:9292") == ["127.0.0.1:9292"]
    assert parse_endpoints("a:1, b:2") == ["a:1", "b:2"]
    assert parse_endpoints(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert parse_endpoints(("a:1",)) == ["a:1"]
    with pytest.raises(ValueError, match="'a' is not 'host:port'"):
        parse_endpoints("a")
    with pytest.raises(ValueError, match="no teacher endpoint"):
        parse_endpoints(" , ")
    with pytest.raises(TypeError):
        parse_endpoints(9292)


def _answer(pool, endpoint, latency):
    pool.started(endpoint)
    pool.succeeded(endpoint, latency, 32)


def test_route_by_expected_finish_time_gives_a_slow_teacher_less_not_none():
    """Teacher c answers at 10x the latency of a and b: requests wait for a fast teacher's slot rather than go
    to c, until the fast queues are about ten times deeper than c's."""
    pool = TeacherPool(["a:1", "b:2", "c:3"], per_teacher_in_flight=2)
    for _ in range(5):
        _answer(pool, "a:1", 0.02)
        _answer(pool, "b:2", 0.02)
        _answer(pool, "c:3", 0.20)
    assert pool.service_time("c:3") == pytest.approx(0.20) and pool.service_time("a:1") == pytest.approx(0.02)
    sent, queued, held = [], {}, 0
    for _ in range(24):          # 24 requests waiting, routed in one pass
        send_to, wait_for = pool.route(queued=queued)
        if send_to is not None:
            pool.started(send_to)
            sent.append(send_to)
        else:
            queued[wait_for] = queued.get(wait_for, 0) + 1
            held += 1
    assert sent.count("a:1") == sent.count("b:2") == 2, "the fast ones fill their slots first"
    assert sent.count("c:3") >= 1, "a slow teacher gets work once the fast queues are deep enough"
    assert queued.get("c:3", 0) == 0 and queued["a:1"] >= 8 and queued["b:2"] >= 8
    few = TeacherPool(["a:1", "c:3"], per_teacher_in_flight=2)
    for _ in range(5):
        _answer(few, "a:1", 0.02)
        _answer(few, "c:3", 0.20)
    few.started("a:1")
    few.started("a:1")
    assert few.route() == (None, "a:1"), "one request waits for the fast teacher instead of taking 10x longer"


def test_a_request_out_longer_than_the_estimate_raises_it_and_stale_estimates_decay(monkeypatch):
    from distill_reader import teacher_pool

    clock = [100.0]
    monkeypatch.setattr(teacher_pool.time, "monotonic", lambda: clock[0])
    pool = TeacherPool(["a:1", "b:2"], per_teacher_in_flight=2)
    for _ in range(3):
        _answer(pool, "a:1", 0.02)
        _answer(pool, "b:2", 0.02)
    pool.started("b:2")          # b freezes with this request out
    clock[0] += 1.0
    assert pool.route() == ("a:1", None), "b's request has been out 1 s: b now looks 50x slower"
    pool.released("b:2")
    slow = TeacherPool(["a:1", "c:3"], per_teacher_in_flight=1)
    for _ in range(3):
        _answer(slow, "a:1", 0.02)
        _answer(slow, "c:3", 0.40)
    slow.started("a:1")
    assert slow.route() == (None, "a:1")
    clock[0] += 30.0             # c's estimate was not refreshed for 30 s: it is tried again
    assert slow.route() == ("c:3", None)


@pytest.mark.parametrize("option, message", [({"protocol": "ftp"}, "protocol must be 'grpc' or 'http'"),
                                             ({"wire": "bogus"}, "wire must be 'auto', 'raw' or 'typed'"),
                                             ({"num_workers": 0}, "num_workers must be >= 1")])
def test_reader_options_are_checked_when_the_reader_is_made(option, message):
    from distill_reader import DistillReader

    with pytest.raises(ValueError, match=message):
        DistillReader(ins=["img"], predicts=["prediction"], **option)
