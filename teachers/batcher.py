"""Server-side dynamic batching: concurrent requests are merged into one predictor run and split back.

Two batchers with the same merging rules: ``LoopBatcher`` (the server's default, ``teachers.serve --worker_io
loop``) runs entirely on the event loop and drives the predictor workers' sockets itself
(``teachers.worker_pool.WorkerPool.launch``), no thread hand-off on a request's path; ``DynamicBatcher`` (below;
``--worker_io threads``) runs any blocking ``run_fn`` on runner threads.

``runners`` threads (one per predictor) run the work. With ``max_batch_size`` > 1 the runners collect the
batches themselves, one at a time (whichever runner is free leads): it takes the first waiting job, keeps
collecting compatible jobs (same fetch names, same per-sample shapes and dtypes, same LoD feeds: merged with
shifted offsets, see ``teachers/lod_checks.py``) until ``max_batch_size`` samples or ``timeout_ms`` after the first
job arrived (a job that already waited that long for a free runner takes only what is queued), then runs the
merged batch. A job of ``max_batch_size`` samples or more runs alone. With ``max_batch_size`` <= 1 jobs go
straight to the runners, one predictor run each (Paddle Serving's default). There is no separate collector
thread: a job passes one thread hand-off on its way in and one on its way out.

Merging is only correct for a model whose output rows depend on their own input row alone; the server checks
that when it loads the model (``teachers.batch_check``) and turns merging off otherwise. A merged run that fails
(other than by a timeout or a lost worker, ``errors.BATCH_FAILURES``) is re-run job by job, so one request the
model rejects fails alone.

No thread waits without a timeout: every wait is bounded and re-checks whether the batcher is closing, so one
wedged predictor holds its own runner only. A job can be cancelled until it starts (a timed-out request): a
cancelled job is skipped, never run.

Two ways to wait for a job: ``submit_async`` hands back a ``concurrent.futures.Future`` (any thread);
``submit_to_loop`` (event-loop thread only) hands back a ``LoopJob`` whose ``waiter`` is an asyncio Future the
runner settles directly with ``loop.call_soon_threadsafe`` (no concurrent Future, no extra callback hop).

Example::

    batcher = DynamicBatcher(pool.run, max_batch_size=64, timeout_ms=2, runners=pool.size)
    outputs = batcher.submit({"img": images}, ["prediction"])     # blocks, {name: (array, lod)}
    future = batcher.submit_async({"img": images}, ["prediction"])  # concurrent.futures.Future
    job = batcher.submit_to_loop({"img": images}, ["prediction"])   # in the event loop: await job.waiter
    batcher.close(timeout=30)
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Mapping, Optional, Protocol, Sequence

import numpy as np

from . import lod_checks as lod
from .errors import BATCH_FAILURES

logger = logging.getLogger(__name__)

RunFn = Callable[..., dict]
RunObserver = Callable[[int, float, float], None]   # (samples in the run, seconds it took, thread CPU seconds)
_POLL_S = 0.25                               # how often a waiting thread re-checks whether to stop
_PENDING, _RUNNING, _CANCELLED = 0, 1, 2


class BatcherClosed(RuntimeError):
    """The batcher no longer accepts jobs (the server is shutting down)."""


class _Job:
    """One submitted request. Exactly one of ``future`` (submit_async) and ``waiter`` + ``loop``
    (submit_to_loop) is set; ``state`` moves PENDING -> RUNNING or PENDING -> CANCELLED under the batcher's
    lock, so a cancelled job never runs."""

    __slots__ = ("feeds", "fetch", "lods", "batch", "key", "arrived", "state", "future", "waiter", "loop", "_lock")

    def __init__(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str], lods: Optional[Mapping[str, list]],
                 merging: bool, lock: threading.Lock):
        self.feeds = feeds
        self.fetch = tuple(fetch)
        self.lods = lods
        self.batch = lod.samples_of(feeds, lods)   # LoD requests count sequences and merge with shifted offsets
        if merging:
            shapes = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in feeds.items()))
            self.key = (self.fetch, lod.lod_key(lods), shapes)
        else:
            self.key = None
        self.arrived = time.monotonic()
        self.state = _PENDING
        self.future: Optional[Future] = None
        self.waiter: Optional[asyncio.Future] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._lock = lock

    def cancel(self) -> bool:
        """Cancel the job if it has not started; True when it will never run."""
        with self._lock:
            if self.state == _PENDING:
                self.state = _CANCELLED
                return True
            return self.state == _CANCELLED

    def start(self) -> bool:
        """Mark the job running; False when it was cancelled (then it must not run)."""
        if self.future is not None:
            if not self.future.set_running_or_notify_cancel():
                self.state = _CANCELLED
                return False
        with self._lock:
            if self.state != _PENDING:
                return False
            self.state = _RUNNING
            return True

    def finish(self, result=None, error: Optional[BaseException] = None) -> None:
        if self.future is not None:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
            return
        try:
            self.loop.call_soon_threadsafe(_settle_waiter, self.waiter, result, error)
        except RuntimeError:   # the event loop is closed: nobody waits any more
            pass


def _settle_waiter(waiter: asyncio.Future, result, error: Optional[BaseException]) -> None:
    if waiter.done():          # the request gave up (timeout) or was cancelled meanwhile
        return
    if error is None:
        waiter.set_result(result)
    else:
        waiter.set_exception(error)


class _BlockingSubmit:
    """``submit``, the blocking form of a batcher's ``submit_async`` (for callers on other threads)."""

    predict_timeout: float

    def submit_async(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                     lods: Optional[Mapping[str, list]] = None) -> Future:
        raise NotImplementedError

    def submit(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
               lods: Optional[Mapping[str, list]] = None) -> dict:
        """``submit_async`` and wait up to ``predict_timeout`` seconds (not from the event loop's thread).

        Raises:
            PredictorTimeout: no answer within ``predict_timeout`` seconds.
            BatcherClosed: the batcher is closed.
            Exception: the run's own error (WorkerLost, ModelRejectedInput, ...).
        """
        from .predictor_pool import PredictorTimeout

        future = self.submit_async(feeds, fetch, lods)
        try:
            return future.result(timeout=self.predict_timeout)
        except FutureTimeout:
            future.cancel()
            raise PredictorTimeout(f"no answer from the predictor within {self.predict_timeout:g}s") from None


class DynamicBatcher(_BlockingSubmit):
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
        self._queue: queue.SimpleQueue = queue.SimpleQueue()   # jobs not yet taken by a runner
        self._carry: collections.deque = collections.deque()   # taken by the leader but left for the next batch
        self._leader = threading.Lock()               # held by the runner collecting a batch (merging only)
        self._runners = max(1, runners)
        self._closed = False
        self._stop = threading.Event()                # runners end once the queue is empty
        self._lock = threading.Lock()
        self._waiting = 0                             # jobs submitted and not yet started
        self._running = 0                             # predictor runs in progress
        self.runs = 0
        self.merged_jobs = 0
        self._threads = [threading.Thread(target=self._runner_loop, name=f"batch-runner-{i}", daemon=True)
                         for i in range(self._runners)]
        for t in self._threads:
            t.start()

    @property
    def merging(self) -> bool:
        return self.max_batch_size > 1

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not yet handed to the predictor."""
        return self._waiting

    def _enqueue(self, job: _Job) -> _Job:
        with self._lock:
            if self._closed:
                raise BatcherClosed("server is shutting down")
            self._waiting += 1
        self._queue.put(job)
        return job

    def submit_async(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                     lods: Optional[Mapping[str, list]] = None) -> Future:
        """Queue a job; its Future gives this job's outputs {name: (array, lod)} or the run's exception.
        Cancelling the Future before the job starts means it never runs.

        Raises BatcherClosed once ``close`` was called."""
        job = _Job(feeds, fetch, lods, self.merging, self._lock)
        job.future = Future()
        return self._enqueue(job).future

    def submit_to_loop(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                       lods: Optional[Mapping[str, list]] = None) -> _Job:
        """Queue a job from the running event loop's thread; ``await job.waiter`` gives its outputs (or raises
        the run's exception); ``job.cancel()`` before it starts means it never runs.

        Raises BatcherClosed once ``close`` was called; RuntimeError outside an event loop."""
        job = _Job(feeds, fetch, lods, self.merging, self._lock)
        job.loop = asyncio.get_running_loop()
        job.waiter = job.loop.create_future()
        return self._enqueue(job)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop accepting jobs, let queued jobs run for up to ``timeout`` seconds, then fail the rest with
        BatcherClosed. Returns False when a predictor run is still in progress (stuck) at the end."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + max(0.0, timeout)
        while time.monotonic() < deadline and self._waiting > 0:
            time.sleep(0.01)
        self._stop.set()
        # a runner collecting a batch lets go of the leader lock within its batch timeout (runners check _stop)
        leader = self._leader.acquire(timeout=2 * _POLL_S + self.timeout_s)
        try:
            self._fail_queued()
        finally:
            if leader:
                self._leader.release()
        for t in self._threads:
            t.join(max(0.0, min(deadline - time.monotonic(), 2 * _POLL_S)) if self._running else 2 * _POLL_S)
        return self._running == 0

    def _fail_queued(self) -> None:
        leftovers = []
        while self._carry:
            leftovers.append(self._carry.popleft())
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in leftovers:
            if job.start():
                job.finish(error=BatcherClosed("server shut down before this request ran"))
            self._started(1)

    def _started(self, jobs: int) -> None:
        with self._lock:
            self._waiting -= jobs

    # -- taking work --------------------------------------------------------------------------------
    def _next(self, timeout: float) -> _Job:
        if self._carry:
            return self._carry.popleft()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _take(self) -> Optional[list]:
        """The next group of jobs to run (None when the batcher stops and nothing is left)."""
        if not self.merging:
            try:
                return [self._queue.get(timeout=_POLL_S)]
            except queue.Empty:
                return None
        if not self._leader.acquire(timeout=_POLL_S):
            return None
        try:
            if self._stop.is_set():
                return None
            try:
                first = self._next(_POLL_S)
            except queue.Empty:
                return None
            group = [first]
            if first.key is not None and first.batch < self.max_batch_size:
                self._fill(group, first.arrived + self.timeout_s)
            return group
        finally:
            self._leader.release()

    def _fill(self, group: list, deadline: float) -> None:
        """Add compatible jobs to ``group`` until it is full or ``deadline`` passes (no waiting once closed)."""
        total = sum(j.batch for j in group)
        key = group[0].key
        while total < self.max_batch_size:
            remaining = 0.0 if self._closed else deadline - time.monotonic()
            try:
                job = self._next(remaining)
            except queue.Empty:
                break
            if job.key != key or total + job.batch > self.max_batch_size:
                self._carry.append(job)
                break
            group.append(job)
            total += job.batch

    # -- runners ------------------------------------------------------------------------------------
    def _runner_loop(self) -> None:
        while True:
            group = self._take()
            if group is None:
                if self._stop.is_set():
                    return
                continue
            self._started(len(group))
            live = [job for job in group if job.start()]  # drop timed-out jobs
            if len(live) == 1:
                self._settle(live[0])
            elif live:
                self._run_merged(live)

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
        try:
            merged, lods = lod.merge_jobs([(j.feeds, j.lods) for j in group])
        except Exception as exc:  # noqa: BLE001 - jobs that cannot be one batch run one by one; the runner lives
            logger.warning("%d jobs could not be merged, running them one by one: %s", len(group), exc)
            for job in group:
                self._settle(job)
            return
        try:
            outputs = self._timed_run(merged, group[0].fetch, lods or None)
        except BATCH_FAILURES as exc:   # a timeout or a lost worker: every job of the group gets it
            for job in group:
                job.finish(error=exc)
            return
        except Exception:  # noqa: BLE001 - one job's input may have failed the run: each job alone
            logger.info("a merged run of %d requests failed; running each alone so only a bad one fails",
                        len(group))
            for job in group:
                self._settle(job)
            return
        self.merged_jobs += len(group)
        shares = lod.split_outputs(outputs, [j.batch for j in group])
        if shares is None:
            for job in group:  # outputs not split by sample: run each job on its own
                self._settle(job)
            return
        for job, share in zip(group, shares):
            job.finish(share)

    def _settle(self, job: _Job) -> None:
        try:
            outputs = self._timed_run(job.feeds, job.fetch, job.lods)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request
            job.finish(error=exc)
            return
        job.finish(outputs)


# -- the event loop's batcher -------------------------------------------------------------------------------
class LoopRunner(Protocol):
    """What ``LoopBatcher`` drives (``teachers.worker_pool.WorkerPool``): workers borrowed and runs launched
    from the event loop's thread, answers reported by a callback in that loop."""

    def attach_loop(self, loop: asyncio.AbstractEventLoop, on_idle: Callable[[], None]) -> None: ...

    def detach_loop(self, error: BaseException) -> None: ...

    def idle_workers(self) -> int: ...

    def borrow_nowait(self): ...

    def give_back(self, worker) -> None: ...

    def launch(self, worker, feeds: Mapping[str, np.ndarray], fetch_names: Sequence[str],
               lods: Optional[Mapping[str, list]], done: Callable[[Optional[dict], Optional[BaseException]], None]
               ) -> None: ...


