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

A second table does the same for the incremental ``discovery.rebalance.rebalance`` (what the assigner computes
from the assignment stored in ZooKeeper): its median time per change, the moves of one change from the balanced
state (``rebalance({}, ...)``, comparable to the first table), and the moves along a random sequence of
``--sequence`` changes, each applied to the previous result (the long-run cost; the membership drifts), next to the
stateless ``fair_share`` along the same sequence.

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

from discovery.rebalance import rebalance  # noqa: E402
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


KINDS = ("teacher joins", "teacher leaves", "student joins", "student leaves")


def churn(students: list[str], teachers: list[str], m: int, changes: int, rng: random.Random,
          incremental: bool = False) -> dict[str, list[int]]:
    """Moves of single changes from one state: fair_share's, or rebalance's from its balanced state."""
    before = rebalance({}, students, teachers, m) if incremental else fair_share(students, teachers, m)
    moves: dict[str, list[int]] = {kind: [] for kind in KINDS}
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
            after = rebalance(before, s, t, m) if incremental else fair_share(s, t, m)
            moves[kind].append(moved_assignments(before, after))
    return moves


def sequence(students: list[str], teachers: list[str], m: int, steps: int,
             rng: random.Random) -> tuple[dict[str, list[int]], dict[str, list[int]], list[float]]:
    """Moves along ``steps`` random changes, each applied to the last result: (rebalance's, fair_share's, times of
    rebalance in seconds)."""
    incremental = {kind: [] for kind in KINDS}
    stateless = {kind: [] for kind in KINDS}
    times: list[float] = []
    current, stateless_current = rebalance({}, students, teachers, m), fair_share(students, teachers, m)
    serial = int(students[-1][-10:]) + 1 if students else 0
    for step in range(steps):
        kind = rng.choice(KINDS)
        if kind == "teacher joins" or len(teachers) < 2:
            kind, teachers = "teacher joins", teachers + [f"10.253.{step % 256}.{rng.randrange(1, 255)}:{step}"]
        elif kind == "teacher leaves":
            gone = rng.randrange(len(teachers))
            teachers = teachers[:gone] + teachers[gone + 1:]
        elif kind == "student joins" or len(students) < 2:
            kind, students, serial = "student joins", students + [f"student-{serial:010d}"], serial + 1
        else:
            gone = rng.randrange(len(students))
            students = students[:gone] + students[gone + 1:]
        started = time.perf_counter()
        after = rebalance(current, students, teachers, m)
        times.append(time.perf_counter() - started)
        stateless_after = fair_share(students, teachers, m)
        incremental[kind].append(moved_assignments(current, after))
        stateless[kind].append(moved_assignments(stateless_current, stateless_after))
        current, stateless_current = after, stateless_after
    return incremental, stateless, times


def cells(moves: dict[str, list[int]]) -> str:
    return " | ".join(f"{statistics.mean(v):.2f} ({max(v)})" if v else "-" for v in moves.values())


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10x40,30x120,100x400,300x1200,1000x4000",
                        help="comma separated STUDENTSxTEACHERS (default 10x40 ... 1000x4000)")
    parser.add_argument("--require_max", type=int, default=4, help="teachers per student (default 4)")
    parser.add_argument("--repeat", type=int, default=7, help="computations timed per size (median; default 7)")
    parser.add_argument("--changes", type=int, default=40, help="random changes of each kind per size (default 40)")
    parser.add_argument("--baseline_max", type=int, default=300,
                        help="time the previous version only up to this many students (it takes ~9 s at 1,000)")
    parser.add_argument("--sequence", type=int, default=200,
                        help="random changes in the sequence of the incremental table (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the views and changes")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    sizes = [tuple(int(x) for x in size.lower().split("x")) for size in args.sizes.split(",")]
    print("| students x teachers | fair_share wall (CPU) | previous version wall (CPU) | moves per change, mean (max): "
          "teacher joins | teacher leaves | student joins | student leaves |")
    print("|---|---|---|---|---|---|---|")
    for n_students, n_teachers in sizes:
        students, teachers = view(n_students, n_teachers, rng)
        now = "{:.1f} ms ({:.1f} ms)".format(*(x * 1e3 for x in timed(fair_share, args.repeat, students, teachers,
                                                                         args.require_max)))
        before = ("{:.1f} ms ({:.1f} ms)".format(*(x * 1e3 for x in timed(previous_fair_share, 1, students, teachers,
                                                                          args.require_max)))
                  if n_students <= args.baseline_max else "not run")
        moves = churn(students, teachers, args.require_max, args.changes, rng)
        print(f"| {n_students} x {n_teachers} | {now} | {before} | {cells(moves)} |", flush=True)
    print()
    print("| students x teachers | what | rebalance wall per change, median (max) | moves per change, mean (max): "
          "teacher joins | teacher leaves | student joins | student leaves |")
    print("|---|---|---|---|---|---|---|")
    for n_students, n_teachers in sizes:
        students, teachers = view(n_students, n_teachers, rng)
        single = churn(students, teachers, args.require_max, args.changes, rng, incremental=True)
        incremental, stateless, times = sequence(students, teachers, args.require_max, args.sequence, rng)
        spent = f"{statistics.median(times) * 1e3:.1f} ms ({max(times) * 1e3:.1f} ms)"
        size = f"{n_students} x {n_teachers}"
        print(f"| {size} | rebalance, one change from the balanced state | {spent} | {cells(single)} |")
        print(f"| {size} | rebalance, {args.sequence} changes in a row | | {cells(incremental)} |")
        print(f"| {size} | fair_share, the same {args.sequence} changes | | {cells(stateless)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
