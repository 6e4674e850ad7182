"""Incremental fair share: the next assignment from the previous one, moving as few (student, teacher) pairs as
the fair-share rules allow.

``discovery.share.fair_share`` is a function of the membership alone; when every teacher is needed it moves 7-20
pairs per change at 1,000 students x 4,000 teachers (benchmarks/README.md "Fair share"), because the only slack
that keeps loads within one lies at the end of the join order. ``rebalance`` remembers: it starts from the
previous assignment (kept in ZooKeeper by the assigner, ``discovery.assigner``) and repairs it.

Rules of the result (the same as ``fair_share``; ``D`` = total demand, ``T`` teachers):
- student ``s`` gets ``min(m_s, T)`` distinct teachers;
- every teacher serves ``floor(D/T)`` or ``ceil(D/T)`` students (loads within one, idle teachers count 0);
- the result depends only on the arguments (deterministic; the order of ``teachers`` and duplicates in it do not
  matter).

Steps:
1. keep every pair of the previous assignment whose student and teacher are still there (departed students and
   teachers drop out); a student holding more than it wants now gives up the pairs on its most loaded teachers;
2. fill each student's deficit, in join order, from the least loaded teachers it does not hold yet, the student's
   rendezvous-hash preference (the pair hash of ``fair_share``) breaking ties among equally loaded ones;
3. while the most loaded teacher ``a`` serves two or more students more than the least loaded ``b``, move one
   student from ``a`` to ``b`` (the youngest in join order that does not hold ``b``). Such a student always
   exists: ``a`` serves at least two students more than ``b``, so at least two of its students are not among
   ``b``'s. Each move lowers the sum of squared loads, so the loop ends, and it ends with loads within one.
   The greedy never corners itself on distinctness (step 2 only needs ``min(m_s, T)`` teachers to exist), so no
   fallback is needed; with no usable previous pair at all the answer is ``fair_share``'s.

Moves per change (pairs taken from a student present before and after; benchmarks/bench_share.py): a student
joining or leaving moves none unless the loads left the window (then one per teacher outside it); a teacher
leaving moves exactly the pairs it held (``D/T`` of them, 1 at 1,000 x 4,000 with 4 each) plus, rarely, one to
rebalance; a teacher joining moves ``floor(D/(T+1))`` pairs onto it (0 when teachers are spare, 1 when each serves
one or two students). That is the least any assignment keeping the rules can move.

Cost: one BLAKE2b key per teacher and per student with a deficit, one NumPy pass over the teachers per student
with a deficit and per balancing move, plus a pass over the previous pairs: a few ms at 1,000 x 4,000.

Example::

    >>> before = rebalance({}, ["s1", "s2"], ["t1", "t2", "t3", "t4"], require_max=2)
    >>> after = rebalance(before, ["s1", "s2"], ["t1", "t2", "t3", "t4", "t5"], require_max=2)
    >>> sum(len(set(before[s]) - set(after[s])) for s in before)   # a spare teacher joining moves nobody
    0
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

from .share import _key, _mix, checked_membership, fair_share

_HELD = np.uint64(np.iinfo(np.uint64).max)


def rebalance(previous: Mapping[str, Sequence[str]], students: Sequence[str], teachers: Sequence[str],
              require_max: Union[int, Mapping[str, int]]) -> dict[str, list[str]]:
    """The assignment for ``students`` x ``teachers`` closest to ``previous``; ``{student: [teacher, ...]}``.

    Args:
        previous: the last assignment (student -> teachers); students and teachers no longer present are
            ignored, so any mapping is acceptable (stale, partial, or read back from untrusted storage).
        students: student ids in join order (the order breaks ties only); duplicates are an error.
        teachers: teacher ids in any order; duplicates count once.
        require_max: the most teachers one student uses, the same for all or a mapping per student
            (students missing from the mapping use 1).

    Returns:
        Every student as a key, in the order given; each student's kept teachers first (in their previous order),
        then the new ones.

    Raises:
        ValueError: duplicate student ids, or a ``require_max`` that is not an integer >= 1 (naming the student).
    """
    wanted, ring = checked_membership(students, teachers, require_max)
    if not ring:
        return {student: [] for student in students}
    position = {teacher: index for index, teacher in enumerate(ring)}
    held = [_kept(previous.get(student, ()), position) for student in students]
    if not any(held):
        return fair_share(students, ring, require_max)
    state = _State(len(ring), held)
    for student, count in enumerate(wanted):
        state.trim(student, min(count, len(ring)))
    keys = np.array([_key(teacher) for teacher in ring], dtype=np.uint64)
    for student, count in enumerate(wanted):
        missing = min(count, len(ring)) - len(state.held[student])
        if missing > 0:
            state.fill(student, missing, _mix(keys ^ np.uint64(_key(students[student]))))
    state.balance()
    return {student: [ring[index] for index in state.held[number]] for number, student in enumerate(students)}


def _kept(previous: Sequence[str], position: Mapping[str, int]) -> list[int]:
    """Indices of the previous teachers still present, without repeats, in their previous order."""
    kept: dict[int, None] = {}
    for teacher in previous if isinstance(previous, (list, tuple)) else ():
        index = position.get(teacher) if isinstance(teacher, str) else None
        if index is not None:
            kept.setdefault(index, None)
    return list(kept)


class _State:
    """Pairs as both directions (student -> teacher indices, teacher -> student numbers) and teacher loads."""

    def __init__(self, n_teachers: int, held: list[list[int]]):
        self.held = held
        self.holders: list[set[int]] = [set() for _ in range(n_teachers)]
        for student, chosen in enumerate(held):
            for teacher in chosen:
                self.holders[teacher].add(student)
        self.loads = np.array([len(h) for h in self.holders], dtype=np.int64)

    def trim(self, student: int, count: int) -> None:
        """Drop the student's pairs beyond ``count``, on its most loaded teachers first (ties: the newest)."""
        chosen = self.held[student]
        if len(chosen) <= count:
            return
        drop = sorted(range(len(chosen)), key=lambda i: (-self.loads[chosen[i]], -i))[:len(chosen) - count]
        for teacher in [chosen[i] for i in drop]:
            self._remove(student, teacher)

    def fill(self, student: int, count: int, scores: np.ndarray) -> None:
        """Give the student ``count`` more teachers: the least loaded it does not hold, by its preference."""
        composite = (self.loads.astype(np.uint64) << np.uint64(40)) | (scores >> np.uint64(24))
        composite[self.held[student]] = _HELD
        size = len(composite)
        top = np.argpartition(composite, count - 1)[:count] if size > count else np.arange(size)
        top = top[np.lexsort((top, composite[top]))]
        for teacher in top[:count]:
            self._add(student, int(teacher))

    def balance(self) -> None:
        """Move one student at a time from the most to the least loaded teacher until loads are within one."""
        while True:
            most, least = int(np.argmax(self.loads)), int(np.argmin(self.loads))
            if self.loads[most] - self.loads[least] <= 1:
                return
            student = max(self.holders[most] - self.holders[least])   # exists: see the module docstring
            self._remove(student, most)
            self._add(student, least)

    def _add(self, student: int, teacher: int) -> None:
        self.held[student].append(teacher)
        self.holders[teacher].add(student)
        self.loads[teacher] += 1

    def _remove(self, student: int, teacher: int) -> None:
        self.held[student].remove(teacher)
        self.holders[teacher].discard(student)
        self.loads[teacher] -= 1
