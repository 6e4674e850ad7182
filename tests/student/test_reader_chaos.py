"""Chaos: DistillReader while a driver SIGKILLs, SIGSTOPs/SIGCONTs and restarts random real teacher servers.

Four real ``teachers.serve`` processes (Paddle Inference); about every 0.5 s a seeded driver picks a random healthy
teacher and either SIGKILLs it (restarting it on the same port 0.5-1.5 s later) or freezes it with SIGSTOP (its
connections stay open: a gray failure) and SIGCONTs it 0.5-2 s later. At most three teachers are out at once
(at most two killed or restarting), so one always serves and the epochs keep moving. Meanwhile the student runs
epochs with the three generator kinds (sample, sample list, batch); every epoch must give every sample exactly once,
in order, with the teacher's true prediction for it (a local Paddle Inference predictor of the same model). The
second test finds the teachers in ZooKeeper (``teachers.serve --zk``, ``set_dynamic_teacher``) and restarts
ZooKeeper once.

The reader runs with all its defaults.
Replay a failure with ``DISTILL_CHAOS_SEED=<seed printed by the test>``: the same sequence of faults (the timing
still depends on the machine).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import threading
import time
from typing import Callable, Optional

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_reader import DistillReader
from tests.support.procs import ProcessGuard, pid_alive, port_is_open, wait_for
from tests.support.teacher import TeacherServer, mnist_like_images, reference_predict
from tests.support.zookeeper import registered_endpoints

pytestmark = pytest.mark.one_line   # run on one paddle line (tests/conftest.py)

logger = logging.getLogger(__name__)

SEED_ENV = "DISTILL_CHAOS_SEED"
SERVICE = "chaos_teacher"
TEACHERS = 4
SAMPLES = 1024           # per epoch
LIST_SIZE = 16           # samples per student batch (sample lists and batches)
CHAOS_SECONDS = 12.0     # how long the driver injects faults in each test
INTERVAL = 0.5           # seconds between two faults (jittered)
MAX_FAULTY = 3           # teachers out of service at once: one always serves, so the epochs keep moving
MAX_KILLED = 2           # of which killed or restarting
HANG_LIMIT = 150.0       # no end of the epochs by then (a hung reader): close it from the watchdog, fail the test
STUDENT_PAUSE = 0.01     # seconds of "training" per student batch: an epoch spans several faults


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl   # resolved before any fork


def _sigkill_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it ends (pytest dying included).
    SIGKILL, not ProcessGuard's SIGTERM: a teacher frozen by SIGSTOP would never act on a SIGTERM."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _ChaosGuard(ProcessGuard):
    """ProcessGuard whose children die with the thread that started them, from any thread (the chaos driver's
    restart threads stay alive until every teacher is stopped, see ``ChaosDriver.release``)."""

    def start(self, args, env=None, **kwargs):
        kwargs["preexec_fn"] = _sigkill_with_parent
        return super().start(args, env, **kwargs)


def chaos_server(model_dir: str, **options) -> TeacherServer:
    """A TeacherServer (not started) whose processes are SIGKILLed if the test process dies."""
    server = TeacherServer(model_dir, **options)
    server._guard = _ChaosGuard()
    return server


def chaos_seed() -> int:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2 ** 32))
    print(f"chaos seed {seed} (replay with {SEED_ENV}={seed})")
    logger.warning("chaos seed %d (replay with %s=%d)", seed, SEED_ENV, seed)
    return seed


def _signal(server: TeacherServer, sig: int) -> None:
    """``sig`` to the server's process group (its own session); nothing when it is gone."""
    if server.proc is not None and server.proc.poll() is None:
        try:
            os.killpg(server.proc.pid, sig)
        except ProcessLookupError:
            pass


