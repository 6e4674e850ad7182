"""The reader's data path: numbered tasks, bounded in-flight work, the reorder buffer and stitching.

One epoch, top to bottom (all in the student process, which owns order and counts)::

    user generator --SlotPlan--> numbered Tasks --PredictionStage--> numbered TaskResults
        --reorder buffer (yield strictly in input order)--> input item + predictions, in the input's kind

- ``SlotPlan`` says which slots of a sample are teacher feeds (sent) and which pass through, and turns slot
  values into feed arrays with ``client.prepare_feed`` (cast + reshape to the config's feed shape).
- A ``Task`` is at most ``teacher_batch_size`` samples of one student batch (a task never crosses a student
  batch; samples from a sample generator are grouped). ``seq`` numbers tasks within the epoch and
  ``sample_start`` is the epoch index of its first sample, so a cache stage can key answers by them.
- A ``PredictionStage`` turns submitted tasks into results, in any order. ``RemoteStage`` does it with worker
  processes and a ``TeacherPool`` (retries on another teacher with backoff, probes, the all-teachers-down
  timeout). A cache stage (offline mode) wraps another stage with the same interface.
- ``run_epoch`` keeps at most ``max_pending_tasks`` tasks read but not yet yielded and yields each input item
  once, in order, with its predictions appended.

Example (what ``DistillReader`` does)::

    plan = SlotPlan(["img", "label"], ["prediction"], config)
    for sample_list in run_epoch("sample_list", gen(), plan, stage, teacher_batch_size=32, ...):
        ...
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from . import ragged
from .client import prepare_feed
from .serving_config import ConfigError, ServingConfig, VarSpec
from .teacher_pool import TeacherPool, backoff_delay
from .workers import WorkerPool

logger = logging.getLogger(__name__)

KINDS = ("sample", "sample_list", "batch")


class DistillReaderError(RuntimeError):
    """The reader cannot go on (teachers unreachable, bad answers, bad input); the message says why."""


class AllTeachersDownError(DistillReaderError):
    """No teacher was usable for longer than ``all_teachers_down_timeout``; names the teachers and the last error."""


class TeacherAnswerInvalid(DistillReaderError):
    """A teacher answered with something that does not fit the request; ``endpoint`` names it."""

    def __init__(self, endpoint: str, message: str):
        super().__init__(message)
        self.endpoint = endpoint


# ---------------------------------------------------------------------------------------------------------
# Tasks and the stage interface
# ---------------------------------------------------------------------------------------------------------
_task_ids = itertools.count(1)


@dataclass
class Task:
    """At most ``teacher_batch_size`` samples of one student batch, as prepared feed arrays.

    ``task_id`` is unique in the process (results of an abandoned epoch never match a new task);
    ``seq`` numbers tasks within the epoch from 0; ``sample_start`` is the epoch index of the first sample.
    """

    task_id: int
    seq: int
    sample_start: int
    size: int
    feeds: dict[str, np.ndarray]


@dataclass
class TaskResult:
    """The predictions for one task: fetch name -> array with ``task.size`` rows."""

    task_id: int
    outputs: dict[str, np.ndarray]


class PredictionStage:
    """Turns submitted tasks into results (in any order). The seam where a cache stage plugs in.

    The pipeline calls ``begin_epoch()``, then ``submit(task)`` while ``capacity() > 0``, and ``poll(timeout)``
    to collect results (``poll`` raises DistillReaderError when the stage cannot go on), then
    ``end_epoch(complete)``. ``in_flight_limit()`` sizes the reorder buffer. ``close()`` frees resources.
    """

    def begin_epoch(self, epoch: int) -> None:
        pass

    def submit(self, task: Task) -> None:
        raise NotImplementedError

    def capacity(self) -> int:
        raise NotImplementedError

    def in_flight_limit(self) -> int:
        raise NotImplementedError

    def poll(self, timeout: float) -> list[TaskResult]:
        raise NotImplementedError

    def end_epoch(self, complete: bool) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------
# Remote stage: worker processes + teacher pool
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RemoteOptions:
    request_timeout: float = 30.0
    max_retries: int = 10
    retry_backoff: float = 0.05
    max_retry_backoff: float = 2.0
    probe_timeout: float = 2.0
    all_teachers_down_timeout: float = 60.0
    num_workers: int = 2
    protocol: str = "grpc"
    wire: str = "auto"
    stop_timeout: float = 2.0


@dataclass
class _Attempt:
    task: Task
    failures: int = 0
    tried: list[str] = field(default_factory=list)
    endpoint: str = ""


class RemoteStage(PredictionStage):
    """Send tasks to teachers through worker processes; retry failed ones on another teacher.

    Workers are started on the first ``submit`` (so a stage that is never asked costs nothing) and persist
    across epochs until ``close()``.
    """

    def __init__(self, pool: TeacherPool, config: ServingConfig, fetch: Sequence[str], options: RemoteOptions):
        self.pool = pool
        self.config = config
        self.fetch = list(fetch)
        self.options = options
        self.workers: Optional[WorkerPool] = None
        self._waiting: deque[_Attempt] = deque()          # ready to send
        self._delayed: list[tuple[float, int, _Attempt]] = []  # (due, task_id, attempt): retry backoff
        self._outstanding: dict[int, _Attempt] = {}       # sent to a worker
        self._probe_ids = itertools.count(1)
        self._probing: dict[int, str] = {}
        self._known_endpoints: set[str] = set()
        self._results: list[TaskResult] = []
        self.requests = 0
        self.retries = 0
        self._stopped_mid_epoch = False

    # -- PredictionStage ----------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        self._reset_epoch()
        self._stopped_mid_epoch = False
        self.pool.restart_down_timer()

    def in_flight_limit(self) -> int:
        return self.pool.per_teacher_in_flight * max(1, len(self.pool.endpoints))

    def capacity(self) -> int:
        pending = len(self._waiting) + len(self._delayed) + len(self._outstanding)
        return self.in_flight_limit() - pending

    def submit(self, task: Task) -> None:
        if not self.pool.dynamic and not self.pool.endpoints:
            raise DistillReaderError("no teacher configured: call set_fixed_teacher(...) or set_dynamic_teacher(...)")
        self._ensure_workers()
        self._waiting.append(_Attempt(task))
        self._dispatch()

    def poll(self, timeout: float) -> list[TaskResult]:
        if self._stopped_mid_epoch:
            raise DistillReaderError("the reader's worker processes were stopped (close()) during this epoch")
        self._dispatch()
        if self.workers is None or not self._busy():
            results, self._results = self._results, []
            return results
        now = time.monotonic()
        wake = now + max(0.0, timeout)
        for t in (self._delayed[0][0] if self._delayed else None, self.pool.next_probe_time(),
                  self._down_deadline()):
            if t is not None:
                wake = min(wake, t)
        if self._results:
            wake = now
        for worker, message in self.workers.receive(timeout=max(0.0, wake - now)):
            self._handle(worker, message)
        self._check_down()
        self._dispatch()
        results, self._results = self._results, []
        return results

    def end_epoch(self, complete: bool) -> dict[str, Any]:
        stats = {"requests": self.requests, "retries": self.retries}
        self._reset_epoch()
        return stats

    def close(self) -> None:
        self._stopped_mid_epoch = bool(self._waiting or self._delayed or self._outstanding)
        if self.workers is not None:
            self.workers.close()
            self.workers = None
        for endpoint in self._probing.values():   # lost with the workers: probe again after the backoff
            self.pool.probe_result(endpoint, False)
        self._probing.clear()
        self._reset_epoch()

    @property
    def worker_pids(self) -> list[int]:
        return self.workers.pids if self.workers is not None else []

    # -- internals -----------------------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        """Forget the epoch's tasks; requests still out are abandoned (their answers will be ignored)."""
        for attempt in self._outstanding.values():
            self.pool.released(attempt.endpoint)
        self._waiting.clear()
        self._delayed.clear()
        self._outstanding.clear()
        self._results.clear()
        self.requests = 0
        self.retries = 0

    def _busy(self) -> bool:
        return bool(self._waiting or self._delayed or self._outstanding or self._probing)

    def _ensure_workers(self) -> None:
        if self.workers is not None and self.workers.owner_pid != os.getpid():
            # this is a forked child of the student (e.g. a multiprocess data loader): start workers of its own
            # (WorkerPool.close only drops the sockets here; lost probes are rescheduled)
            waiting = list(self._waiting)
            self.close()
            self._waiting.extend(waiting)
        if self.workers is None or self.workers.closed:
            from google.protobuf import text_format

            settings = {"config_text": text_format.MessageToString(self.config.to_proto()),
                        "config_source": self.config.source, "fetch": self.fetch,
                        "timeout": self.options.request_timeout, "protocol": self.options.protocol,
                        "wire": self.options.wire}
            self.workers = WorkerPool(self.options.num_workers, settings, stop_timeout=self.options.stop_timeout)

    def _dispatch(self) -> None:
        if self.workers is None:
            return
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            self._waiting.append(heapq.heappop(self._delayed)[2])
        current = set(self.pool.endpoints)
        for gone in self._known_endpoints - current:
            self.workers.forget(gone)
        self._known_endpoints = current
        for endpoint in self.pool.probes_due(now):
            probe_id = next(self._probe_ids)
            self._probing[probe_id] = endpoint
            self.workers.send_probe(probe_id, endpoint, self.options.probe_timeout)
        while self._waiting:
            attempt = self._waiting[0]
            endpoint = self.pool.pick(avoid=attempt.tried[-1:])
            if endpoint is None:
                return
            self._waiting.popleft()
            attempt.endpoint = endpoint
            self.pool.started(endpoint)
            self._outstanding[attempt.task.task_id] = attempt
            self.requests += 1
            self.workers.send_task(attempt.task.task_id, endpoint, attempt.task.feeds, attempt.task.size)

    def _handle(self, worker, message: tuple) -> None:
        kind = message[0]
        if kind == "done":
            _, task_id, endpoint, outputs, latency = message
            attempt = self._outstanding.pop(task_id, None)
            if attempt is None:
                return  # an answer for an abandoned epoch
            self._check_answer(endpoint, attempt.task, outputs)
            self.pool.succeeded(endpoint, latency, attempt.task.size)
            self._results.append(TaskResult(task_id, outputs))
        elif kind == "fail":
            _, task_id, endpoint, failure, text, _latency = message
            attempt = self._outstanding.pop(task_id, None)
            if attempt is None:
                return  # a request of an abandoned epoch
            if failure == "answer":
                self.pool.released(endpoint)
                raise TeacherAnswerInvalid(endpoint, f"bad answer from teacher {endpoint} for task "
                                                     f"{attempt.task.seq} of this epoch: {text}")
            if failure != "unavailable":
                self.pool.released(endpoint)
                raise DistillReaderError(f"the request of task {attempt.task.seq} to teacher {endpoint} failed "
                                         f"in the worker process: {text}")
            self.pool.failed(endpoint, text)
            self._retry(attempt, endpoint, text)
        elif kind == "probe":
            _, probe_id, endpoint, healthy, text = message
            self._probing.pop(probe_id, None)
            self.pool.probe_result(endpoint, healthy, text)
            if healthy:
                logger.info("teacher %s is healthy again; back in service", endpoint)
        elif kind == "dead":
            _, task_ids, probes = message
            for task_id in task_ids:
                attempt = self._outstanding.pop(task_id, None)
                if attempt is not None:
                    self.pool.released(attempt.endpoint)
                    self._waiting.appendleft(attempt)
            for probe_id, endpoint in probes.items():
                self._probing.pop(probe_id, None)
                self.pool.probe_result(endpoint, False, "probe lost with a dead worker")
        elif kind == "ready":
            pass

    def _retry(self, attempt: _Attempt, endpoint: str, text: str) -> None:
        attempt.failures += 1
        attempt.tried.append(endpoint)
        self.retries += 1
        if attempt.failures > self.options.max_retries:
            raise DistillReaderError(
                f"task {attempt.task.seq} of this epoch failed {attempt.failures} times on teachers "
                f"{sorted(set(attempt.tried))}; last error: {text}")
        delay = backoff_delay(attempt.failures, self.options.retry_backoff, self.options.max_retry_backoff)
        logger.info("request failed on %s (%s); retrying task %d in %.0f ms", endpoint, text, attempt.task.seq,
                    delay * 1000)
        heapq.heappush(self._delayed, (time.monotonic() + delay, attempt.task.task_id, attempt))

    def _check_answer(self, endpoint: str, task: Task, outputs: dict) -> None:
        for name in self.fetch:
            value = outputs.get(name)
            if value is None:
                raise TeacherAnswerInvalid(endpoint, f"teacher {endpoint}: answer lacks fetch {name!r}")
            scalar = np.ndim(value) == 0 if isinstance(value, np.ndarray) else not isinstance(value, list)
            if scalar or len(value) != task.size:   # a list: one array per sample (variable-length fetch)
                raise TeacherAnswerInvalid(endpoint, f"teacher {endpoint}: fetch {name!r} has shape "
                                                     f"{list(np.shape(value))} for a request of {task.size}")

    def _down_deadline(self) -> Optional[float]:
        since = self.pool.down_since()
        return None if since is None else since + self.options.all_teachers_down_timeout

    def _check_down(self) -> None:
        deadline = self._down_deadline()
        if deadline is None or not (self._waiting or self._delayed or self._outstanding):
            return
        if time.monotonic() >= deadline:
            raise AllTeachersDownError(
                f"no teacher was reachable for {self.options.all_teachers_down_timeout:g}s; teachers: "
                f"{self.pool.describe()}; last error: {self.pool.last_error or 'none'}")


