"""discovery.reconciler.Reconciler, the one skeleton of discovery's background threads: woken rounds, an interval,
a stop that ends every wait at once, and failing rounds retried with jittered backoff (never a dead thread).
Real threads and real time; no ZooKeeper is needed (the rounds here are plain functions)."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from discovery.reconciler import Reconciler, StopReconciling
from discovery.session import RetryInterrupted
from tests.support.procs import wait_for

pytestmark = pytest.mark.paddle_free


@pytest.fixture
def no_unhandled(monkeypatch):
    """Exceptions that end a thread (none may)."""
    unhandled: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: unhandled.append(args.exc_value))
    return unhandled


def test_a_wake_runs_a_round_and_a_burst_settles_into_one():
    rounds = []
    reconciler = Reconciler("test-wake", lambda: rounds.append(time.monotonic()), settle=0.2).start()
    try:
        time.sleep(0.3)
        assert rounds == [], "no interval and no wake: no round"
        for _ in range(5):
            reconciler.wake()
        wait_for(lambda: len(rounds) == 1, 5, "one round for the burst")
        time.sleep(0.4)
        assert len(rounds) == 1
    finally:
        reconciler.stop(join=5)


def test_rounds_run_every_interval_and_at_once_when_asked():
    rounds = []
    started = time.monotonic()
    reconciler = Reconciler("test-interval", lambda: rounds.append(time.monotonic()), interval=0.2).start(at_once=True)
    try:
        wait_for(lambda: len(rounds) >= 4, 5, "four rounds")
        assert rounds[0] - started < 0.15, "at_once: the first round does not wait for the interval"
        gaps = [b - a for a, b in zip(rounds, rounds[1:4])]
        assert all(0.15 <= gap < 1.0 for gap in gaps), gaps
    finally:
        reconciler.stop(join=5)


@pytest.mark.parametrize("waiting_in", ["wake", "interval", "backoff", "asked delay"])
def test_stop_ends_any_wait_at_once(waiting_in, no_unhandled):
    entered = threading.Event()

    def reconcile():
        entered.set()
        if waiting_in == "backoff":
            raise RuntimeError("fails: the thread then waits its backoff (30 s)")
        return 60.0 if waiting_in == "asked delay" else None

    reconciler = Reconciler("test-stop", reconcile, interval=60.0 if waiting_in == "interval" else None,
                            retry_base=30.0, retry_cap=60.0)
    reconciler.start(at_once=waiting_in != "wake")
    if waiting_in != "wake":
        assert entered.wait(5)
    time.sleep(0.2)   # in its wait now
    assert reconciler.is_alive()
    began = time.monotonic()
    reconciler.stop(join=5)
    assert not reconciler.is_alive() and time.monotonic() - began < 0.5
    assert no_unhandled == []


def test_a_failing_round_is_logged_and_retried_with_backoff_never_killing_the_thread(caplog, no_unhandled):
    """Two rounds raise; the thread logs each with its traceback, waits backoff_delay(1), then backoff_delay(2)
    (equal jitter: [base/2, base], then [base, 2 base]), and the third round succeeds and resets the count."""
    calls: list[float] = []

    def reconcile():
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise KeyError(f"injected bug {len(calls)}")
        return None

    caplog.set_level(logging.WARNING, logger="discovery.reconciler")
    base = 0.4
    reconciler = Reconciler("test-retry", reconcile, retry_base=base, retry_cap=5.0).start(at_once=True)
    try:
        wait_for(lambda: len(calls) == 3, 10, "the third round")
        time.sleep(0.1)
        first, second = calls[1] - calls[0], calls[2] - calls[1]
        assert base / 2 - 0.01 <= first <= base + 0.15, first
        assert base - 0.01 <= second <= 2 * base + 0.15, second
        assert reconciler.is_alive() and reconciler.failures == 0 and reconciler.rounds == 1
        failed = [r for r in caplog.records if "round failed" in r.getMessage()]
        assert [r.getMessage().split(";")[0] for r in failed] == ["test-retry: round failed (1 in a row)",
                                                                 "test-retry: round failed (2 in a row)"]
        assert all(r.exc_info and "injected bug" in str(r.exc_info[1]) for r in failed)
        assert reconciler.error is None and no_unhandled == []
    finally:
        reconciler.stop(join=5)


def test_a_wake_does_not_cut_a_backoff_short():
    calls: list[float] = []

    def reconcile():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("once")

    reconciler = Reconciler("test-backoff-wake", reconcile, retry_base=0.6, retry_cap=0.6).start(at_once=True)
    try:
        wait_for(lambda: calls, 5, "the first round")
        for _ in range(10):
            reconciler.wake()
            time.sleep(0.02)
        wait_for(lambda: len(calls) == 2, 5, "the retry")
        assert calls[1] - calls[0] >= 0.29   # backoff_delay(1, 0.6, 0.6) is in [0.3, 0.6]
    finally:
        reconciler.stop(join=5)


def test_the_deadline_gives_up_and_reports():
    given_up: list[BaseException] = []

    def reconcile():
        raise ValueError("always")

    reconciler = Reconciler("test-deadline", reconcile, retry_base=0.05, retry_cap=0.1, deadline=0.5,
                            on_give_up=given_up.append).start(at_once=True)
    wait_for(lambda: not reconciler.is_alive(), 5, "the reconciler to give up")
    assert isinstance(reconciler.error, ValueError) and given_up == [reconciler.error]
    assert reconciler.failures >= 3


@pytest.mark.parametrize("ending", [StopReconciling, RetryInterrupted])
def test_a_round_ends_the_thread_quietly(ending, caplog, no_unhandled):
    caplog.set_level(logging.WARNING, logger="discovery.reconciler")

    def reconcile():
        raise ending()

    reconciler = Reconciler("test-end", reconcile).start(at_once=True)
    wait_for(lambda: not reconciler.is_alive(), 5, "the thread to end")
    assert reconciler.error is None and caplog.records == [] and no_unhandled == []


def test_settings_out_of_range_are_named():
    with pytest.raises(ValueError, match="interval"):
        Reconciler("x", lambda: None, interval=0)
    with pytest.raises(ValueError, match="retry_base"):
        Reconciler("x", lambda: None, retry_base=2.0, retry_cap=1.0)
