"""Server-side dynamic batching: concurrent requests are merged into one predictor run and split back.

One collector thread takes the first waiting job, keeps collecting compatible jobs (same fetch names, same
per-sample shapes and dtypes, same LoD feeds: merged with shifted offsets, see ``teachers/lod.py``) until
``max_batch_size`` samples or ``timeout_ms`` after the first job, then waits for a free runner and also takes
whatever arrived meanwhile. ``runners`` threads run the merged batches (one per predictor). A job of
``max_batch_size`` samples or more runs alone.

Example::

    batcher = DynamicBatcher(pool.run, max_batch_size=64, timeout_ms=2, runners=pool.size)
    outputs = batcher.submit({"img": images}, ["prediction"])     # blocks, {name: (array, lod)}
    batcher.close()
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from . import lod

logger = logging.getLogger(__name__)

RunFn = Callable[..., dict]


class BatcherClosed(RuntimeError):
    """The batcher no longer accepts jobs (the server is shutting down)."""


class _Job:
    __slots__ = ("feeds", "fetch", "lods", "batch", "key", "future")

    def __init__(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str], lods: Optional[Mapping[str, list]]):
        self.feeds = feeds
        self.fetch = tuple(fetch)
        self.lods = lods
        self.batch = lod.samples_of(feeds, lods)   # LoD requests count sequences and merge with shifted offsets
        shapes = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in feeds.items()))
        self.key = (self.fetch, lod.lod_key(lods), shapes)
        self.future: Future = Future()


class DynamicBatcher:
    """Merge concurrent ``submit`` calls into runs of ``run_fn(feeds, fetch_names, lods)``."""

    def __init__(self, run_fn: RunFn, max_batch_size: int, timeout_ms: float, runners: int = 1):
        self._run_fn = run_fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.timeout_s = max(0.0, float(timeout_ms)) / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._carry: collections.deque = collections.deque()
        self._runners = max(1, runners)
        self._free_runners = threading.Semaphore(self._runners)
        self._closed = False
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=self._runners, thread_name_prefix="batch-runner")
        self._collector = threading.Thread(target=self._collect_loop, name="batch-collector", daemon=True)
        self._collector.start()
        self.runs = 0
        self.merged_jobs = 0

    def submit(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
               lods: Optional[Mapping[str, list]] = None) -> dict:
        """Run ``feeds`` (possibly merged with others) and return this job's outputs; blocks."""
        job = _Job(feeds, fetch, lods)
        with self._lock:
            if self._closed:
                raise BatcherClosed("server is shutting down")
            self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        """Stop accepting jobs, finish every queued job, stop the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._collector.join()
        self._executor.shutdown(wait=True)

    # -- collector ----------------------------------------------------------------------------------
    def _next(self, timeout: Optional[float]) -> Optional[_Job]:
        if self._carry:
            return self._carry.popleft()
        if timeout is not None and timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _collect_loop(self) -> None:
        stopping = False
        while True:
            try:
                first = self._next(None if not stopping else 0)
            except queue.Empty:
                break
            if first is None:
                stopping = True
                continue
            group = [first]
            if first.key is not None and first.batch < self.max_batch_size:
                stopping = self._fill(group, time.monotonic() + self.timeout_s, wait=True) or stopping
            self._free_runners.acquire()
            if first.key is not None:
                stopping = self._fill(group, 0, wait=False) or stopping
            self._executor.submit(self._run_group, group)
        for _ in range(self._runners):  # wait for the running groups to finish
            self._free_runners.acquire()
        for _ in range(self._runners):
            self._free_runners.release()

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

    # -- runner -------------------------------------------------------------------------------------
    def _run_group(self, group: list) -> None:
        try:
            if len(group) == 1:
                job = group[0]
                self._settle(job, lambda: self._run_fn(job.feeds, job.fetch, job.lods))
            else:
                self._run_merged(group)
        finally:
            self._free_runners.release()

    def _run_merged(self, group: list) -> None:
        merged, lods = lod.merge_jobs([(j.feeds, j.lods) for j in group])
        try:
            outputs = self._run_fn(merged, group[0].fetch, lods or None)
        except Exception as exc:  # noqa: BLE001 - every job of the group gets the error
            for job in group:
                job.future.set_exception(exc)
            return
        self.runs += 1
        self.merged_jobs += len(group)
        shares = lod.split_outputs(outputs, [j.batch for j in group])
        if shares is None:
            for job in group:  # outputs not split by sample: run each job on its own
                self._settle(job, lambda job=job: self._run_fn(job.feeds, job.fetch, job.lods))
            return
        for job, share in zip(group, shares):
            job.future.set_result(share)

    def _settle(self, job: _Job, call: Callable[[], dict]) -> None:
        try:
            job.future.set_result(call())
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request
            job.future.set_exception(exc)
        self.runs += 1