# ---------------------------------------------------------------------------------------------------------
# Slots: which parts of a sample are sent, and how predictions are stitched back
# ---------------------------------------------------------------------------------------------------------
class SlotPlan:
    """Which slots of ``ins`` are teacher feeds; checks ``predicts`` against the config's fetch vars."""

    def __init__(self, ins: Sequence[Optional[str]], predicts: Sequence[str], config: ServingConfig):
        self.ins = list(ins)
        self.predicts = list(predicts)
        self.config = config
        names = [n for n in self.ins if n is not None]
        self.feed_slots: list[tuple[int, VarSpec]] = []
        for index, name in enumerate(self.ins):
            if name is not None and name in config.feed_names:
                self.feed_slots.append((index, config.feed(name)))
        missing = [n for n in config.feed_names if n not in names]
        if missing:
            raise ConfigError(f"the teacher's feed(s) {missing} are not among ins={self.ins}; "
                              f"every feed in {config.source or 'the serving config'} must be a slot")
        for name in self.predicts:
            config.fetch(name)
        self.fetch_specs = [config.fetch(n) for n in self.predicts]

    def sample_feeds(self, samples: Sequence[Sequence[Any]], first: int = 0) -> dict[str, np.ndarray]:
        """Feed arrays for a list of samples (each a tuple of slot values; ``first``: epoch index of the first)."""
        feeds = {}
        for index, spec in self.feed_slots:
            try:
                values = [sample[index] for sample in samples]
            except (IndexError, TypeError, KeyError):
                raise DistillReaderError(f"a sample has no slot {index} ({spec.alias_name!r}); ins={self.ins} "
                                         f"needs {len(self.ins)} slots per sample") from None
            self._add_slot(feeds, index, spec, values, first)
        return feeds

    def batch_feeds(self, batch: Sequence[Any], start: int, end: int, first: int = 0) -> dict[str, np.ndarray]:
        """Feed arrays for rows ``start:end`` of a batch (a tuple of slots: arrays, or lists of ragged samples)."""
        feeds = {}
        for index, spec in self.feed_slots:
            self._add_slot(feeds, index, spec, ragged.batch_rows(batch[index], start, end), first)
        return feeds

    @staticmethod
    def _add_slot(feeds: dict, index: int, spec: VarSpec, values: Sequence[Any], first: int) -> None:
        try:   # variable-length feeds travel as rows + "<name>.lod" (distill_reader.ragged)
            arrays = ragged.slot_feeds(index, spec, values, first)
        except ragged.RaggedSlotError as exc:
            raise DistillReaderError(str(exc)) from None
        arrays[spec.alias_name] = prepare_feed(spec, arrays[spec.alias_name], len(values))
        feeds.update(arrays)

    def empty_predictions(self) -> list[Any]:
        return [ragged.empty_prediction(spec) for spec in self.fetch_specs]


