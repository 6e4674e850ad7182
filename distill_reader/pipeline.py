"""The reader's data path: numbered tasks, bounded in-flight work, the reorder buffer and stitching.

One epoch, top to bottom (all in the student process, which owns order and counts)::

    user generator --SlotPlan--> numbered Tasks --PredictionStage--> numbered TaskResults
        --reorder buffer (yield strictly in input order)--> input item + predictions, in the input's kind

- ``SlotPlan`` says which slots of a sample are teacher feeds (sent) and which pass through, and turns slot
  values into feed arrays with ``feeds.prepare_feed`` (cast + reshape to the config's feed shape).
- A ``Task`` (``prediction_stage.py``) is at most ``teacher_batch_size`` samples of one student batch (a task
  never crosses a student batch; samples from a sample generator are grouped). ``seq`` numbers tasks within the
  epoch and ``sample_start`` is the epoch index of its first sample, so a cache stage can key answers by them.
- A ``PredictionStage`` turns submitted tasks into results, in any order, each exactly once. ``RemoteStage``
  (``remote_stage.py``) does it with worker processes and a ``TeacherPool``. A cache stage (offline mode) wraps
  another stage with the same interface.
- ``Epoch`` keeps at most ``max_pending_tasks`` tasks, and ``max_pending_bytes`` of their feeds, read but not yet
  yielded (the reorder buffer's bounds) and yields each input item once, in order, with its predictions appended.

Example (what ``DistillReader`` does)::

    plan = SlotPlan(["img", "label"], ["prediction"], config)
    for sample_list in Epoch("sample_list", gen(), plan, stage, teacher_batch_size=32).run():
        ...
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from distill_base.serving_config import ConfigError, ServingConfig, VarSpec

from . import ragged_slots
from .errors import (
    DistillReaderError,
    ReaderClosedError,
)
from .feeds import feed_nbytes, prepare_feed
from .padding import Padding
from .prediction_stage import PredictionStage, Task, next_task_id
from .snapshot import snapshot

KINDS = ("sample", "sample_list", "batch")
DEFAULT_MAX_PENDING_BYTES = 1 << 30   # feeds of the tasks read but not yet yielded: 1 GiB (the items hold ~as much)


# ---------------------------------------------------------------------------------------------------------
# Slots: which parts of a sample are sent, and how predictions are stitched back
# ---------------------------------------------------------------------------------------------------------
class SlotPlan:
    """Which slots of ``ins`` are teacher feeds; checks ``predicts`` against the config's fetch vars.

    ``padding``: the reader's ``pad_value`` / ``lengths_feeds``, checked against the config here
    (``PaddingOptionError`` naming the option). A lengths feed need not be a slot (each worker's client fills
    it); when it is, each sample's value must be the length of its padded feed (an error names the sample).
    """

    def __init__(self, ins: Sequence[Optional[str]], predicts: Sequence[str], config: ServingConfig,
                 padding: Optional[Padding] = None):
        """Check the arguments.

        Raises:
            ConfigError: a teacher feed is not among ``ins``, or a predict is not a fetch var of the config.
        """
        self.ins = list(ins)
        self.predicts = list(predicts)
        self.config = config
        self.padding = padding or Padding()
        self.padding.check_config(config)
        names = [n for n in self.ins if n is not None]
        self.feed_slots: list[tuple[int, VarSpec]] = []
        for index, name in enumerate(self.ins):
            if name is not None and name in config.feed_names:
                self.feed_slots.append((index, config.feed(name)))
        slot_of = {spec.alias_name: index for index, spec in self.feed_slots}
        filled = {config.feed(length).alias_name: config.feed(feed).alias_name
                  for feed, length in self.padding.lengths_feeds.items()}
        # (padded feed slot, lengths feed slot, names) of lengths given as slots: checked per task
        self.lengths_slots = [(slot_of[feed], slot_of[length], feed, length) for length, feed in filled.items()
                              if feed in slot_of and length in slot_of]
        missing = [n for n in config.feed_names if n not in names and not (n in filled and filled[n] in names)]
        if missing:
            raise ConfigError(f"the teacher's feed(s) {missing} are not among ins={self.ins}; "
                              f"every feed in {config.source or 'the serving config'} must be a slot (a lengths "
                              f"feed may instead be filled through lengths_feeds=)")
        for name in self.predicts:
            config.fetch(name)
        self.fetch_specs = [config.fetch(n) for n in self.predicts]

    def sample_feeds(self, samples: Sequence[Sequence[Any]], first: int = 0) -> dict[str, np.ndarray]:
        """Feed arrays for a list of samples (each a tuple of slot values; ``first``: epoch index of the first).

        Raises:
            DistillReaderError: a sample has fewer slots than ``ins`` names, a ragged slot whose samples do not fit
                the feed, or a lengths slot that is not its padded slot's lengths (names the sample).
            FeedError: a slot value does not fit its feed (dtype, shape).
        """
        feeds = {}
        for index, spec in self.feed_slots:
            try:
                values = [sample[index] for sample in samples]
            except (IndexError, TypeError, KeyError):
                raise DistillReaderError(f"a sample has no slot {index} ({spec.alias_name!r}); ins={self.ins} "
                                         f"needs {len(self.ins)} slots per sample") from None
            self._add_slot(feeds, index, spec, values, first)
        self._check_lengths(feeds, first)
        return feeds

    def batch_feeds(self, batch: Sequence[Any], start: int, end: int, first: int = 0) -> dict[str, np.ndarray]:
        """Feed arrays for rows ``start:end`` of a batch (a tuple of slots: arrays, or lists of ragged samples)."""
        feeds = {}
        for index, spec in self.feed_slots:
            self._add_slot(feeds, index, spec, ragged_slots.batch_rows(batch[index], start, end), first)
        self._check_lengths(feeds, first)
        return feeds

    def _check_lengths(self, feeds: dict, first: int) -> None:
        """Lengths given as slots must be their padded feed's lengths (DistillReaderError naming the sample)."""
        for feed_slot, length_slot, feed, length in self.lengths_slots:
            problem = ragged_slots.lengths_problem(feeds[feed + ragged_slots.LOD_SUFFIX], feeds[length])
            if problem is not None:
                k, got, want = problem
                raise DistillReaderError(
                    f"slot {length_slot} ({length!r}) of sample {first + k} is {got}, but the sample's slot "
                    f"{feed_slot} ({feed!r}) has length {want} (lengths_feeds maps {feed!r} -> {length!r})")

    @staticmethod
    def _add_slot(feeds: dict, index: int, spec: VarSpec, values: Sequence[Any], first: int) -> None:
        try:   # variable-length feeds travel as rows + "<name>.lod" (distill_reader.ragged_slots)
            arrays = ragged_slots.slot_feeds(index, spec, values, first)
        except ragged_slots.RaggedSlotError as exc:
            raise DistillReaderError(str(exc)) from None
        arrays[spec.alias_name] = prepare_feed(spec, arrays[spec.alias_name], len(values))
        feeds.update(arrays)

    def empty_predictions(self) -> list[Any]:
        return [ragged_slots.empty_prediction(spec) for spec in self.fetch_specs]


