"""Fair share at cluster scale: time of one ``discovery.share.fair_share`` and assignments moved per change.

Every student recomputes the whole assignment on each change of the ZooKeeper view, so what matters is the time of
one computation (it delays the student's reaction) and how many (student, teacher) pairs a single change moves
(each move costs the student a new channel and a cold teacher). Measured per size (students x teachers, every
student asking for ``--require_max`` teachers):

- time: median over ``--repeat`` computations of the new NumPy version, and of the previous pure-Python version
  (sorting all teachers per student) up to ``--baseline_max`` students, side by side in the same run;
- moves per change: over ``--changes`` random changes of each kind (a teacher joins, a teacher leaves, a student
  joins last, a student leaves), the (student, teacher) pairs of students present before and after that changed,
  mean and max.

Example::

    python benchmarks/bench_share.py                     # about 1-2 minutes
    python benchmarks/bench_share.py --sizes 100x400 --changes 50
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time
from typing import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from discovery.share import fair_share, moved_assignments  # noqa: E402


def previous_fair_share(students: Sequence[str], teachers: Sequence[str], require_max: int) -> dict:
    """The version before this benchmark (kept here only to compare): sorts every teacher per student."""
    unique = sorted(set(teachers))
    load = {teacher: 0 for teacher in unique}
    assignment = {}
    for student in students:
        order = sorted(unique, key=lambda t: (load[t], hashlib.sha1(f"{student}\0{t}".encode()).digest()))
        chosen = order[:min(require_max, len(unique))]
        for teacher in chosen:
            load[teacher] += 1
        assignment[student] = chosen
    return assignment


def view(n_students: int, n_teachers: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Student node names in join order and teacher endpoints, as ZooKeeper would give them."""
    first = rng.randrange(10**6)
    students = [f"student-{first + i:010d}" for i in range(n_students)]
    teachers = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}:{rng.randrange(9000, 9999)}"
                for _ in range(n_teachers)]
    return students, list(dict.fromkeys(teachers))


def timed(function: Callable, repeat: int, *args) -> tuple[float, float]:
    """Median wall-clock and median CPU seconds (this process) of one call; CPU time is what a shared machine's
    load does not inflate."""
    wall, cpu = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        function(*args)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def churn(students: list[str], teachers: list[str], m: int, changes: int, rng: random.Random) -> dict[str, list[int]]:
    before = fair_share(students, teachers, m)
    moves: dict[str, list[int]] = {"teacher joins": [], "teacher leaves": [], "student joins": [],
                                   "student leaves": []}
    last = int(students[-1][-10:]) if students else 0
    for change in range(changes):
        gone = rng.randrange(len(teachers))
        new_teacher = f"10.254.{change % 256}.{rng.randrange(1, 255)}:{rng.randrange(9000, 9999)}"
        cases = {"teacher joins": (students, teachers + [new_teacher]),
                 "teacher leaves": (students, teachers[:gone] + teachers[gone + 1:]),
                 "student joins": (students + [f"student-{last + 1 + change:010d}"], teachers)}
        leaving = rng.randrange(len(students))
        cases["student leaves"] = (students[:leaving] + students[leaving + 1:], teachers)
        for kind, (s, t) in cases.items():
            moves[kind].append(moved_assignments(before, fair_share(s, t, m)))
    return moves


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10x40,30x120,100x400,300x1200,1000x4000",
                        help="comma separated STUDENTSxTEACHERS (default 10x40 ... 1000x4000)")
    parser.add_argument("--require_max", type=int, default=4, help="teachers per student (default 4)")
    parser.add_argument("--repeat", type=int, default=7, help="computations timed per size (median; default 7)")
    parser.add_argument("--changes", type=int, default=40, help="random changes of each kind per size (default 40)")
    parser.add_argument("--baseline_max", type=int, default=300,
                        help="time the previous version only up to this many students (it takes ~9 s at 1,000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the views and changes")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    print("| students x teachers | fair_share wall (CPU) | previous version wall (CPU) | moves per change, mean (max): "
          "teacher joins | teacher leaves | student joins | student leaves |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n_students, n_teachers = (int(x) for x in size.lower().split("x"))
        students, teachers = view(n_students, n_teachers, rng)
        now = "{:.1f} ms ({:.1f} ms)".format(*(x * 1e3 for x in timed(fair_share, args.repeat, students, teachers,
                                                                         args.require_max)))
        before = ("{:.1f} ms ({:.1f} ms)".format(*(x * 1e3 for x in timed(previous_fair_share, 1, students, teachers,
                                                                          args.require_max)))
                  if n_students <= args.baseline_max else "not run")
        moves = churn(students, teachers, args.require_max, args.changes, rng)
        cells = " | ".join(f"{statistics.mean(v):.2f} ({max(v)})" for v in moves.values())
        print(f"| {n_students} x {n_teachers} | {now} | {before} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