# ---------------------------------------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    """One item to yield: a sample, a sample list or a batch; ``parts`` = (task_id, start, count)."""

    item: Any
    parts: list[tuple[int, int, int]]


@dataclass
class EpochStats:
    samples: int = 0
    items: int = 0
    tasks: int = 0
    seconds: float = 0.0
    stage: dict[str, Any] = field(default_factory=dict)
    teachers: dict[str, dict[str, float]] = field(default_factory=dict)   # endpoint -> requests, samples, ...


def _as_slots(item: Any, slots: int, what: str) -> Sequence[Any]:
    if isinstance(item, (tuple, list)):
        if len(item) < slots:
            raise DistillReaderError(f"{what} has {len(item)} slot(s), ins names {slots}")
        return item
    if slots == 1:
        return (item,)
    raise DistillReaderError(f"{what} must be a tuple or list of {slots} slots, not {type(item).__name__}")


def run_epoch(kind: str, source: Iterable[Any], plan: SlotPlan, stage: PredictionStage, teacher_batch_size: int,
              max_pending_tasks: Optional[int] = None, epoch: int = 0,
              on_end: Optional[Callable[[EpochStats], None]] = None,
              is_current: Optional[Callable[[], bool]] = None) -> Iterator[Any]:
    """Yield every item of ``source`` once, in order, with the teachers' predictions appended.

    ``kind`` is ``sample`` (item = one sample: a tuple of slots), ``sample_list`` (item = list of samples) or
    ``batch`` (item = tuple of arrays, one per slot, batch first). ``on_end`` gets the statistics when the
    epoch completes. ``is_current()`` false means a newer epoch took the stage over: this one stops with
    DistillReaderError. An exception raised by ``source`` is re-raised (the same object, with its original
    traceback) after every item read before it has been yielded; errors of the stage or of bad input
    propagate at once.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if teacher_batch_size < 1:
        raise ValueError(f"teacher_batch_size must be >= 1, not {teacher_batch_size}")
    stats = EpochStats()
    started = time.monotonic()
    units: deque[_Unit] = deque()
    results: dict[int, dict[str, np.ndarray]] = {}
    uses: dict[int, int] = {}          # task_id -> units still needing it
    pending_tasks = 0                  # tasks submitted whose units are not all yielded
    open_chunk: list[tuple[_Unit, Any]] = []   # sample kind: samples waiting to fill a task
    seq = itertools.count()
    sample_index = 0
    exhausted = False
    source_error: Optional[BaseException] = None   # the user's generator raised: after the items before it
    iterator = iter(source)
    slots = len(plan.ins)

    def make_task(feeds: dict[str, np.ndarray], size: int) -> Task:
        nonlocal sample_index, pending_tasks
        task = Task(next(_task_ids), next(seq), sample_index, size, feeds)
        sample_index += size
        pending_tasks += 1
        stats.tasks += 1
        return task

    def flush_chunk() -> None:
        if not open_chunk:
            return
        task = make_task(plan.sample_feeds([s for _, s in open_chunk], sample_index), len(open_chunk))
        for offset, (unit, _) in enumerate(open_chunk):
            unit.parts.append((task.task_id, offset, 1))
        uses[task.task_id] = len(open_chunk)
        open_chunk.clear()
        stage.submit(task)

    def read_one() -> bool:
        nonlocal exhausted, source_error
        try:
            item = next(iterator)
        except StopIteration:
            exhausted = True
            flush_chunk()
            return False
        except Exception as exc:  # noqa: BLE001 - re-raised (same object, same traceback) after earlier items
            source_error = exc
            exhausted = True
            flush_chunk()
            return False
        if kind == "sample":
            unit = _Unit(_as_slots(item, slots, "a sample"), [])
            units.append(unit)
            open_chunk.append((unit, unit.item))
            if len(open_chunk) >= teacher_batch_size:
                flush_chunk()
            return True
        if kind == "sample_list":
            samples = [_as_slots(s, slots, "a sample") for s in item]
            unit = _Unit(samples, [])
            units.append(unit)
            for start in range(0, len(samples), teacher_batch_size):
                chunk = samples[start:start + teacher_batch_size]
                task = make_task(plan.sample_feeds(chunk, sample_index), len(chunk))
                unit.parts.append((task.task_id, 0, len(chunk)))
                uses[task.task_id] = 1
                stage.submit(task)
            return True
        batch = _as_slots(item, slots, "a batch")
        sizes = {ragged.slot_len(batch[i]) for i, _ in plan.feed_slots} or {ragged.slot_len(batch[0])}
        if len(sizes) != 1:
            raise DistillReaderError(f"a batch whose feed slots have different lengths {sorted(sizes)}")
        size = sizes.pop()
        unit = _Unit(batch, [])
        units.append(unit)
        for start in range(0, size, teacher_batch_size):
            end = min(size, start + teacher_batch_size)
            task = make_task(plan.batch_feeds(batch, start, end, sample_index), end - start)
            unit.parts.append((task.task_id, 0, end - start))
            uses[task.task_id] = 1
            stage.submit(task)
        return True

    def fill() -> None:
        limit = max_pending_tasks or max(4, 2 * stage.in_flight_limit())
        while not exhausted and stage.capacity() > 0 and pending_tasks < limit:
            read_one()

    def head_ready() -> bool:
        if not units:
            return False
        return all(task_id in results for task_id, _, _ in units[0].parts) and (
            kind != "sample" or units[0].parts)

    def build(unit: _Unit) -> Any:
        nonlocal pending_tasks
        for task_id, _, _ in unit.parts:
            uses[task_id] -= 1
        if kind == "sample":
            task_id, offset, _ = unit.parts[0]
            outputs = results[task_id]
            out = tuple(unit.item) + tuple(outputs[name][offset] for name in plan.predicts)
            stats.samples += 1
        elif kind == "sample_list":
            out = []
            for task_id, _, count in unit.parts:
                outputs = results[task_id]
                start = len(out)
                for k in range(count):
                    out.append(tuple(unit.item[start + k]) + tuple(outputs[name][k] for name in plan.predicts))
            stats.samples += len(out)
        else:
            if unit.parts:
                preds = [ragged.concat_predictions([results[t][name] for t, _, _ in unit.parts])
                         for name in plan.predicts]
            else:
                preds = plan.empty_predictions()
            out = tuple(unit.item) + tuple(preds)
            stats.samples += sum(count for _, _, count in unit.parts)
        for task_id, _, _ in unit.parts:
            if uses[task_id] == 0:
                del uses[task_id]
                del results[task_id]
                pending_tasks -= 1
        stats.items += 1
        return out

    stage.begin_epoch(epoch)
    complete = False
    try:
        while True:
            if is_current is not None and not is_current():
                raise DistillReaderError(f"epoch {epoch} was abandoned: a newer epoch started on this reader")
            for result in stage.poll(0.0):
                results[result.task_id] = result.outputs
            fill()
            if head_ready():
                yield build(units.popleft())
                continue
            if exhausted and not units:
                if source_error is not None:
                    raise source_error
                break
            for result in stage.poll(0.5):
                results[result.task_id] = result.outputs
        complete = True
    finally:
        if is_current is None or is_current():   # an abandoned epoch must not touch its successor's state
            stats.stage = stage.end_epoch(complete)
        stats.seconds = time.monotonic() - started
    if on_end is not None:
        on_end(stats)
