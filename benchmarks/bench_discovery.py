"""Discovery latency: how fast a running DistillReader follows teachers that come and go in ZooKeeper.

A student (DistillReader with ``set_dynamic_teacher``) runs an endless epoch against fake teachers (5 ms per
request, separate processes that log the wall-clock time of every request). Measured per round:

1. join: a teacher registers (in-process TeacherRegistration, the teacher already up; require_max_teacher=2).
   From the node's creation (its ZooKeeper ``ctime``) to the student's ``on_change`` and to the teacher's first
   request.
2. teacher killed, register script alive: SIGKILL of the teacher the student uses (require_max_teacher=1, one
   spare registered). The register script's health check removes the node; from the kill to ``on_change`` and
   to the spare's first request.
3. teacher and register script killed: both SIGKILLed; the node goes when the ZooKeeper session expires. Run
   with each ``--session_timeouts`` value (default 6 = the default of the register script, and 2).

Example::

    python benchmarks/bench_discovery.py                 # about 1-2 minutes
    python benchmarks/bench_discovery.py --rounds 3 --session_timeouts 6
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence

import numpy as np  # noqa: I001  (numpy before paddle)
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from fake_teacher import fake_config  # noqa: E402

from discovery.arguments import TEACHER_PREFIX  # noqa: E402
from discovery.teacher_registration import TeacherRegistration  # noqa: E402
from distill_reader import DistillReader  # noqa: E402
from tests.support.procs import free_port, wait_for  # noqa: E402
from tests.support.teacher import grpc_health  # noqa: E402
from tests.support.zookeeper import ZooKeeperServer  # noqa: E402

SERVICE = "bench_teacher"
ROOT = "/distill-bench"

# Run with --serve_teacher: a fake teacher that appends the wall-clock time of every request to a file.
RECORDING_TEACHER = """
import sys, time, threading
sys.path.insert(0, {here!r})
import fake_teacher
port, log_path = int(sys.argv[1]), sys.argv[2]
log = open(log_path, "a", buffering=1)
lock = threading.Lock()
original = fake_teacher.FakeTeacher.inference
def inference(self, request, context):
    with lock:
        log.write(f"{{time.time():.6f}}\\n")
    return original(self, request, context)
