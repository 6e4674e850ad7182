"""Request counts and latency of a teacher server, logged every interval (Prometheus metrics: ``metrics.py``).

Example::

    stats = RequestStats(interval_s=60)
    stats.observe(0.003, samples=32, ok=True)
    stats.start_logging()          # one INFO line per interval
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)


class RequestStats:
    """Thread-safe counters; ``observe`` is called once per request by every transport."""

    def __init__(self, interval_s: float = 60.0):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._window: list[float] = []
        self._window_samples = 0
        self._window_errors = 0
        self.total_requests = 0
        self.total_errors = 0
        self.total_samples = 0
        self.total_seconds = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def observe(self, seconds: float, samples: int, ok: bool) -> None:
        with self._lock:
            self._window.append(seconds)
            self._window_samples += samples
            self.total_requests += 1
            self.total_samples += samples
            self.total_seconds += seconds
            if not ok:
                self._window_errors += 1
                self.total_errors += 1

    def log_window(self) -> None:
        """Log the requests since the last call (count, samples, errors, latency) and reset the window."""
        with self._lock:
            window, samples, errors = self._window, self._window_samples, self._window_errors
            self._window, self._window_samples, self._window_errors = [], 0, 0
        if not window:
            logger.info("last %.0fs: 0 requests", self.interval_s)
            return
        ms = np.asarray(window) * 1000.0
        logger.info("last %.0fs: %d requests (%.1f/s), %d samples, %d errors; latency ms mean %.2f p50 %.2f "
                    "p99 %.2f max %.2f", self.interval_s, len(window), len(window) / self.interval_s, samples,
                    errors, ms.mean(), np.percentile(ms, 50), np.percentile(ms, 99), ms.max())

    def start_logging(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.log_window()

        self._thread = threading.Thread(target=loop, name="stats-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self.log_window()
