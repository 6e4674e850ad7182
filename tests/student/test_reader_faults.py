"""DistillReader when things go wrong, with real teacher servers, real worker processes and real signals:
a teacher SIGKILLed mid-epoch and restarted, all teachers down, a worker killed, the user's generator raising,
and the workers' shutdown after break, del, Ctrl-C and SIGKILL of the student."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import textwrap
import time
import traceback

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_reader import DistillReader
from distill_reader.errors import AllTeachersDownError
from tests.support.procs import REPO_ROOT, ProcessGuard, free_port, pid_alive, wait_for
from tests.support.teacher import TeacherServer, mnist_like_images, reference_predict


def _reader(teacher_model, endpoints, **options) -> DistillReader:
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], **options)
    dr.set_fixed_teacher(endpoints)
    dr.set_serving_conf_file(teacher_model.client_conf)
    return dr


def _assert_gone(pids, within=5.0):
    assert pids, "expected worker PIDs to watch"
    wait_for(lambda: not any(pid_alive(p) for p in pids), within, f"worker processes {pids} to exit")


@pytest.mark.one_line   # the student's fault handling: the same on every paddle line
def test_teacher_sigkilled_mid_epoch_and_restarted(teacher_model):
    """Three teachers, one SIGKILLed mid-epoch and restarted later: every sample once, in order, correct;
    the restarted teacher is probed back into service."""
    n, list_size = 1200, 8
    images = mnist_like_images(n, seed=11)
    ref = reference_predict(teacher_model.server_dir, images)

    def sample_lists():
        for start in range(0, n, list_size):
            yield [(images[i], i) for i in range(start, start + list_size)]

    servers = [TeacherServer(teacher_model.server_dir) for _ in range(3)]
    try:
        for server in servers:   # from this thread: ProcessGuard's PDEATHSIG fires when the starting thread ends
            server.start()
        dr = _reader(teacher_model, [s.endpoint for s in servers], probe_backoff=0.1, max_probe_backoff=0.5)
        dr.set_teacher_batch_size(4)
        reader = dr.set_sample_list_generator(sample_lists)
        out, victim, killed_at = [], None, None
        for step, batch in enumerate(reader()):
            out.extend(batch)
            # the victim: a teacher holding requests (routing by speed leaves the slowest idle while the
            # student, not the teachers, sets the pace)
            busy = [s for s in servers if dr.pool.outstanding(s.endpoint)]
            if step >= 20 and victim is None and busy:
                victim, killed_at = busy[0], step
                victim.kill(signal.SIGKILL)
                victim.wait_exit(10)
            if killed_at is not None and step == killed_at + 40:
                victim.restart()
            time.sleep(0.01)   # a student doing some work; the epoch spans the kill and the restart
        assert [s[1] for s in out] == list(range(n)), "every sample exactly once, in order"
        np.testing.assert_allclose(np.stack([s[2] for s in out]), ref, rtol=1e-5, atol=1e-6)
        assert victim is not None and killed_at < n // list_size - 40, "a teacher held requests mid-epoch"
        stage, teachers = dr.last_epoch_stats.stage, dr.last_epoch_stats.teachers
        # the victim's tasks were answered elsewhere: re-sent after its failure, or already hedged
        assert stage["retries"] + stage["hedge_wins"] >= 1, stage
        assert teachers[victim.endpoint]["errors"] >= 1, teachers
        # next epoch: the restarted teacher is back in service and takes its share
        out = [s for batch in reader() for s in batch]
        assert [s[1] for s in out] == list(range(n))
        np.testing.assert_allclose(np.stack([s[2] for s in out]), ref, rtol=1e-5, atol=1e-6)
        assert dr.last_epoch_stats.teachers[victim.endpoint]["requests"] > 0
        dr.close()
    finally:
        for server in servers:
            server.close()


def test_all_teachers_down_raises_within_timeout(teacher_model):
    """The only teacher is SIGKILLed mid-epoch: AllTeachersDownError naming it and the last error, no hang."""
    images = mnist_like_images(16)
    dead = f"127.0.0.1:{free_port()}"   # never answered

    def endless():
        while True:
            yield images, np.zeros(16, "int64")

    with TeacherServer(teacher_model.server_dir) as server:
        dr = _reader(teacher_model, [server.endpoint, dead], all_teachers_down_timeout=2.0)
        iterator = dr.set_batch_generator(endless)()
        for _ in range(5):
            next(iterator)
        pids = dr.worker_pids
        server.kill(signal.SIGKILL)
        server.wait_exit(10)
        started = time.monotonic()
        with pytest.raises(AllTeachersDownError) as info:
            for _ in iterator:
                pass
        elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < 2.0 + 3.0, f"took {elapsed:.1f}s"
    assert server.endpoint in message and dead in message and "last error" in message
    assert "UNAVAILABLE" in message or "failed" in message
    _assert_gone(pids)


def test_worker_killed_mid_epoch_loses_nothing(teacher_model, teacher):
    n = 600
    images = mnist_like_images(n, seed=3)
    ref = reference_predict(teacher_model.server_dir, images)
    dr = _reader(teacher_model, [teacher.endpoint])
    dr.set_teacher_batch_size(5)
    out, victim, held = [], None, set()
    try:
        for i, sample in enumerate(dr.set_sample_generator(lambda: ((images[k], k) for k in range(n)))()):
            out.append(sample)
            if i >= 100 and victim is None:
                # the victim must hold requests when it dies, or nothing is tested: the first worker that does
                holder = next((h for h in dr._resources.remote_stage().workers.workers if h.outstanding), None)
                if holder is not None:
                    victim, held = holder.pid, set(holder.outstanding)
                    os.kill(victim, signal.SIGKILL)
            time.sleep(0.0005)
        assert [s[1] for s in out] == list(range(n))
        np.testing.assert_allclose(np.stack([s[2] for s in out]), ref, rtol=1e-5, atol=1e-6)
        assert held, "the killed worker held at least one request"
        assert victim not in dr.worker_pids and len(dr.worker_pids) == 2
    finally:
        dr.close()


def _user_generator_that_fails(images):
    for i in range(40):
        if i == 23:
            raise ValueError(f"corrupt record {i}")   # the line the traceback must show
        yield images[i], i


def test_generator_exception_reraised_with_traceback(teacher_model, teacher):
    images = mnist_like_images(40)
    dr = _reader(teacher_model, [teacher.endpoint])
    dr.set_teacher_batch_size(4)
    got = []
    with pytest.raises(ValueError, match="corrupt record 23") as info:
        for sample in dr.set_sample_generator(lambda: _user_generator_that_fails(images))():
            got.append(sample[1])
            pids = dr.worker_pids
    text = "".join(traceback.format_exception(info.type, info.value, info.tb))
    assert "_user_generator_that_fails" in text and 'raise ValueError(f"corrupt record {i}")' in text
    assert got == list(range(23)), "every sample before the failure comes out, in order, then the error"
    _assert_gone(pids)
    dr.close()


def test_break_and_del_stop_the_workers(teacher_model, teacher):
    images = mnist_like_images(64)
    dr = _reader(teacher_model, [teacher.endpoint])
    reader = dr.set_batch_generator(lambda: ((images[i:i + 8], np.arange(i, i + 8)) for i in range(0, 64, 8)))
    for step, _batch in enumerate(reader()):
        pids = dr.worker_pids
        if step == 2:
            break
    started = time.monotonic()
    _assert_gone(pids)
    assert time.monotonic() - started < 5
    # the reader is still usable: workers start again on demand, and persist after a full epoch
    assert len(list(reader())) == 8
    pids = dr.worker_pids
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    del dr, reader
    gc.collect()
    _assert_gone(pids)


_STUDENT = textwrap.dedent("""
    import faulthandler, json, signal, sys, time
    import numpy as np
    faulthandler.register(signal.SIGUSR1)  # the test dumps every thread's stack if this process hangs
    from distill_reader import DistillReader
    endpoint, conf = sys.argv[1], sys.argv[2]
    images = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
    dr.set_fixed_teacher(endpoint)
    dr.set_serving_conf_file(conf)
    def endless():
        while True:
            yield images, np.zeros(8, "int64")
    for step, batch in enumerate(dr.set_batch_generator(endless)()):
        if step == 3:
            print(json.dumps(dr.worker_pids), flush=True)
        time.sleep(0.01)
""")


@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_student_killed_or_interrupted_workers_exit(teacher_model, teacher, how, tmp_path):
    """SIGKILL of the student: its workers exit by themselves. Ctrl-C (SIGINT to the whole process group, as a
    terminal sends it): the student stops its workers and exits."""
    err_path = tmp_path / "student.err"   # a file, not a pipe: the student and its workers can never block on it
    with ProcessGuard() as guard, open(err_path, "w") as err:
        student = guard.python("-c", _STUDENT, teacher.endpoint, teacher_model.client_conf,
                               stdout=subprocess.PIPE, stderr=err, env={"PYTHONPATH": REPO_ROOT})
        line = student.stdout.readline()
        assert line, err_path.read_text()[-2000:]
        pids = json.loads(line)
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        if how == "SIGKILL":
            student.kill()
        else:
            os.killpg(student.pid, signal.SIGINT)
        try:
            student.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(student.pid, signal.SIGUSR1)
            time.sleep(1)
            pytest.fail(f"the student did not exit within 10 s of {how}; its stderr and thread stacks:\n"
                        + err_path.read_text()[-6000:])
        _assert_gone(pids, within=5.0)
        if how == "Ctrl-C":
            assert "KeyboardInterrupt" in err_path.read_text()


def test_unreachable_zookeeper_is_named_when_no_teacher_comes(teacher_model):
    """Discovery that never connects: the error names the service, the ZooKeeper address and that it is not
    connected (it said "no teachers configured")."""
    hosts = f"127.0.0.1:{free_port()}"        # nothing listens there
    dr = DistillReader(ins=["img"], predicts=["prediction"], all_teachers_down_timeout=2)
    dr.set_serving_conf_file(teacher_model.client_conf)
    dr.set_dynamic_teacher(hosts, "nobody_serves_this")
    try:
        with pytest.raises(AllTeachersDownError, match=rf"no teacher of service 'nobody_serves_this' found in "
                                                       rf"ZooKeeper {hosts} \(NOT connected"):
            list(dr.set_batch_generator(lambda: iter([(mnist_like_images(4),)]))())
    finally:
        dr.close()


@pytest.mark.one_line   # the student's fault handling: the same on every paddle line
def test_one_worker_killed_every_epoch_for_20_epochs(teacher_model, teacher):
    """The replacement limit counts deaths in a row: one SIGKILL per epoch, with healthy answers between, never
    exhausts it (it used to count every death of the reader's life: WorkerError in epoch 9)."""
    n, epochs = 48, 20
    images = mnist_like_images(n, seed=6)
    ref = reference_predict(teacher_model.server_dir, images)
    dr = _reader(teacher_model, [teacher.endpoint])
    dr.set_teacher_batch_size(1)
    killed = []
    try:
        for _ in range(epochs):
            out = []
            for i, sample in enumerate(dr.set_sample_generator(lambda: ((images[k], k) for k in range(n)))()):
                out.append(sample)
                if i == 8:
                    victim = dr.worker_pids[0]
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
            assert [s[1] for s in out] == list(range(n))
            np.testing.assert_allclose(np.stack([s[2] for s in out]), ref, rtol=1e-5, atol=1e-6)
        assert len(set(killed)) == epochs and not set(killed) & set(dr.worker_pids)
        workers = dr._resources.remote_stage().workers
        assert workers.total_respawns == epochs and workers.respawns <= 1
    finally:
        dr.close()


def test_workers_that_keep_dying_still_raise(teacher_model, teacher):
    """Every worker killed as soon as it shows up: no healthy stretch between deaths, so WorkerError (no loop)."""
    import threading

    from distill_reader.workers import WorkerError

    images = mnist_like_images(8, seed=7)
    dr = _reader(teacher_model, [teacher.endpoint])
    dr.set_teacher_batch_size(1)
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            for pid in list(dr.worker_pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    try:
        iterator = dr.set_sample_generator(lambda: ((images[k % 8], k) for k in range(10 ** 6)))()
        next(iterator)
        thread.start()
        with pytest.raises(WorkerError, match="replacements in a row"):
            for _ in iterator:
                pass
    finally:
        stop.set()
        thread.join(5)
        dr.close()