class ChaosDriver:
    """A thread that SIGKILLs (then restarts) or SIGSTOPs (then SIGCONTs) random teachers until ``stop()``.

    Only the driver thread draws from the seeded RNG, so a seed replays the same choices. Restarts run in their
    own threads (a server start takes seconds). ``stop()`` ends the faults, resumes every frozen teacher and
    waits for the restarts; it is safe to call more than once and never leaves a process stopped. A restart
    thread stays alive until ``release()`` (call it once the teachers are stopped): the processes it started get
    SIGKILL when it ends (``chaos_server``).
    """

    def __init__(self, servers: list[TeacherServer], seed: int, duration: float = CHAOS_SECONDS):
        self.servers = servers
        self.seed = seed
        self.rng = random.Random(seed)
        self.duration = duration
        self.events: list[str] = []
        self.errors: list[BaseException] = []
        self.kills = self.stops = 0
        self._lock = threading.Lock()
        self._faulty: dict[int, tuple[str, float]] = {}   # server index -> ("stopped" | "killed", when to heal)
        self._restarts: list[tuple[threading.Thread, threading.Event]] = []   # (thread, restart attempted)
        self._done = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-driver", daemon=True)
        self._started = 0.0

    def start(self) -> ChaosDriver:
        self._started = time.monotonic()
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def log(self, text: str) -> None:
        line = f"{time.monotonic() - self._started:6.2f}s {text}"
        with self._lock:
            self.events.append(line)
        logger.info("chaos: %s", line)

    def _run(self) -> None:
        try:
            while not self._done.wait(self.rng.uniform(0.5, 1.5) * INTERVAL):
                elapsed = time.monotonic() - self._started
                if elapsed >= self.duration:
                    break
                self._heal(due_only=True)
                self._strike()
        except BaseException as exc:  # noqa: BLE001 - reported by stop() in the test's thread
            self.errors.append(exc)
        finally:
            self._heal(due_only=False)

    def _strike(self) -> None:
        which = self.rng.random()   # the same number of draws every tick: a seed replays the same choices
        kill = self.rng.random() < 0.5
        pause = self.rng.uniform(0.5, 1.5) if kill else self.rng.uniform(0.5, 2.0)
        if abs(self.kills - self.stops) >= 2:   # keep the mix even: each kind of fault happens several times
            kill = self.kills < self.stops
        if kill and sum(state != "stopped" for state, _ in self._faulty.values()) >= MAX_KILLED:
            kill = False   # restarts take seconds on a loaded machine: freeze meanwhile
        healthy = [i for i in range(len(self.servers)) if i not in self._faulty]
        if len(self._faulty) >= MAX_FAULTY or not healthy:
            return
        index = healthy[int(which * len(healthy))]
        server = self.servers[index]
        if kill:
            _signal(server, signal.SIGKILL)
            self.kills += 1
            self._faulty[index] = ("killed", time.monotonic() + pause)
            self.log(f"SIGKILL teacher {index} {server.endpoint} (restart in {pause:.2f}s)")
        else:
            _signal(server, signal.SIGSTOP)
            self.stops += 1
            self._faulty[index] = ("stopped", time.monotonic() + pause)
            self.log(f"SIGSTOP teacher {index} {server.endpoint} (SIGCONT in {pause:.2f}s)")

    def _heal(self, due_only: bool) -> None:
        now = time.monotonic()
        for index, (state, when) in list(self._faulty.items()):
            if due_only and when > now:
                continue
            server = self.servers[index]
            if state == "stopped":
                _signal(server, signal.SIGCONT)
                del self._faulty[index]
                self.log(f"SIGCONT teacher {index} {server.endpoint}")
            elif state == "killed":
                self._faulty[index] = ("restarting", float("inf"))
                attempted = threading.Event()
                thread = threading.Thread(target=self._restart, args=(index, attempted),
                                          name=f"chaos-restart-{index}", daemon=True)
                self._restarts.append((thread, attempted))
                thread.start()

    def _restart(self, index: int, attempted: threading.Event) -> None:
        try:
            self._restart_server(index)
        finally:
            attempted.set()
        self._release.wait()   # the server's PDEATHSIG fires when this thread ends

    def _restart_server(self, index: int) -> None:
        server = self.servers[index]
        try:
            server.stop()     # reap the killed process
            wait_for(lambda: not port_is_open(server.port), 10, f"port {server.port} released")
            server.start()    # same port; returns when gRPC health says SERVING
            self.log(f"restarted teacher {index} {server.endpoint} (pid {server.pid})")
        except BaseException as exc:  # noqa: BLE001 - reported by stop() in the test's thread
            self.errors.append(exc)
            self.log(f"restart of teacher {index} failed: {exc}")
        finally:
            self._faulty.pop(index, None)

    def stop(self) -> None:
        """End the faults, SIGCONT every teacher, wait for the restarts under way."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(30)
        for _, attempted in list(self._restarts):
            attempted.wait(90)
        for server in self.servers:   # whatever happened above: no teacher stays frozen
            _signal(server, signal.SIGCONT)

    def release(self) -> None:
        """Let the restart threads end (after the teachers were stopped)."""
        self._release.set()
        for thread, _ in list(self._restarts):
            thread.join(10)

    def report(self) -> str:
        with self._lock:
            return "\n".join(self.events)


# -- the student ----------------------------------------------------------------------------------------------
def generators(images: np.ndarray) -> dict[str, Callable]:
    n = len(images)

    def samples():
        for i in range(n):
            if i % LIST_SIZE == 0:
                time.sleep(STUDENT_PAUSE)
            yield images[i], i

    def sample_lists():
        for start in range(0, n, LIST_SIZE):
            time.sleep(STUDENT_PAUSE)
            yield [(images[i], i) for i in range(start, min(start + LIST_SIZE, n))]

    def batches():
        for start in range(0, n, LIST_SIZE):
            time.sleep(STUDENT_PAUSE)
            stop = min(start + LIST_SIZE, n)
            yield images[start:stop], np.arange(start, stop, dtype=np.int64)

    return {"sample": samples, "sample_list": sample_lists, "batch": batches}


def run_epoch(dr: DistillReader, kind: str, generator: Callable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of ``kind``; returns (images, labels, predictions) in the order they came out."""
    wrap = {"sample": dr.set_sample_generator, "sample_list": dr.set_sample_list_generator,
            "batch": dr.set_batch_generator}[kind]
    out = list(wrap(generator)())
    if kind == "sample":
        samples = out
    elif kind == "sample_list":
        samples = [s for batch in out for s in batch]
    else:
        return (np.concatenate([b[0] for b in out]), np.concatenate([b[1] for b in out]),
                np.concatenate([b[2] for b in out]))
    return (np.stack([s[0] for s in samples]), np.array([s[1] for s in samples]),
            np.stack([s[2] for s in samples]))


