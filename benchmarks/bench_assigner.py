"""The assigner at cluster scale on a real ZooKeeper: what one change costs (time, nodes written, pairs moved).

One ``discovery.assigner.Assigner`` (what every student runs; here alone, so it is elected at once) keeps the
assignment of ``--students`` student nodes and ``--teachers`` teacher nodes, all created by this process through
one extra kazoo client (ephemeral sequential nodes with the documents real students and teachers write). Measured:

- the first assignment: from the assigner's start to every student's node written;
- per change (a teacher leaves, a teacher joins, a student joins, a student leaves; ``4 x --changes`` changes of
  a random kind, one after the other, so the membership drifts as in bench_share.py's sequences): from the
  change's request to the assigner having written it out, the assignment nodes written, and the (student,
  teacher) pairs moved (read back from ZooKeeper before and after: what students would see).

Example::

    python benchmarks/bench_assigner.py                        # 1,000 students x 4,000 teachers, ~1 minute
    python benchmarks/bench_assigner.py --students 100 --teachers 400 --changes 5
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kazoo.client import KazooClient  # noqa: E402

from discovery.acls import ensure_service  # noqa: E402
from discovery.arguments import STUDENT_PREFIX, TEACHER_PREFIX, ServicePaths  # noqa: E402
from discovery.assigner import Assigner  # noqa: E402
from discovery.nodes import parse_assignment  # noqa: E402
from discovery.session import ZkSession  # noqa: E402
from discovery.share import moved_assignments, teacher_loads  # noqa: E402
from tests.support.zookeeper import ZooKeeperServer  # noqa: E402

SERVICE = "bench_teacher"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


class Cluster:
    """Student and teacher nodes created through one kazoo client (pipelined creates)."""

    def __init__(self, client: KazooClient, paths: ServicePaths, require_max: int):
        self.client, self.paths, self.require_max = client, paths, require_max
        self.teachers: dict[str, str] = {}     # node path -> endpoint
        self.students: list[str] = []          # node paths, oldest first
        self.serial = 0

    def add_teachers(self, count: int) -> None:
        requests = []
        for _ in range(count):
            self.serial += 1
            endpoint = f"10.{self.serial // 65536 % 256}.{self.serial // 256 % 256}.{self.serial % 256}:9292"
            data = json.dumps({"endpoint": endpoint, "model": "bench"}).encode()
            requests.append((endpoint, self.client.create_async(f"{self.paths.service_path}/{TEACHER_PREFIX}", data,
                                                                 ephemeral=True, sequence=True)))
        for endpoint, request in requests:
            self.teachers[request.get(timeout=30)] = endpoint

    def add_students(self, count: int) -> None:
        requests = [self.client.create_async(f"{self.paths.students_path}/{STUDENT_PREFIX}",
                                             json.dumps({"student_id": f"s{len(self.students) + i}",
                                                         "require_max_teacher": self.require_max}).encode(),
                                             ephemeral=True, sequence=True) for i in range(count)]
        self.students += [request.get(timeout=30) for request in requests]

    def remove_teacher(self, rng: random.Random) -> None:
        path = rng.choice(sorted(self.teachers))
        self.client.delete(path)
        del self.teachers[path]

    def remove_student(self, rng: random.Random) -> None:
        path = self.students.pop(rng.randrange(len(self.students)))
        self.client.delete(path)

    def assignment(self) -> dict[str, list[str]]:
        """{student node name: endpoints} as stored (pipelined reads)."""
        names = [n for n in self.client.get_children(self.paths.assignment_path) if n.startswith(STUDENT_PREFIX)]
        requests = [(n, self.client.get_async(self.paths.assignment_of(n))) for n in names]
        return {n: list(parse_assignment(n, r.get(timeout=30)[0]).endpoints) for n, r in requests}


def settled(assigner: Assigner, cluster: Cluster) -> bool:
    """The assigner has written out the current membership (its last applied view is the cluster's)."""
    view = assigner.applied
    return (view is not None and {s.node for s in view.students} == {p.rsplit("/", 1)[-1] for p in cluster.students}
            and set(view.endpoints) == set(cluster.teachers.values()))


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=1000, help="student nodes (default 1000)")
    parser.add_argument("--teachers", type=int, default=4000, help="teacher nodes (default 4000)")
    parser.add_argument("--require_max", type=int, default=4, help="teachers per student (default 4)")
    parser.add_argument("--changes", type=int, default=10, help="changes per kind on average (default 10)")
    parser.add_argument("--zk", default=None, help="existing ZooKeeper 'host:port' (default: start one on loopback)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the changes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rng = random.Random(args.seed)
    server = None if args.zk else ZooKeeperServer().start()
    hosts = args.zk or server.hosts
    paths = ServicePaths(f"/bench-assigner-{os.getpid()}", SERVICE)
    client = KazooClient(hosts=hosts, timeout=10)
    client.start(timeout=30)
    session = ZkSession(hosts, session_timeout=10).start()
    assigner = None
    try:
        session.wait_connected(30)
        ensure_service(session, paths, auth=None)
        cluster = Cluster(client, paths, args.require_max)
        cluster.add_teachers(args.teachers)
        cluster.add_students(args.students)
        started = time.perf_counter()
        assigner = Assigner(session, paths, identifier="bench").start()
        wait_for(lambda: settled(assigner, cluster), 120, "the first assignment")
        first = time.perf_counter() - started
        print(f"ZooKeeper {hosts}; {args.students} students x {args.teachers} teachers, {args.require_max} each")
        print(f"first assignment: {first:.2f} s, {assigner.writes} nodes written in {assigner.transactions} "
              "transactions")
        print("| change | to the write committed, median (max) | nodes written, mean (max) | "
              "pairs moved, mean (max) |")
        print("|---|---|---|---|")
        kinds = {"teacher leaves": lambda: cluster.remove_teacher(rng),
                 "teacher joins": lambda: cluster.add_teachers(1),
                 "student joins": lambda: cluster.add_students(1),
                 "student leaves": lambda: cluster.remove_student(rng)}
        results = {kind: ([], [], []) for kind in kinds}
        for _ in range(args.changes * len(kinds)):
            kind = rng.choice(sorted(kinds))
            before, writes = cluster.assignment(), assigner.writes
            started = time.perf_counter()
            kinds[kind]()
            wait_for(lambda: settled(assigner, cluster), 30, kind)
            took = time.perf_counter() - started
            time.sleep(0.05)                       # a second transaction of the same change would show here
            after = cluster.assignment()
            loads = teacher_loads(after, list(cluster.teachers.values()))
            assert max(loads.values()) - min(loads.values()) <= 1, "loads not within one"
            times, written, moved = results[kind]
            times.append(took)
            written.append(assigner.writes - writes)
            moved.append(moved_assignments(before, after))
        for kind, (times, written, moved) in results.items():
            if not times:
                continue
            print(f"| {kind} ({len(times)}) | {statistics.median(times) * 1e3:.1f} ms ({max(times) * 1e3:.1f} ms) | "
                  f"{statistics.mean(written):.2f} ({max(written)}) | {statistics.mean(moved):.2f} ({max(moved)}) |")
    finally:
        if assigner is not None:
            assigner.stop()
        session.close()
        if assigner is not None:
            assigner.join(5)
        try:
            client.delete(paths.root, recursive=True)
        finally:
            client.stop()
            client.close()
            if server is not None:
                server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