# ---------------------------------------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------------------------------------
class Gate:
    """Lets ``close()`` from another thread wait until the iterating thread is outside the reader's own code.

    The iterating thread holds the gate while it runs the pipeline (never while the student holds a yielded
    item, nor while the user's generator runs) and checks ``closed`` each time it takes the gate, at least every
    half second: it then raises ReaderClosedError. ``close()`` sets ``closed`` and takes the gate before it frees
    sockets and processes, so nothing is closed under a thread that is using it.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.closed = threading.Event()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self.lock:
            self.check()
            yield

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Run user code (the generator) without the gate; take it back and check ``closed`` afterwards."""
        self.lock.release()
        try:
            yield
        finally:
            self.lock.acquire()
        self.check()

    def check(self) -> None:
        """Return when the reader is open.

        Raises:
            ReaderClosedError: the reader was closed while the epoch ran.
        """
        if self.closed.is_set():
            raise ReaderClosedError("the DistillReader was closed (close() was called) while this epoch ran")


@dataclass
class _Unit:
    """One item to yield: a sample, a sample list or a batch; ``parts`` = (task_id, start, count)."""

    item: Any
    parts: list[tuple[int, int, int]]


@dataclass
class EpochStats:
    """One epoch's figures (``DistillReader.last_epoch_stats``); ``complete`` False for an epoch that ended early
    (an error, ``break``, ``close()``)."""

    epoch: int = 0
    complete: bool = False
    samples: int = 0
    items: int = 0
    tasks: int = 0
    seconds: float = 0.0
    stage: dict[str, Any] = field(default_factory=dict)
    teachers: dict[str, dict[str, float]] = field(default_factory=dict)   # endpoint -> requests, samples, ...