def check_epoch(got: tuple[np.ndarray, np.ndarray, np.ndarray], images: np.ndarray, reference: np.ndarray,
                what: str) -> None:
    got_images, labels, predictions = got
    order = labels.tolist()
    if order != list(range(len(images))):
        counts = np.bincount(labels, minlength=len(images))
        first_wrong = next(i for i, (a, b) in enumerate(zip(order + [None] * len(images), range(len(images))))
                           if a != b)
        raise AssertionError(f"{what}: every sample exactly once, in order; {int((counts == 0).sum())} lost, "
                             f"{int((counts > 1).sum())} duplicated, {len(order)} yielded, first out of place "
                             f"at position {first_wrong}: {order[max(0, first_wrong - 2):first_wrong + 3]}")
    np.testing.assert_array_equal(got_images, images, err_msg=f"{what}: samples passed through unchanged")
    np.testing.assert_allclose(predictions, reference, rtol=1e-5, atol=1e-5,
                               err_msg=f"{what}: each sample with the teacher's prediction for it")


def student_epochs(dr: DistillReader, chaos: ChaosDriver, images: np.ndarray, reference: np.ndarray) -> list:
    """Epochs cycling through the three kinds until the chaos is over (and each kind ran once under it).

    A watchdog closes the reader from another thread if the epochs have not ended after ``HANG_LIMIT`` seconds
    (a hang must fail the test, with the chaos events, and still let it stop every process)."""
    kinds = generators(images)
    done = []
    hung = threading.Event()

    def watchdog() -> None:
        hung.set()
        chaos.log(f"watchdog: epochs not over after {HANG_LIMIT:.0f}s, closing the reader")
        dr.close()

    timer = threading.Timer(HANG_LIMIT, watchdog)
    timer.daemon = True
    timer.start()
    try:
        return _epochs_until_calm(dr, chaos, kinds, images, reference, done)
    except BaseException as exc:
        if hung.is_set():
            raise AssertionError(f"reader hung: {len(done)} epochs in {HANG_LIMIT:.0f}s, then {exc!r}") from exc
        raise
    finally:
        timer.cancel()


def _epochs_until_calm(dr: DistillReader, chaos: ChaosDriver, kinds: dict, images: np.ndarray,
                       reference: np.ndarray, done: list) -> list:
    while chaos.running or len(done) < len(kinds):
        kind = list(kinds)[len(done) % len(kinds)]
        started = time.monotonic()
        got = run_epoch(dr, kind, kinds[kind])
        stats = dr.last_epoch_stats
        what = f"epoch {len(done)} ({kind}, seed {chaos.seed})"
        check_epoch(got, images, reference, what)
        done.append((kind, time.monotonic() - started, dict(stats.stage)))
        logger.info("%s: %.2fs, stage %s", what, done[-1][1], stats.stage)
    return done


def _close_all(chaos: Optional[ChaosDriver], dr: Optional[DistillReader], servers: list[TeacherServer]) -> list:
    """Resume and stop everything, whatever failed: faults first, then the reader, then the teachers.
    Returns what is still running afterwards (teacher endpoints, worker PIDs): the test asserts it is empty."""
    workers = []
    try:
        if chaos is not None:
            chaos.stop()
    finally:
        try:
            if dr is not None:
                workers = dr.worker_pids
                dr.close()
        finally:
            for server in servers:
                _signal(server, signal.SIGCONT)
                server.close()
            if chaos is not None:
                chaos.release()
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not any(pid_alive(p) for p in workers), 10, "the reader's workers to exit")
    return [s.endpoint for s in servers if s.alive()] + [p for p in workers if pid_alive(p)]


def _epochs_under_chaos(dr: DistillReader, chaos: ChaosDriver, images: np.ndarray, reference: np.ndarray,
                        seed: int) -> list:
    """The student's epochs while the driver runs (its events printed if one fails); the driver stopped after."""
    try:
        return student_epochs(dr, chaos, images, reference)
    except BaseException:
        print(f"chaos events (seed {seed}):\n{chaos.report()}")
        raise
    finally:
        chaos.stop()


def _check_chaos(chaos: ChaosDriver, epochs: list) -> None:
    assert not chaos.errors, f"chaos driver failed: {chaos.errors!r}\n{chaos.report()}"
    assert chaos.kills >= 2 and chaos.stops >= 2, f"too few faults injected:\n{chaos.report()}"
    assert {kind for kind, *_ in epochs} == {"sample", "sample_list", "batch"}
    print(f"{len(epochs)} epochs under {chaos.kills} SIGKILLs and {chaos.stops} SIGSTOPs; epoch seconds "
          + ", ".join(f"{kind} {seconds:.1f}" for kind, seconds, _ in epochs))


def test_chaos_fixed_teachers(teacher_model):
    seed = chaos_seed()
    images = mnist_like_images(SAMPLES, seed=seed % 1000)
    reference = reference_predict(teacher_model.server_dir, images)
    servers = [chaos_server(teacher_model.server_dir) for _ in range(TEACHERS)]
    chaos = dr = None
    try:
        for server in servers:   # from this thread: their PDEATHSIG then fires only when pytest dies
            server.start()
        dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
        dr.set_fixed_teacher([s.endpoint for s in servers])
        dr.set_serving_conf_file(teacher_model.client_conf)
        check_epoch(run_epoch(dr, "batch", generators(images)["batch"]), images, reference, "warm-up epoch")
        chaos = ChaosDriver(servers, seed).start()
        _check_chaos(chaos, _epochs_under_chaos(dr, chaos, images, reference, seed))
    finally:
        left = _close_all(chaos, dr, servers)
    assert not left, f"still running after the test: {left}"