class LoopJob:
    """One request queued on a ``LoopBatcher``: ``await job.waiter`` (submit_to_loop) or ``future``
    (submit / submit_async, any thread). Touched in the loop's thread only, apart from ``future``."""

    __slots__ = ("feeds", "fetch", "lods", "batch", "key", "arrived", "state", "future", "waiter", "_owner",
                 "_running")

    def __init__(self, owner: LoopBatcher, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                 lods: Optional[Mapping[str, list]]):
        self._owner = owner
        self.feeds = feeds
        self.fetch = tuple(fetch)
        self.lods = lods
        self.batch = lod.samples_of(feeds, lods)
        if owner.merging:
            shapes = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in feeds.items()))
            self.key = (self.fetch, lod.lod_key(lods), shapes)
        else:
            self.key = None
        self.arrived = time.monotonic()
        self.state = _PENDING
        self.future: Optional[Future] = None
        self.waiter: Optional[asyncio.Future] = None
        self._running = False      # future.set_running_or_notify_cancel was called

    def cancel(self) -> bool:
        """(Loop thread.) Cancel the job if it has not started; True when it will never run."""
        if self.state == _PENDING:
            self.state = _CANCELLED
            self._owner._waiting -= 1
            return True
        return self.state == _CANCELLED

    def start(self) -> bool:
        """Mark the job running; False when it was cancelled (then it must not run)."""
        if self.state != _PENDING:
            return False
        self._owner._waiting -= 1
        if self.future is not None and not self._running:
            if not self.future.set_running_or_notify_cancel():
                self.state = _CANCELLED
                return False
            self._running = True
        self.state = _RUNNING
        return True

    def finish(self, result=None, error: Optional[BaseException] = None) -> None:
        if self.future is not None:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        else:
            _settle_waiter(self.waiter, result, error)


class LoopBatcher(_BlockingSubmit):
    """The teacher server's batcher with ``--worker_io loop``: everything on the event loop's thread, no runner
    thread.

    Jobs queue in the loop; whenever a worker is free (``runner.idle_workers``) the first job is taken with the
    compatible jobs queued behind it (as ``DynamicBatcher`` merges: same fetch names, per-sample shapes,
    dtypes and LoD feeds, up to ``max_batch_size`` samples, the first job waiting at most ``timeout_ms`` for
    others, a ``loop.call_later`` timer), and ``runner.launch`` writes the run to a worker's socket; the worker's
    answer, read by ``loop.add_reader``, settles the requests' futures directly and starts the next run. A merged
    run that fails (other than by ``errors.BATCH_FAILURES``) puts its jobs back at the head of the queue to run
    one by one, so only a bad request fails. A job can be cancelled until it starts (a request given up) and
    never runs then.

    Example (in the event loop)::

        batcher = LoopBatcher(pool, max_batch_size=64, timeout_ms=2, predict_timeout=30)
        batcher.bind(asyncio.get_running_loop())
        job = batcher.submit_to_loop({"img": images}, ["prediction"])
        outputs = await job.waiter                           # {name: (array, lod)}
        clean = await batcher.aclose(timeout=30)
    """

    def __init__(self, runner: LoopRunner, max_batch_size: int, timeout_ms: float, predict_timeout: float = 60.0):
        self._runner = runner
        self.max_batch_size = max(1, int(max_batch_size))
        self.timeout_s = max(0.0, float(timeout_ms)) / 1000.0
        self.predict_timeout = float(predict_timeout)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._queue: collections.deque = collections.deque()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._closed = False
        self._waiting = 0          # jobs queued and neither started nor cancelled
        self._running = 0          # runs launched and not yet answered
        self.runs = 0
        self.merged_jobs = 0

    @property
    def merging(self) -> bool:
        return self.max_batch_size > 1

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not yet handed to a worker."""
        return self._waiting

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve from ``loop`` (call in it, before the first submit)."""
        self._loop = loop
        self._runner.attach_loop(loop, self._dispatch)

    # -- submitting ---------------------------------------------------------------------------------
    def submit_to_loop(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                       lods: Optional[Mapping[str, list]] = None) -> LoopJob:
        """Queue a job from the loop's thread; ``await job.waiter`` gives its outputs {name: (array, lod)} or
        raises the run's error; ``job.cancel()`` before it starts means it never runs.

        Raises:
            BatcherClosed: ``aclose`` was called.
        """
        if self._closed:
            raise BatcherClosed("server is shutting down")
        job = LoopJob(self, feeds, fetch, lods)
        job.waiter = self._loop.create_future()
        self._enqueue(job)
        return job

    def submit_async(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                     lods: Optional[Mapping[str, list]] = None) -> Future:
        """Queue a job from any other thread; its ``concurrent.futures.Future`` gives the outputs (cancelling it
        before the job starts means it never runs).

        Raises:
            BatcherClosed: ``aclose`` was called.
            RuntimeError: ``bind`` was not called.
        """
        if self._closed:
            raise BatcherClosed("server is shutting down")
        if self._loop is None:
            raise RuntimeError("LoopBatcher.bind(loop) was not called")
        job = LoopJob(self, feeds, fetch, lods)
        job.future = Future()
        self._loop.call_soon_threadsafe(self._enqueue_or_refuse, job)
        return job.future

    def _enqueue_or_refuse(self, job: LoopJob) -> None:
        if self._closed:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(BatcherClosed("server is shutting down"))
            return
        self._enqueue(job)

    def _enqueue(self, job: LoopJob) -> None:
        self._waiting += 1
        self._queue.append(job)
        self._dispatch()

    # -- running ------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Hand queued jobs to free workers (loop thread): called on every submit, answer, timer and freed
        worker."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue_ = self._queue
        while queue_:
            while queue_ and queue_[0].state != _PENDING:
                queue_.popleft()
            if not queue_ or self._runner.idle_workers() <= 0:
                return
            count = self._group_size()
            if count == 0:
                return            # the first job still waits for others to join it (timer set)
            worker = self._runner.borrow_nowait()
            if worker is None:    # the free worker had died: its replacement calls _dispatch
                return
            group = []
            for _ in range(count):
                job = queue_.popleft()
                if job.start():
                    group.append(job)
            if not group:
                self._runner.give_back(worker)   # every job of the group was cancelled meanwhile
                continue
            self._launch(worker, group)

    def _group_size(self) -> int:
        """How many queued jobs (cancelled ones included) the next run takes; 0 when it should wait longer."""
        queue_ = self._queue
        first = queue_[0]
        if first.key is None or first.batch >= self.max_batch_size:
            return 1
        total, count = first.batch, 1
        for job in itertools.islice(queue_, 1, None):
            if job.state != _PENDING:
                count += 1
                continue
            if job.key != first.key or total + job.batch > self.max_batch_size:
                return count      # the group is as big as it gets
            total += job.batch
            count += 1
            if total >= self.max_batch_size:
                return count
        wait = first.arrived + self.timeout_s - time.monotonic()
        if wait > 0 and not self._closed:
            self._timer = self._loop.call_later(wait, self._dispatch)
            return 0
        return count

    def _launch(self, worker, group: list) -> None:
        if len(group) == 1:
            job = group[0]
            feeds, lods = job.feeds, job.lods
        else:
            try:
                feeds, lods = lod.merge_jobs([(j.feeds, j.lods) for j in group])
                lods = lods or None
            except Exception as exc:  # noqa: BLE001 - jobs that cannot be one batch run one by one
                logger.warning("%d jobs could not be merged, running them one by one: %s", len(group), exc)
                self._runner.give_back(worker)
                self._requeue_alone(group)
                return
        self._running += 1
        self.runs += 1
        self._runner.launch(worker, feeds, group[0].fetch, lods,
                            lambda outputs, error: self._answered(group, outputs, error))

    def _answered(self, group: list, outputs: Optional[dict], error: Optional[BaseException]) -> None:
        self._running -= 1
        if len(group) == 1:
            group[0].finish(outputs, error)
        elif error is not None:
            if isinstance(error, BATCH_FAILURES) or isinstance(error, BatcherClosed):
                for job in group:
                    job.finish(error=error)
            else:
                logger.info("a merged run of %d requests failed; running each alone so only a bad one fails",
                            len(group))
                self._requeue_alone(group)
        else:
            shares = lod.split_outputs(outputs, [j.batch for j in group])
            if shares is None:      # outputs not split by sample: run each job on its own
                self._requeue_alone(group)
            else:
                self.merged_jobs += len(group)
                for job, share in zip(group, shares):
                    job.finish(share)
        self._dispatch()

    def _requeue_alone(self, group: list) -> None:
        """Put ``group``'s jobs back at the head of the queue, each to run alone (cancellable again)."""
        for job in reversed(group):
            job.key = None
            job.state = _PENDING
            self._waiting += 1
            self._queue.appendleft(job)

    # -- closing ------------------------------------------------------------------------------------
    async def aclose(self, timeout: float = 30.0) -> bool:
        """(In the loop.) Stop accepting jobs, let queued and running ones finish for up to ``timeout`` seconds,
        then fail the rest with BatcherClosed and stop driving the workers. Returns False when a run was still
        in progress (stuck) at the end."""
        self._closed = True
        self._dispatch()          # a batch waiting for others to join goes now
        deadline = time.monotonic() + max(0.0, timeout)
        while (self._waiting > 0 or self._running > 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        clean = self._running == 0
        closed = BatcherClosed("server shut down before this request ran")
        while self._queue:
            job = self._queue.popleft()
            if job.start():
                job.finish(error=closed)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._runner.detach_loop(BatcherClosed("server shut down while this request ran"))
        return clean
