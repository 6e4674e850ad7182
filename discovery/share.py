"""Fair sharing of teachers among students: a pure, deterministic function every student computes alike.

Stateless: it sees only the membership, so when every teacher is needed a change moves several students (below).
Students now follow the incremental ``discovery.rebalance.rebalance`` that the elected assigner keeps in
ZooKeeper (``discovery.assigner``); this function gives its first assignment and the students' fallback when no
assignment arrives (``discovery.student``).

Rules (for S students, T teachers, each student ``s`` asking for at most ``m_s`` teachers):
- student ``s`` gets ``min(m_s, T)`` distinct teachers (never more than it asked for, never none while T > 0);
- the number of students per teacher differs by at most one across all teachers (idle teachers count as 0);
- the result depends only on the arguments, so every student, computing it from the same ZooKeeper view,
  arrives at the same assignment without talking to the others;
- a student leaving never changes the teachers of the students that joined before it, and a student joining
  changes nobody's teachers (it comes last in join order).

How (serial dictatorship over load levels, Abdulkadiroglu & Sonmez 1998, with rendezvous-hash preferences,
Thaler & Ravishankar 1996): students pick in the order given (the caller passes join order, oldest first); each
takes, among the teachers that currently serve the fewest students, the ones it prefers most, where student ``s``
prefers teacher ``t`` by a 64-bit hash of the pair. Taking only least-loaded teachers keeps every load within one
of the others after each pick.

Cost: one 64-bit key per teacher and per student (BLAKE2b), then per student one vectorized hash and partial
sort over the teachers at the lowest load level: O(T) per student in NumPy, about 25 ms of CPU for 1,000 students
and 4,000 teachers (benchmarks/bench_share.py). Churn: a change moves only students after the changed one in join
order, along a chain of displaced picks (each hop lands on a random later student: about ln(S) hops when every
teacher is needed, under 2 moves per change when teachers are spare); benchmarks/README.md "Fair share".

Example::

    >>> share = fair_share(["s1", "s2", "s3"], ["t1", "t2", "t3", "t4", "t5", "t6"], require_max=2)
    >>> sorted(len(teachers) for teachers in share.values())
    [2, 2, 2]
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)


def fair_share(students: Sequence[str], teachers: Sequence[str],
               require_max: Union[int, Mapping[str, int]]) -> dict[str, list[str]]:
    """Assign teachers to students; returns ``{student: [teacher, ...]}`` with every student as a key.

    Args:
        students: student ids in priority (join) order; duplicates are an error.
        teachers: teacher ids (endpoints) in any order; duplicates count once.
        require_max: the most teachers one student uses, the same for all or a mapping per student
            (students missing from the mapping use 1).

    Returns:
        Each student's teachers, most preferred first.

    Raises:
        ValueError: duplicate student ids, or a ``require_max`` that is not an integer >= 1 (naming the student).
    """
    wanted, ring = checked_membership(students, teachers, require_max)
    if not ring:
        return {student: [] for student in students}
    teacher_keys = np.array([_key(teacher) for teacher in ring], dtype=np.uint64)
    levels = _Levels(teacher_keys)
    assignment: dict[str, list[str]] = {}
    for student, count in zip(students, wanted):
        chosen = levels.pick(_key(student), min(count, len(ring)))
        assignment[student] = [ring[index] for index in chosen]
    return assignment


class _Levels:
    """The teachers at the lowest load level (indices and keys, in name order); students pick among them."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        self._reset(exclude=())

    def pick(self, student_key: int, count: int) -> list[int]:
        """The ``count`` teachers this student prefers among the least loaded (then the next level)."""
        chosen = self._take(student_key, count)
        if len(chosen) < count:              # the level is used up: every teacher is one level higher now,
            self._reset(exclude=chosen)      # and this student may not take one of its teachers twice
            more = self._take(student_key, count - len(chosen))
            self._reset(exclude=more)        # the lowest level is everyone but the ones just taken
            chosen += more
        elif len(self.index) == 0:
            self._reset(exclude=())
        return chosen

    def _reset(self, exclude: Sequence[int]) -> None:
        keep = np.ones(len(self.keys), dtype=bool)
        keep[list(exclude)] = False
        self.index = np.flatnonzero(keep)
        self.level_keys = self.keys[self.index]

    def _take(self, student_key: int, count: int) -> list[int]:
        """Remove and return up to ``count`` teachers of this level by the student's preference, best first."""
        size = len(self.index)
        if size == 0 or count <= 0:
            return []
        scores = _mix(self.level_keys ^ np.uint64(student_key))
        top = np.argpartition(scores, count - 1)[:count] if size > count else np.arange(size)
        top = top[np.lexsort((top, scores[top]))]      # by score, ties by teacher name order
        chosen = [int(i) for i in self.index[top]]
        keep = np.ones(size, dtype=bool)
        keep[top] = False
        self.index, self.level_keys = self.index[keep], self.level_keys[keep]
        return chosen


def teacher_loads(assignment: Mapping[str, Sequence[str]], teachers: Sequence[str] = ()) -> dict[str, int]:
    """Students per teacher in ``assignment``; teachers listed in ``teachers`` but unused count 0."""
    loads = {teacher: 0 for teacher in teachers}
    for chosen in assignment.values():
        for teacher in chosen:
            loads[teacher] = loads.get(teacher, 0) + 1
    return loads


def moved_assignments(before: Mapping[str, Sequence[str]], after: Mapping[str, Sequence[str]]) -> int:
    """How many (student, teacher) pairs of students present in both assignments were taken away."""
    return sum(len(set(chosen) - set(after[student])) for student, chosen in before.items() if student in after)


def checked_membership(students: Sequence[str], teachers: Sequence[str],
                       require_max: Union[int, Mapping[str, int]]) -> tuple[list[int], list[str]]:
    """(teachers wanted per student, the distinct teachers in name order); ValueError for duplicate student ids or
    a bad ``require_max``. Shared by ``fair_share`` and ``discovery.rebalance.rebalance``.

    Raises:
        ValueError: duplicate student ids, or a ``require_max`` that is not an integer >= 1.
    """
    if len(set(students)) != len(students):
        raise ValueError(f"duplicate student ids in {list(students)}")
    return [_wanted(require_max, student) for student in students], sorted(set(teachers))


def _wanted(require_max: Union[int, Mapping[str, int]], student: str) -> int:
    wanted = require_max.get(student, 1) if isinstance(require_max, Mapping) else require_max
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise ValueError(f"require_max for student {student!r} must be an integer >= 1, not {wanted!r}")
    return wanted


def _key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def _mix(values: np.ndarray) -> np.ndarray:
    """A multiply-xorshift 64-bit mixer (the first rounds of SplitMix64's finalizer, Steele, Lea & Flood 2014),
    vectorized: spreads the XOR of two BLAKE2b keys into a pair score. Wraps modulo 2**64 by design."""
    values = values * _MIX1
    return values ^ (values >> np.uint64(29))