fake_teacher.FakeTeacher.inference = inference
servers = fake_teacher.serve([port], latency=0.005)  # keep a reference: a collected server stops
threading.Event().wait()
"""


class Teacher:
    """A recording fake teacher process on a fixed port (restartable on the same port)."""

    def __init__(self, workdir: str):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"requests-{self.port}.log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> Teacher:
        code = RECORDING_TEACHER.format(here=HERE)
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.port), self.log_path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: grpc_health(self.endpoint) == "SERVING", 30, f"fake teacher {self.endpoint}")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def first_request_after(self, t0: float) -> Optional[float]:
        try:
            with open(self.log_path) as f:
                times = [float(line) for line in f if line.strip()]
        except FileNotFoundError:
            return None
        later = [t for t in times if t >= t0]
        return min(later) if later else None


class RegisterScript:
    """``python -m discovery.register`` for one teacher, as a process we can SIGKILL."""

    def __init__(self, hosts: str, endpoint: str, session_timeout: float, workdir: str):
        self.args = [sys.executable, "-m", "discovery.register", "--zk", hosts, "--service", SERVICE, "--root", ROOT,
                     "--endpoint", endpoint, "--session_timeout", str(session_timeout),
                     "--health_interval", "0.2", "--health_timeout", "0.5", "--log_level", "WARNING",
                     "--allow_open_acl"]
        self.log_path = os.path.join(workdir, f"register-{endpoint.replace(':', '_')}.log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> RegisterScript:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=os.path.dirname(HERE))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)


class Student:
    """A DistillReader with dynamic teachers, iterating an endless epoch in a thread; records share changes."""

    def __init__(self, hosts: str, conf_dir: str, require_max_teacher: int, session_timeout: float):
        self.changes: list[tuple[float, list[str]]] = []
        self.dr = DistillReader(ins=["img"], predicts=["prediction"], all_teachers_down_timeout=120.0,
                                probe_backoff=0.1, max_probe_backoff=0.5)
        self.dr.set_serving_conf_file(conf_dir)
        self.dr.set_teacher_batch_size(8)
        set_endpoints = self.dr.pool.set_endpoints

        def recording_set_endpoints(endpoints):
            self.changes.append((time.time(), sorted(endpoints)))
            set_endpoints(endpoints)

        self.dr.pool.set_endpoints = recording_set_endpoints   # what set_dynamic_teacher hands to on_change
        self.dr.set_dynamic_teacher(hosts, SERVICE, require_max_teacher=require_max_teacher, root=ROOT,
                                    session_timeout=session_timeout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self.samples = 0

    def _consume(self) -> None:
        images = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)

        def endless():
            while True:
                yield [(image,) for image in images[:8]]

        for batch in self.dr.set_sample_list_generator(endless)():
            self.samples += len(batch)
            if self._stop.is_set():
                break

    def start(self) -> Student:
        self._thread.start()
        return self

    def change_after(self, t0: float, predicate) -> Optional[float]:
        for at, endpoints in list(self.changes):
            if at >= t0 and predicate(endpoints):
                return at
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.dr.close()


def node_ctime(zk_client, endpoint: str) -> Optional[float]:
    """Creation time (s since the epoch) of the node registering ``endpoint``."""
    path = f"{ROOT}/{SERVICE}"
    for name in zk_client.get_children(path):
        if name.startswith(TEACHER_PREFIX):
            try:
                value, stat = zk_client.get(f"{path}/{name}")
            except NoNodeError:
                continue
            if json.loads(value)["endpoint"] == endpoint:
                return stat.ctime / 1000.0
    return None


def bench_join(hosts: str, conf_dir: str, workdir: str, rounds: int, zk_client) -> list[tuple[float, float]]:
    base, joiner = Teacher(workdir), Teacher(workdir)
    base_reg = TeacherRegistration(hosts, SERVICE, base.endpoint, root=ROOT, health_interval=0.2,
                                   allow_open_acl=True)
    student = None
    results = []
    try:
        base.start()
        joiner.start()
        base_reg.start().wait_registered(20)
        student = Student(hosts, conf_dir, require_max_teacher=2, session_timeout=6.0).start()
        wait_for(lambda: student.dr.pool.endpoints == [base.endpoint] and student.samples > 0, 30, "student running")
        for _ in tqdm(range(rounds), desc="join", leave=False, disable=None):
            registration = TeacherRegistration(hosts, SERVICE, joiner.endpoint, root=ROOT, health_interval=0.2,
                                               allow_open_acl=True)
            registration.start()
            registration.wait_registered(20)
            created = node_ctime(zk_client, joiner.endpoint)
            wait_for(lambda c=created: joiner.first_request_after(c) is not None, 20, "first request")
            changed = student.change_after(created, lambda e: joiner.endpoint in e)
            results.append((changed - created, joiner.first_request_after(created) - created))
            registration.stop()
            wait_for(lambda: joiner.endpoint not in student.dr.pool.endpoints, 20, "joiner leaving")
            time.sleep(0.3)
    finally:
        if student is not None:
            student.close()
        base_reg.stop()
        base.kill()
        joiner.kill()
    return results


def bench_kill(hosts: str, conf_dir: str, workdir: str, rounds: int, session_timeout: float,
               kill_script: bool, zk_client) -> list[tuple[float, float]]:
    teachers = [Teacher(workdir) for _ in range(2)]
    by_endpoint = {t.endpoint: t for t in teachers}
    scripts: dict[str, RegisterScript] = {}
    student = None
    results = []
    label = f"kill teacher+script, session {session_timeout:g}s" if kill_script else "kill teacher"
    try:
        for teacher in teachers:
            teacher.start()
            scripts[teacher.endpoint] = RegisterScript(hosts, teacher.endpoint, session_timeout, workdir).start()
        student = Student(hosts, conf_dir, require_max_teacher=1, session_timeout=session_timeout).start()
        for _ in tqdm(range(rounds), desc=label, leave=False, disable=None):
            wait_for(lambda: len(student.dr.pool.endpoints) == 1 and student.samples > 0, 60, "student running")
            time.sleep(0.5)
            (victim,) = student.dr.pool.endpoints
            spare = next(e for e in by_endpoint if e != victim)
            killed_at = time.time()
            by_endpoint[victim].kill()
            if kill_script:
                scripts[victim].stop(signal.SIGKILL)
            wait_for(lambda s=spare, k=killed_at: by_endpoint[s].first_request_after(k) is not None,
                     session_timeout + 30, "work moving to the spare")
            changed = student.change_after(killed_at, lambda e, s=spare: e == [s])
            results.append((changed - killed_at, by_endpoint[spare].first_request_after(killed_at) - killed_at))
            by_endpoint[victim].start()                              # back for the next round
            if kill_script:
                scripts[victim] = RegisterScript(hosts, victim, session_timeout, workdir).start()
            wait_for(lambda v=victim: node_ctime(zk_client, v) is not None, 30, "victim registered again")
    finally:
        if student is not None:
            student.close()
        for script in scripts.values():
            script.stop()
        for teacher in teachers:
            teacher.kill()
    return results



def summary(results: Sequence[tuple[float, float]]) -> str:
    change = [r[0] for r in results]
    first = [r[1] for r in results]
    return (f"on_change median {statistics.median(change) * 1000:7.0f} ms (min {min(change) * 1000:.0f}, max "
            f"{max(change) * 1000:.0f}); first request median {statistics.median(first) * 1000:7.0f} ms "
            f"(min {min(first) * 1000:.0f}, max {max(first) * 1000:.0f}); {len(results)} rounds")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Discovery latency of DistillReader with ZooKeeper teachers.")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per measurement (default 5)")
    parser.add_argument("--kill_rounds", type=int, default=3, help="rounds per SIGKILL measurement (default 3)")
    parser.add_argument("--session_timeouts", default="6,2",
                        help="comma-separated ZooKeeper session timeouts for the SIGKILL of teacher and register "
                             "script (default 6,2)")
    parser.add_argument("--zk", default=os.environ.get("DISTILL_ZK_HOSTS", ""),
                        help="existing ZooKeeper 'host:port' (default: start one on a free loopback port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    server = None
    workdir = tempfile.mkdtemp(prefix="bench-discovery-")
    conf_dir = os.path.join(workdir, "conf")
    fake_config().save(conf_dir, "serving_client_conf.prototxt")

    if args.zk:
        hosts = args.zk
    else:
        server = ZooKeeperServer().start()
        hosts = server.hosts
    zk_client = KazooClient(hosts=hosts)
    zk_client.start(10)
    try:
        print(f"ZooKeeper {hosts}; fake teachers answer in 5 ms; teacher batch 8; health check every 0.2 s")
        print("join (registration -> student):            " +
              summary(bench_join(hosts, conf_dir, workdir, args.rounds, zk_client)))
        print("kill teacher, register script alive:        " +
              summary(bench_kill(hosts, conf_dir, workdir, args.kill_rounds, 6.0, kill_script=False,
                                     zk_client=zk_client)))
        for timeout in (float(x) for x in args.session_timeouts.split(",") if x):
            print(f"kill teacher + register script, session {timeout:g}s: " +
                  summary(bench_kill(hosts, conf_dir, workdir, args.kill_rounds, timeout, kill_script=True,
                                     zk_client=zk_client)))
    finally:
        zk_client.stop()
        zk_client.close()
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
