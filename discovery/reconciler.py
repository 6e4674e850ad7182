"""One background thread that reconciles something with ZooKeeper, the skeleton of every discovery thread.

A kazoo recipe (``DataWatch``, ``Lock``) reports what changed from kazoo's event thread, which must never block;
the work (read, compare, write) happens in a thread of its own that is woken for it. ``Reconciler`` is that thread:
``wake()`` asks for a round (a call of ``reconcile``) soon (from any thread, never blocking), a round also runs
every ``interval`` seconds, and ``stop()`` ends the thread at once (a wait between rounds or a backoff ends; a
round in progress finishes). The node keeper (``discovery.ephemeral``), the service watcher
(``discovery.watcher``), the assigner (``discovery.assigner``), the student's assignment follower
(``discovery.student``) and the teacher's health loop (``discovery.teacher_registration``) all run on it.

An exception in a round never kills the thread: it is logged with its traceback and the round is run again after
``backoff_delay(failures, retry_base, retry_cap)`` (exponential, jittered: ``distill_base.backoff``, so students
that fail together retry apart); a round that succeeds resets the count. With ``deadline`` the thread gives up
after failing that many seconds in a row (``error`` then holds the last exception, ``on_give_up`` is called);
without one (the default) it retries for as long as it runs. A round ends the thread on purpose by raising
``StopReconciling``; kazoo's ``RetryInterrupted`` (a ``discovery.session.retry_forever`` cut short by ``stop()``)
ends it quietly too.

Example::

    reconciler = Reconciler("zk-watch-mnist", read_and_compare, interval=30.0)
    session.subscribe(lambda state: reconciler.wake())
    reconciler.start()
    ...
    reconciler.stop(join=5.0)
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from distill_base.backoff import backoff_delay

from .session import RetryInterrupted

logger = logging.getLogger(__name__)


class StopReconciling(Exception):
    """Raised by a round to end its reconciler's thread (no log, no retry)."""


class Reconciler:
    """Run ``reconcile()`` in a daemon thread whenever woken (and every ``interval`` seconds), until stopped.

    Args:
        name: the thread's name, also how log lines name it.
        reconcile: one round. Returns None (wait for the next ``wake()`` or ``interval``) or the seconds to
            wait before the next round whatever wakes it meanwhile (0: at once); ``stop()`` ends either wait.
        interval: seconds between rounds without a wake (None: only when woken).
        settle: seconds to wait after a wake before the round, so that a burst of events makes one round.
        retry_base / retry_cap: first and largest backoff (s) after a round that raised.
        deadline: seconds of rounds failing in a row after which the thread gives up (None: never).
        on_give_up: called with the last exception when the deadline passes.

    Attributes:
        stopping: set by ``stop()``; rounds pass it to ``retry_forever`` and wait on it.
        failures: rounds failed in a row; error: the exception that made it give up (None while it runs).
    """

    def __init__(self, name: str, reconcile: Callable[[], Optional[float]], *, interval: Optional[float] = None,
                 settle: float = 0.0, retry_base: float = 1.0, retry_cap: float = 5.0,
                 deadline: Optional[float] = None, on_give_up: Optional[Callable[[BaseException], None]] = None):
        """Check the arguments.

        Raises:
            ValueError: ``interval`` <= 0, or not 0 < ``retry_base`` <= ``retry_cap``.
        """
        if interval is not None and interval <= 0:
            raise ValueError(f"interval must be > 0 seconds or None, not {interval}")
        if retry_base <= 0 or retry_cap < retry_base:
            raise ValueError(f"need 0 < retry_base <= retry_cap, not {retry_base}, {retry_cap}")
        self.name = name
        self.interval = interval
        self.settle = settle
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.deadline = deadline
        self.on_give_up = on_give_up
        self.stopping = threading.Event()
        self.failures = 0
        self.rounds = 0
        self.error: Optional[BaseException] = None
        self._reconcile = reconcile
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, at_once: bool = False) -> Reconciler:
        """Start the thread; with ``at_once`` the first round runs now, else at the first wake or interval."""
        if at_once:
            self._wake.set()
        self._thread.start()
        return self

    def wake(self) -> None:
        """Ask for a round soon (from any thread; never blocks)."""
        self._wake.set()

    def stop(self, join: Optional[float] = None) -> None:
        """End the thread: waits end now, a round in progress finishes. With ``join``, wait that long for it."""
        self.stopping.set()
        self._wake.set()
        if join is not None:
            self.join(join)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the thread (not from the thread itself)."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` inside a round; True when ``stop()`` ended the wait."""
        return self.stopping.wait(seconds)

    def _run(self) -> None:
        delay: Optional[float] = None     # set: the round asked for (or a failure needs) this wait, wakes or not
        failing_since: Optional[float] = None
        while not self.stopping.is_set():
            if delay is not None:
                if delay > 0 and self.stopping.wait(delay):
                    return
            else:
                self._wake.wait(self.interval)
                if self.stopping.is_set() or (self.settle > 0 and self.stopping.wait(self.settle)):
                    return
            self._wake.clear()
            try:
                delay = self._reconcile()
            except (StopReconciling, RetryInterrupted):
                return
            except Exception as exc:  # noqa: BLE001 - a failing round must not end the thread: retry with backoff
                if self.stopping.is_set():
                    return
                self.failures += 1
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                if self.deadline is not None and now - failing_since >= self.deadline:
                    self.error = exc
                    logger.error("%s: giving up after %d failed rounds in %.1fs: %s: %s", self.name, self.failures,
                                 now - failing_since, type(exc).__name__, exc)
                    if self.on_give_up is not None:
                        self.on_give_up(exc)
                    return
                delay = backoff_delay(self.failures, self.retry_base, self.retry_cap)
                logger.exception("%s: round failed (%d in a row); retrying in %.2fs", self.name, self.failures,
                                 delay)
            else:
                self.rounds += 1
                self.failures, failing_since = 0, None
