"""Fair sharing of teachers among students: a pure, deterministic function every student computes alike.

Rules (for S students, T teachers, each student ``s`` asking for at most ``m_s`` teachers):
- student ``s`` gets ``min(m_s, T)`` distinct teachers (never more than it asked for, never none while T > 0);
- the number of students per teacher differs by at most one across all teachers (idle teachers count as 0);
- the result depends only on the arguments, so every student, computing it from the same ZooKeeper view,
  arrives at the same assignment without talking to the others.

How: students pick in the order given (the caller passes join order, oldest first); each takes the teachers
that currently serve the fewest students, breaking ties by its own rendezvous-hash preference of
``sha1(student + teacher)``. Taking the least-loaded teachers keeps every load within one of the others after
each pick, and the hash spreads students over teachers so that one joining or leaving moves few of them.
The oldest student's teachers depend only on the teacher set; a student leaving never changes the teachers of
the students that joined before it.

Example::

    >>> fair_share(["s1", "s2", "s3"], ["t1", "t2", "t3", "t4", "t5", "t6"], require_max=2)["s1"]
    ['t4', 't3']
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Union


def fair_share(students: Sequence[str], teachers: Sequence[str],
               require_max: Union[int, Mapping[str, int]]) -> dict[str, list[str]]:
    """Assign teachers to students; returns ``{student: [teacher, ...]}`` with every student as a key.

    Args:
        students: student ids in priority (join) order; duplicates are an error.
        teachers: teacher ids (endpoints) in any order; duplicates count once.
        require_max: the most teachers one student uses, the same for all or a mapping per student
            (students missing from the mapping use 1).
    """
    if len(set(students)) != len(students):
        raise ValueError(f"duplicate student ids in {list(students)}")
    unique_teachers = sorted(set(teachers))
    load = {teacher: 0 for teacher in unique_teachers}
    assignment: dict[str, list[str]] = {}
    for student in students:
        wanted = _wanted(require_max, student)
        count = min(wanted, len(unique_teachers))
        order = sorted(unique_teachers, key=lambda teacher: (load[teacher], _preference(student, teacher)))
        chosen = order[:count]
        for teacher in chosen:
            load[teacher] += 1
        assignment[student] = chosen
    return assignment


def teacher_loads(assignment: Mapping[str, Sequence[str]], teachers: Sequence[str] = ()) -> dict[str, int]:
    """Students per teacher in ``assignment``; teachers listed in ``teachers`` but unused count 0."""
    loads = {teacher: 0 for teacher in teachers}
    for chosen in assignment.values():
        for teacher in chosen:
            loads[teacher] = loads.get(teacher, 0) + 1
    return loads


def _wanted(require_max: Union[int, Mapping[str, int]], student: str) -> int:
    wanted = require_max.get(student, 1) if isinstance(require_max, Mapping) else require_max
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise ValueError(f"require_max for student {student!r} must be an integer >= 1, not {wanted!r}")
    return wanted


def _preference(student: str, teacher: str) -> bytes:
    return hashlib.sha1(f"{student}\0{teacher}".encode()).digest()