def _as_slots(item: Any, slots: int, what: str) -> Sequence[Any]:
    if isinstance(item, (tuple, list)):
        if len(item) != slots:   # more would move the predictions' place from sample to sample
            raise DistillReaderError(f"{what} has {len(item)} slot(s), ins names {slots}")
        return item
    if slots == 1:
        return (item,)
    raise DistillReaderError(f"{what} must be a tuple or list of {slots} slots, not {type(item).__name__}")


_END = object()


class Epoch:
    """One pass over ``source``: every item once, in order, with the teachers' predictions appended.

    ``kind`` is ``sample`` (item = one sample: a tuple of slots), ``sample_list`` (item = list of samples) or
    ``batch`` (item = tuple of arrays, one per slot, batch first). ``run()`` is the generator. The generator is
    read ahead while fewer than ``max_pending_tasks`` (default: twice the stage's ``in_flight_limit()``) tasks
    are pending and their feeds hold fewer than ``max_pending_bytes`` (default ``DEFAULT_MAX_PENDING_BYTES``);
    one task is always let in. ``on_end`` gets the statistics when the epoch completes. ``abandon()`` (a newer
    epoch started) ends it on the stage at once; resuming it then raises DistillReaderError. An exception raised
    by ``source`` is re-raised (the same object, with its original traceback) after every item read before it
    has been yielded; errors of the stage or of bad input propagate at once.
    """

    def __init__(self, kind: str, source: Iterable[Any], plan: SlotPlan, stage: PredictionStage,
                 teacher_batch_size: int, max_pending_tasks: Optional[int] = None, epoch: int = 0,
                 on_end: Optional[Callable[[EpochStats], None]] = None, gate: Optional[Gate] = None,
                 max_pending_bytes: Optional[int] = None):
        """Check the arguments.

        Raises:
            ValueError: ``kind`` is not one of KINDS, ``teacher_batch_size`` < 1 or ``max_pending_bytes`` < 1.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if teacher_batch_size < 1:
            raise ValueError(f"teacher_batch_size must be >= 1, not {teacher_batch_size}")
        if max_pending_bytes is not None and max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes must be >= 1, not {max_pending_bytes}")
        self.kind, self.plan, self.stage, self.epoch = kind, plan, stage, epoch
        self.teacher_batch_size = teacher_batch_size
        self.max_pending_tasks = max_pending_tasks
        self.max_pending_bytes = DEFAULT_MAX_PENDING_BYTES if max_pending_bytes is None else max_pending_bytes
        self.on_end = on_end
        self.gate = gate or Gate()
        self.stats = EpochStats()
        self.abandoned = False
        self.finished = False
        self._iterator = iter(source)
        self._units: deque[_Unit] = deque()
        self._results: dict[int, dict[str, np.ndarray]] = {}
        self._uses: dict[int, int] = {}             # task_id -> units still needing it
        self._pending_tasks = 0                      # tasks submitted whose units are not all yielded
        self._pending_bytes = 0                      # ... and their feeds' bytes
        self._task_bytes: dict[int, int] = {}        # task_id -> its feeds' bytes, while pending
        self._open_chunk: list[tuple[_Unit, Any]] = []   # sample kind: samples waiting to fill a task
        self._seq = itertools.count()
        self._sample_index = 0
        self._exhausted = False
        self._source_error: Optional[BaseException] = None

    # -- the generator ----------------------------------------------------------------------------------
    def run(self) -> Iterator[Any]:
        started = time.monotonic()
        with self.gate.held():
            self.stage.begin_epoch(self.epoch)
        complete = False
        try:
            while True:
                with self.gate.held():
                    item = self._next_item()
                if item is _END:
                    break
                yield item
            complete = True
        finally:
            self.stats.seconds = time.monotonic() - started
            with self.gate.lock:
                self._finish(complete)
        if self.on_end is not None:
            self.on_end(self.stats)

    def abandon(self) -> None:
        """End this epoch on the stage now (a newer epoch takes the stage over); resuming it raises."""
        with self.gate.lock:
            if not self.finished:
                self.abandoned = True
                self._finish(False)

    def pending(self) -> int:
        """Tasks read from the generator whose items are not all yielded yet."""
        return self._pending_tasks

    def _finish(self, complete: bool) -> None:
        if self.finished or self.gate.closed.is_set():
            self.finished = True
            return
        self.finished = True
        self.stats.stage = self.stage.end_epoch(complete)

    def _next_item(self) -> Any:
        while True:
            self.gate.check()
            if self.abandoned:
                raise DistillReaderError(f"epoch {self.epoch} was abandoned: a newer epoch started on this reader")
            self._collect(0.0)
            self._fill()
            if self._head_ready():
                return self._build(self._units.popleft())
            if self._exhausted and not self._units:
                if self._source_error is not None:
                    raise self._source_error
                return _END
            self._collect(0.5)

    # -- reading the generator into tasks -----------------------------------------------------------------
    def _fill(self) -> None:
        limit = self.max_pending_tasks or max(4, 2 * self.stage.in_flight_limit())
        while (not self._exhausted and self.stage.capacity() > 0 and self._pending_tasks < limit
               and self._pending_bytes < self.max_pending_bytes):
            self._read_one()

    def _read_one(self) -> None:
        try:
            with self.gate.released():
                item = next(self._iterator)
        except StopIteration:
            self._exhausted = True
            self._flush_chunk()
            return
        except ReaderClosedError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised (same object, same traceback) after earlier items
            self._source_error = exc
            self._exhausted = True
            self._flush_chunk()
            return
        {"sample": self._add_sample, "sample_list": self._add_sample_list, "batch": self._add_batch}[self.kind](item)

    # Every slot is copied as it is read (``snapshot``): the generator may reuse its buffers at its next step,
    # while this sample is still waiting to be sent, in flight, or in the reorder buffer.
    def _add_sample(self, item: Any) -> None:
        unit = _Unit(snapshot(_as_slots(item, len(self.plan.ins), "a sample")), [])
        self._units.append(unit)
        self._open_chunk.append((unit, unit.item))
        if len(self._open_chunk) >= self.teacher_batch_size:
            self._flush_chunk()

    def _add_sample_list(self, item: Any) -> None:
        samples = [snapshot(_as_slots(s, len(self.plan.ins), "a sample")) for s in item]
        unit = _Unit(samples, [])
        self._units.append(unit)
        for start in range(0, len(samples), self.teacher_batch_size):
            chunk = samples[start:start + self.teacher_batch_size]
            self._submit(unit, self.plan.sample_feeds(chunk, self._sample_index), len(chunk), uses=1)

    def _add_batch(self, item: Any) -> None:
        batch = snapshot(_as_slots(item, len(self.plan.ins), "a batch"))
        size = self._batch_size(batch)
        unit = _Unit(batch, [])
        self._units.append(unit)
        for start in range(0, size, self.teacher_batch_size):
            end = min(size, start + self.teacher_batch_size)
            self._submit(unit, self.plan.batch_feeds(batch, start, end, self._sample_index), end - start, uses=1)

    def _batch_size(self, batch: Sequence[Any]) -> int:
        """The rows of a batch; every slot that has rows must have as many (else labels and predictions part)."""
        lengths = {index: ragged_slots.slot_len(value) for index, value in enumerate(batch)
                   if isinstance(value, (list, tuple)) or (value is not None and np.ndim(value) > 0)}
        if len(set(lengths.values())) > 1:
            first = next(iter(lengths))
            other = next(i for i, n in lengths.items() if n != lengths[first])
            raise DistillReaderError(
                f"batch {len(self._units) + self.stats.items} of this epoch: slot {other} "
                f"({self.plan.ins[other]!r}) has {lengths[other]} rows, slot {first} ({self.plan.ins[first]!r}) "
                f"has {lengths[first]}")
        return next(iter(lengths.values()), 0)

    def _flush_chunk(self) -> None:
        if not self._open_chunk:
            return
        chunk, self._open_chunk = self._open_chunk, []
        task = self._new_task(self.plan.sample_feeds([s for _, s in chunk], self._sample_index), len(chunk))
        for offset, (unit, _) in enumerate(chunk):
            unit.parts.append((task.task_id, offset, 1))
        self._uses[task.task_id] = len(chunk)
        self.stage.submit(task)

    def _submit(self, unit: _Unit, feeds: dict[str, np.ndarray], size: int, uses: int) -> None:
        task = self._new_task(feeds, size)
        unit.parts.append((task.task_id, 0, size))
        self._uses[task.task_id] = uses
        self.stage.submit(task)

    def _new_task(self, feeds: dict[str, np.ndarray], size: int) -> Task:
        task = Task(next_task_id(), next(self._seq), self._sample_index, size, feeds)
        self._sample_index += size
        self._pending_tasks += 1
        self._task_bytes[task.task_id] = nbytes = feed_nbytes(feeds)
        self._pending_bytes += nbytes
        self.stats.tasks += 1
        return task

    # -- results back into items, in order ----------------------------------------------------------------
    def _collect(self, timeout: float) -> None:
        for result in self.stage.poll(timeout):
            self._results[result.task_id] = result.outputs

    def _head_ready(self) -> bool:
        if not self._units:
            return False
        head = self._units[0]
        return all(task_id in self._results for task_id, _, _ in head.parts) and (
            self.kind != "sample" or bool(head.parts))

    def _build(self, unit: _Unit) -> Any:
        predicts = self.plan.predicts
        if self.kind == "sample":
            task_id, offset, _ = unit.parts[0]
            out: Any = tuple(unit.item) + tuple(self._results[task_id][name][offset] for name in predicts)
            self.stats.samples += 1
        elif self.kind == "sample_list":
            out = []
            for task_id, _, count in unit.parts:
                outputs, start = self._results[task_id], len(out)
                out.extend(tuple(unit.item[start + k]) + tuple(outputs[name][k] for name in predicts)
                           for k in range(count))
            self.stats.samples += len(out)
        else:
            out = tuple(unit.item) + tuple(self._stacked(unit))
            self.stats.samples += sum(count for _, _, count in unit.parts)
        self._release(unit)
        self.stats.items += 1
        return out

    def _stacked(self, unit: _Unit) -> list[Any]:
        if not unit.parts:
            return self.plan.empty_predictions()
        return [ragged_slots.concat_predictions([self._results[t][name] for t, _, _ in unit.parts])   # lists: ragged
                for name in self.plan.predicts]

    def _release(self, unit: _Unit) -> None:
        for task_id, _, _ in unit.parts:
            self._uses[task_id] -= 1
            if self._uses[task_id] == 0:
                del self._uses[task_id]
                del self._results[task_id]
                self._pending_tasks -= 1
                self._pending_bytes -= self._task_bytes.pop(task_id, 0)

