"""Tasks, task results and the stage interface: the currency between the pipeline and its prediction stages.

Example (a stage that answers every task with zeros)::

    class Zeros(PredictionStage):
        def __init__(self): self.ready = []
        def submit(self, task): self.ready.append(TaskResult(task.task_id, {"p": np.zeros((task.size, 10))}))
        def capacity(self): return 4
        def in_flight_limit(self): return 4
        def poll(self, timeout): ready, self.ready = self.ready, []; return ready
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

_task_ids = itertools.count(1)


def next_task_id() -> int:
    """A task id unique in this process, so answers of an abandoned epoch never match a new task."""
    return next(_task_ids)


@dataclass
class Task:
    """At most ``teacher_batch_size`` samples of one student batch, as prepared feed arrays.

    ``task_id`` is unique in the process (results of an abandoned epoch never match a new task);
    ``seq`` numbers tasks within the epoch from 0; ``sample_start`` is the epoch index of the first sample.
    ``feeds`` maps feed alias -> array with ``size`` rows.
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
    """Turns submitted tasks into results (in any order), each task exactly once. The seam of the cache stage.

    The pipeline calls ``begin_epoch()``, then ``submit(task)`` while ``capacity() > 0``, and ``poll(timeout)``
    to collect results (``poll`` raises DistillReaderError when the stage cannot go on), then
    ``end_epoch(complete)`` (also for an epoch that was abandoned or failed: ``complete=False``).
    ``in_flight_limit()`` sizes the reorder buffer. ``close()`` frees resources.
    """

    def begin_epoch(self, epoch: int) -> None:
        pass

    def submit(self, task: Task) -> None:
        """Take ``task``; its result comes back from a later ``poll``.

        Raises:
            NotImplementedError: a stage must implement it.
        """
        raise NotImplementedError

    def capacity(self) -> int:
        """How many more tasks ``submit`` takes now.

        Raises:
            NotImplementedError: a stage must implement it.
        """
        raise NotImplementedError

    def in_flight_limit(self) -> int:
        """The most tasks this stage holds at once (sizes the reorder buffer).

        Raises:
            NotImplementedError: a stage must implement it.
        """
        raise NotImplementedError

    def poll(self, timeout: float) -> list[TaskResult]:
        """The results ready within ``timeout`` seconds (possibly none), each task's once.

        Raises:
            NotImplementedError: a stage must implement it.
        """
        raise NotImplementedError

    def end_epoch(self, complete: bool) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass
