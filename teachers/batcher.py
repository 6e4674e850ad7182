"""Server-side dynamic batching: concurrent requests are merged into one predictor run and split back.

``runners`` threads (one per predictor) run the work. With ``max_batch_size`` > 1 one collector thread takes the
first waiting job, keeps collecting compatible jobs (same fetch names, same per-sample shapes and dtypes, no LoD)
until ``max_batch_size`` samples or ``timeout_ms`` after the first job, then waits for a free runner and also takes
whatever arrived meanwhile. A job of ``max_batch_size`` samples or more runs alone. With ``max_batch_size`` <= 1
jobs go straight to the runners, one predictor run each (Paddle Serving's default).

Merging is only correct for a model whose output rows depend on their own input row alone; the server checks
that when it loads the model (``teachers.batch_check``) and turns merging off otherwise.

No thread waits without a timeout: every wait is bounded and re-checks whether the batcher is closing, so one
wedged predictor holds its own runner only. ``submit_async`` hands back a Future that a waiter may cancel (a
timed-out request): a cancelled job is skipped, never run.

Example::

    batcher = DynamicBatcher(pool.run, max_batch_size=64, timeout_ms=2, runners=pool.size)
    outputs = batcher.submit({"img": images}, ["prediction"])     # blocks, {name: (array, lod)}
    future = batcher.submit_async({"img": images}, ["prediction"])  # concurrent.futures.Future
    batcher.close(timeout=30)
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

RunFn = Callable[..., dict]
RunObserver = Callable[[int, float, float], None]   # (samples in the run, seconds it took, thread CPU seconds)
_POLL_S = 0.25                               # how often a waiting thread re-checks whether to stop


class BatcherClosed(RuntimeError):
    """The batcher no longer accepts jobs (the server is shutting down)."""


class _Job:
    __slots__ = ("feeds", "fetch", "lods", "batch", "key", "future")

    def __init__(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str], lods: Optional[Mapping[str, list]],
                 merging: bool = True):
        self.feeds = feeds
        self.fetch = tuple(fetch)
        self.lods = lods
        self.batch = int(next(iter(feeds.values())).shape[0]) if feeds else 0
        mergeable = merging and (not any(lods.values()) if lods else True)
        self.key = (self.fetch, tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in feeds.items()))) \
            if mergeable else None
        self.future: Future = Future()


class DynamicBatcher:
    """Run ``run_fn(feeds, fetch_names, lods)`` on ``runners`` threads, merging concurrent jobs when
    ``max_batch_size`` > 1.

    Args:
        run_fn: one predictor run; returns {fetch name: (array [N, ...], lod list)}.
        max_batch_size: most samples in a merged run; <= 1 never merges.
        timeout_ms: how long the first job of a run waits for others to join it.
        runners: threads running ``run_fn`` (one per predictor).
        predict_timeout: seconds ``submit`` waits for its answer (PredictorTimeout after that).
        on_run: called after every predictor run with (samples, wall seconds, CPU seconds of the running
            thread), e.g. for metrics.
    """

    def __init__(self, run_fn: RunFn, max_batch_size: int, timeout_ms: float, runners: int = 1,
                 predict_timeout: float = 60.0, on_run: Optional[RunObserver] = None):
        self._run_fn = run_fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.timeout_s = max(0.0, float(timeout_ms)) / 1000.0
        self.predict_timeout = float(predict_timeout)
        self._on_run = on_run
        self._queue: queue.SimpleQueue = queue.SimpleQueue()   # jobs waiting for the collector
        self._work: queue.SimpleQueue = queue.SimpleQueue()    # groups of jobs waiting for a runner
        self._carry: collections.deque = collections.deque()
        self._runners = max(1, runners)
        self._free_runners = threading.Semaphore(self._runners)
        self._closed = False
        self._stop = threading.Event()                # threads end once their queue is empty
        self._lock = threading.Lock()
        self._waiting = 0                             # jobs submitted and not yet started
        self._running = 0                             # predictor runs in progress
        self.runs = 0
        self.merged_jobs = 0
        self._threads = [threading.Thread(target=self._runner_loop, name=f"batch-runner-{i}", daemon=True)
                         for i in range(self._runners)]
        if self.max_batch_size > 1:
            self._threads.append(threading.Thread(target=self._collect_loop, name="batch-collector", daemon=True))
        for t in self._threads:
            t.start()

    @property
    def merging(self) -> bool:
        return self.max_batch_size > 1

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not yet handed to the predictor."""
        return self._waiting

    def submit_async(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                     lods: Optional[Mapping[str, list]] = None) -> Future:
        """Queue a job; its Future gives this job's outputs {name: (array, lod)} or the run's exception.

        Raises BatcherClosed once ``close`` was called."""
        job = _Job(feeds, fetch, lods, self.merging)
        with self._lock:
            if self._closed:
                raise BatcherClosed("server is shutting down")
            self._waiting += 1
            if self.merging:
                self._queue.put(job)
            else:
                self._work.put([job])
        return job.future

    def submit(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
               lods: Optional[Mapping[str, list]] = None) -> dict:
        """``submit_async`` and wait up to ``predict_timeout`` seconds (then PredictorTimeout)."""
        from .predictor_pool import PredictorTimeout

        future = self.submit_async(feeds, fetch, lods)
        try:
            return future.result(timeout=self.predict_timeout)
        except FutureTimeout:
            future.cancel()
            raise PredictorTimeout(f"no answer from the predictor within {self.predict_timeout:g}s") from None

    def close(self, timeout: float = 30.0) -> bool:
        """Stop accepting jobs, let queued jobs run for up to ``timeout`` seconds, then fail the rest with
        BatcherClosed. Returns False when a predictor run is still in progress (stuck) at the end."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        deadline = time.monotonic() + max(0.0, timeout)
        if self.merging:
            self._threads[-1].join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and (self._waiting > 0 or not self._work.empty()):
            time.sleep(0.01)
        self._stop.set()
        if self.merging:
            self._threads[-1].join(2 * _POLL_S)
        self._fail_queued()
        for t in self._threads:
            t.join(max(0.0, min(deadline - time.monotonic(), 2 * _POLL_S)) if self._running else 2 * _POLL_S)
        return self._running == 0

    def _fail_queued(self) -> None:
        leftovers = list(self._carry)
        self._carry.clear()
        for q in (self._queue, self._work):
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    leftovers.extend(item if isinstance(item, list) else [item])
        for job in leftovers:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(BatcherClosed("server shut down before this request ran"))
            self._started(1)

    def _started(self, jobs: int) -> None:
        with self._lock:
            self._waiting -= jobs

    # -- collector ----------------------------------------------------------------------------------
    def _next(self, timeout: float) -> Optional[_Job]:
        if self._carry:
            return self._carry.popleft()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _collect_loop(self) -> None:
        stopping = False
        while not self._stop.is_set():
            try:
                first = self._next(0 if stopping else _POLL_S)
            except queue.Empty:
                if stopping:
                    break
                continue
            if first is None:
                stopping = True
                continue
            group = [first]
            if first.key is not None and first.batch < self.max_batch_size:
                stopping = self._fill(group, time.monotonic() + self.timeout_s, wait=True) or stopping
            while not self._free_runners.acquire(timeout=_POLL_S):
                if self._stop.is_set():
                    self._carry.extend(group)
                    return
            if first.key is not None:
                stopping = self._fill(group, 0, wait=False) or stopping
            self._work.put(group)

    def _fill(self, group: list, deadline: float, wait: bool) -> bool:
        """Add compatible jobs to ``group``; returns True when the close marker was seen."""
        total = sum(j.batch for j in group)
        key = group[0].key
        while total < self.max_batch_size:
            remaining = deadline - time.monotonic() if wait else 0
            if wait and remaining <= 0:
                break
            try:
                job = self._next(remaining)
            except queue.Empty:
                break
            if job is None:
                return True
            if job.key != key or total + job.batch > self.max_batch_size:
                self._carry.append(job)
                break
            group.append(job)
            total += job.batch
        return False

    # -- runners ------------------------------------------------------------------------------------
    def _runner_loop(self) -> None:
        while True:
            try:
                group = self._work.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                self._started(len(group))
                live = [job for job in group if job.future.set_running_or_notify_cancel()]  # drop timed-out jobs
                if len(live) == 1:
                    self._settle(live[0])
                elif live:
                    self._run_merged(live)
            finally:
                if self.merging:
                    self._free_runners.release()

    def _timed_run(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str], lods) -> dict:
        start, cpu = time.perf_counter(), time.thread_time()
        with self._lock:
            self._running += 1
        try:
            return self._run_fn(feeds, fetch, lods)
        finally:
            with self._lock:
                self._running -= 1
            self.runs += 1
            if self._on_run is not None:
                batch = int(next(iter(feeds.values())).shape[0]) if feeds else 0
                self._on_run(batch, time.perf_counter() - start, time.thread_time() - cpu)

    def _run_merged(self, group: list) -> None:
        names = list(group[0].feeds)
        merged = {n: np.concatenate([j.feeds[n] for j in group], axis=0) for n in names}
        total = sum(j.batch for j in group)
        try:
            outputs = self._timed_run(merged, group[0].fetch, None)
        except Exception as exc:  # noqa: BLE001 - every job of the group gets the error
            for job in group:
                job.future.set_exception(exc)
            return
        self.merged_jobs += len(group)
        if any(arr.shape[:1] != (total,) or lod for arr, lod in outputs.values()):
            for job in group:  # outputs not split by sample: run each job on its own
                self._settle(job)
            return
        start = 0
        for job in group:
            end = start + job.batch
            job.future.set_result({n: (arr[start:end], []) for n, (arr, _) in outputs.items()})
            start = end

    def _settle(self, job: _Job) -> None:
        try:
            job.future.set_result(self._timed_run(job.feeds, job.fetch, job.lods))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request
            job.future.set_exception(exc)