def registrations(hosts: str, root: str) -> list[str]:
    """The endpoints registered under the service now, for failure messages (['?'] when ZooKeeper does not say)."""
    try:
        return registered_endpoints(hosts, root, SERVICE, start_timeout=3)
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return [f"? ({exc!r})"]


def wait_for_teachers(dr: DistillReader, endpoints: list[str], zk_hosts: str, root: str, what: str,
                      chaos: Optional[ChaosDriver] = None) -> None:
    """Wait until the reader uses exactly ``endpoints``; the failure says what the reader and ZooKeeper have."""
    try:
        wait_for(lambda: sorted(dr.pool.endpoints) == endpoints, 20, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: the reader uses {sorted(dr.pool.endpoints)}, ZooKeeper has "
                             f"{registrations(zk_hosts, root)}, expected {endpoints}"
                             + (f"\nchaos events:\n{chaos.report()}" if chaos is not None else "")) from None


def test_chaos_dynamic_teachers_and_zookeeper_restart(private_zookeeper, zk_root, teacher_model):
    seed = chaos_seed()
    zk_server = private_zookeeper
    images = mnist_like_images(SAMPLES, seed=seed % 1000 + 1)
    reference = reference_predict(teacher_model.server_dir, images)
    zk_args = ["--zk", zk_server.hosts, "--service", SERVICE, "--zk_root", zk_root,   # teachers register themselves
               "--allow_open_acl"]
    servers = [chaos_server(teacher_model.server_dir, extra_args=zk_args) for _ in range(TEACHERS)]
    endpoints = sorted(s.endpoint for s in servers)
    chaos = dr = zk_thread = None
    zk_errors: list[BaseException] = []

    def restart_zookeeper_once() -> None:   # in the middle of the chaos, beside the driver
        try:
            time.sleep(CHAOS_SECONDS / 2)
            chaos.log("SIGKILL ZooKeeper")
            zk_server.restart(downtime=1.0, kill=True)
            chaos.log("ZooKeeper back")
        except BaseException as exc:  # noqa: BLE001 - asserted in the test's thread
            zk_errors.append(exc)

    try:
        for server in servers:
            server.start()
        dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
        dr.set_serving_conf_file(teacher_model.client_conf)
        dr.set_dynamic_teacher(zk_server.hosts, SERVICE, require_max_teacher=TEACHERS, root=zk_root)
        wait_for_teachers(dr, endpoints, zk_server.hosts, zk_root, "the reader finding the four teachers")
        check_epoch(run_epoch(dr, "batch", generators(images)["batch"]), images, reference, "warm-up epoch")
        chaos = ChaosDriver(servers, seed).start()
        zk_thread = threading.Thread(target=restart_zookeeper_once, name="zookeeper-restart", daemon=True)
        zk_thread.start()
        epochs = _epochs_under_chaos(dr, chaos, images, reference, seed)
        zk_thread.join(60)
        _check_chaos(chaos, epochs)
        assert not zk_errors and not zk_thread.is_alive() and zk_server.ready(), zk_errors
        # after the storm every teacher is registered again and the reader uses all four
        wait_for_teachers(dr, endpoints, zk_server.hosts, zk_root, "the reader back to four teachers", chaos)
        check_epoch(run_epoch(dr, "sample_list", generators(images)["sample_list"]), images, reference,
                    "epoch after the chaos")
        assert set(dr.last_epoch_stats.teachers) <= set(endpoints)
    finally:
        if zk_thread is not None:
            zk_thread.join(60)
        left = _close_all(chaos, dr, servers)
    assert not left, f"still running after the test: {left}"
