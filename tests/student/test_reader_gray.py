"""DistillReader under gray failures and the faults of issue 11, with real teacher servers, real workers and real
signals: a frozen teacher (SIGSTOP) is hedged around and set aside, or noticed by gRPC keepalive; transient
errors, wrong answers and refused requests each take their own path; an abandoned epoch ends cleanly in the
offline cache; close() from another thread; the reorder buffer's bound; the worker's exception type.

Misbehaving teachers that a real server cannot be made to be (wrong answers, failing predictors, refusals) are
the benchmark's protocol-compatible fake (benchmarks/fake_teacher.py --bad ...); the reader is always real."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_base.serving_config import ServingConfig
from distill_reader import DistillReader
from distill_reader.errors import (
    AllTeachersDownError,
    ReaderClosedError,
    TeacherAnswerInvalid,
    TeacherRequestRefused,
)
from distill_reader.feeds import FeedError
from distill_reader.knowledge import KnowledgeReader
from distill_reader.prediction_stage import Task, next_task_id
from distill_reader.remote_stage import RemoteOptions, RemoteStage
from distill_reader.teacher_pool import TeacherPool
from tests.support.procs import REPO_ROOT, ProcessGuard, free_port, pid_alive, wait_for
from tests.support.teacher import (
    TeacherServer,
    check_epoch,
    grpc_health,
    image_batches,
    mnist_like_images,
    mnist_reader,
    reference_predict,
)

pytestmark = pytest.mark.one_line   # run on one paddle line (tests/conftest.py)

N = 640
BATCH = 16


@pytest.fixture(scope="module")
def data(teacher_model):
    images = mnist_like_images(N, seed=11)
    return images, reference_predict(teacher_model.server_dir, images)


def _reader(teacher_model, endpoints, **options) -> DistillReader:
    return mnist_reader(teacher_model, endpoints, BATCH, **options)


def _batches(images, size=BATCH):
    return image_batches(images, size)


@pytest.fixture
def fake_teacher():
    """Start ``benchmarks/fake_teacher.py --bad MODE`` teachers; stopped after the test."""
    with ProcessGuard() as guard:
        def start(bad: str, latency_ms: float = 1.0) -> str:
            port = free_port()
            guard.python(os.path.join(REPO_ROOT, "benchmarks", "fake_teacher.py"), "--port", str(port),
                         "--latency_ms", str(latency_ms), "--bad", bad,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            endpoint = f"127.0.0.1:{port}"
            wait_for(lambda: grpc_health(endpoint) == "SERVING", 30, f"fake teacher --bad {bad}")
            return endpoint
        yield start


def _run_freezing(dr, images, victim, at=5, on_send=False):
    """One epoch that freezes ``victim`` (SIGSTOP) once ``at`` batches came out of the reader, or with ``on_send``
    once the generator has handed the reader ``at`` batches.

    Frozen on the generator's side, the batches after ``at`` go to a frozen teacher whatever the reader's
    read-ahead; frozen on the consumer's side, a slow consumer on a loaded machine may have every answer before
    the freeze (its connections are then open and idle: what the keepalive test needs)."""
    def freezing_batches():
        for index, batch in enumerate(_batches(images)()):
            if on_send and index == at:
                os.kill(victim.pid, signal.SIGSTOP)
            yield batch

    out, started = [], time.monotonic()
    try:
        for batch in dr.set_batch_generator(freezing_batches)():
            out.append(batch)
            if not on_send and len(out) == at:
                os.kill(victim.pid, signal.SIGSTOP)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    return out, time.monotonic() - started


def test_frozen_teacher_is_hedged_around_and_set_aside(teacher_model, data):
    """A teacher frozen mid-epoch (SIGSTOP, connections open) costs about a hedge delay, not request_timeout:
    the head-of-line task is hedged to another teacher and the frozen one is set aside as stalled."""
    images, ref = data
    with TeacherServer(teacher_model.server_dir) as a, TeacherServer(teacher_model.server_dir) as b, \
            TeacherServer(teacher_model.server_dir) as c:
        dr = _reader(teacher_model, [a.endpoint, b.endpoint, c.endpoint], request_timeout=60.0, keepalive_time=0)
        try:
            out, seconds = _run_freezing(dr, images, b, on_send=True)
            check_epoch(out, images, ref)
            stage = dr.last_epoch_stats.stage
            assert stage["hedges"] + stage["stalls"] >= 1, stage
            assert seconds < 30, f"the epoch waited for the frozen teacher ({seconds:.1f}s; request_timeout 60s)"
            assert f"{b.endpoint} (set aside: requests stalled" in dr.pool.describe() or stage["hedge_wins"] >= 1
        finally:
            dr.close()


def test_frozen_teacher_is_noticed_by_grpc_keepalive(teacher_model, data, caplog):
    """Without hedging and with stall detection pushed out of the way, gRPC keepalive pings (and the connect
    timeout, for a new connection) fail the frozen teacher's requests with UNAVAILABLE in about two intervals;
    they are retried elsewhere."""
    images, ref = data
    with TeacherServer(teacher_model.server_dir) as a, TeacherServer(teacher_model.server_dir) as b:
        dr = _reader(teacher_model, [a.endpoint, b.endpoint], request_timeout=60.0, keepalive_time=1.0,
                     hedge_budget=0.0, stall_min_timeout=55.0)
        try:
            with caplog.at_level("INFO", logger="distill_reader.remote_stage"):
                out, seconds = _run_freezing(dr, images, b)
            check_epoch(out, images, ref)
            assert dr.last_epoch_stats.teachers[b.endpoint]["errors"] >= 1
            retried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying task")]
            # an open connection: the keepalive ping times out; a new one: the connect timeout (no SETTINGS frame)
            # or, whichever comes first, the deadline of its first health check
            assert any("UNAVAILABLE: ping timeout" in m or "SETTINGS frame" in m
                       or "no answer to the first health check on a new connection" in m for m in retried), retried
            assert seconds < 30, f"{seconds:.1f}s: the frozen teacher was noticed only by request_timeout"
        finally:
            dr.close()


@pytest.mark.parametrize("bad", ["predictor_failed", "resource_exhausted", "missing", "batch", "undecodable"])
def test_a_sick_teacher_is_set_aside_and_its_tasks_retried_elsewhere(teacher_model, data, fake_teacher, bad):
    """Transient errors (err_no 10000, RESOURCE_EXHAUSTED) and wrong answers (missing fetch, wrong rows, a tensor
    numpy cannot shape: issue 26, once a bare ValueError in the training loop) of one teacher do not end the
    epoch: that teacher is set aside, the others answer every task."""
    images, ref = data
    sick = fake_teacher(bad)
    with TeacherServer(teacher_model.server_dir) as good:
        dr = _reader(teacher_model, [sick, good.endpoint], probe_backoff=0.05, max_probe_backoff=0.2)
        try:
            errors = 0
            for _epoch in range(2):
                out = list(dr.set_batch_generator(_batches(images))())
                check_epoch(out, images, ref)
                teachers = dr.last_epoch_stats.teachers
                assert teachers[sick]["requests"] == 0 and teachers[good.endpoint]["requests"] >= N // BATCH, teachers
                errors += teachers[sick]["errors"]
            assert errors >= 1, "the sick teacher was asked and its failures counted"
        finally:
            dr.close()


def test_wrong_answers_everywhere_end_the_epoch_and_release_every_slot(teacher_model, fake_teacher):
    """Every teacher answers wrongly: TeacherAnswerInvalid naming them. With one in-flight slot per teacher the
    next epoch must fail the same way, not hang on a slot the first error never released."""
    a, b = fake_teacher("batch"), fake_teacher("missing")
    dr = _reader(teacher_model, [a, b], per_teacher_in_flight=1, all_teachers_down_timeout=20.0)
    images = mnist_like_images(64)
    try:
        for _epoch in range(2):
            started = time.monotonic()
            with pytest.raises(TeacherAnswerInvalid) as info:
                list(dr.set_batch_generator(_batches(images))())
            assert a in str(info.value) and b in str(info.value) and "correctly" in str(info.value)
            assert time.monotonic() - started < 15, "failed by a timeout instead of by the answers"
            stats = dr.last_epoch_stats     # the failed epoch's figures, marked as such
            assert stats.epoch == _epoch + 1 and stats.complete is False and stats.teachers[a]["errors"] >= 1
    finally:
        dr.close()


def test_a_request_every_teacher_refuses_names_the_slot_and_the_first_sample(teacher_model, fake_teacher):
    refusing = [fake_teacher("refuse"), fake_teacher("refuse")]
    dr = _reader(teacher_model, refusing)
    images = mnist_like_images(64)
    try:
        with pytest.raises(TeacherRequestRefused) as info:
            list(dr.set_batch_generator(_batches(images))())
        error = info.value
        assert error.first_sample % BATCH == 0 and error.slots == ["img"]
        assert f"samples {error.first_sample}..{error.first_sample + BATCH - 1}" in str(error)
        assert "img float32 [16, 1, 28, 28]" in str(error) and "err_no 5000" in str(error)
        assert all(endpoint in str(error) for endpoint in refusing)
    finally:
        dr.close()


def test_a_worker_exception_keeps_its_type_and_traceback(teacher_model, teacher_server):
    """An exception inside a worker process reaches the student with its own type and the worker's traceback."""
    pool = TeacherPool([teacher_server.endpoint])
    stage = RemoteStage(pool, ServingConfig.load(teacher_model.client_conf), ["prediction"], RemoteOptions())
    try:
        stage.begin_epoch(1)
        stage.submit(Task(next_task_id(), 0, 0, 2, {"image": np.zeros((2, 1, 28, 28), np.float32)}))
        with pytest.raises(FeedError) as info:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stage.poll(0.5)
        assert "in a DistillReader worker process" in str(info.value)
        assert "Traceback (most recent call last)" in str(info.value) and "in _check_names" in str(info.value)
        assert "missing feed(s) ['img']" in str(info.value)
    finally:
        stage.close()


def test_a_request_waiting_for_a_cold_worker_is_not_a_stall(teacher_model, teacher_server):
    """Issue 25: the stall clock starts when the worker can send the request, not when the task is handed to a
    worker still starting. The only worker is frozen (SIGSTOP) while it starts, for longer than the stall timeout
    of unknown latencies; once it runs the task is answered by the same teacher, with no stall counted and the
    teacher never set aside (before the fix: a stall, the teacher set aside)."""
    pool = TeacherPool([teacher_server.endpoint])
    options = RemoteOptions(request_timeout=3.0, stall_min_timeout=0.5, num_workers=1)
    stage = RemoteStage(pool, ServingConfig.load(teacher_model.client_conf), ["prediction"], options)
    images = mnist_like_images(4, seed=3)
    try:
        stage.begin_epoch(1)
        task = Task(next_task_id(), 0, 0, 4, {"img": images})
        stage.submit(task)
        (worker,) = stage.worker_pids
        os.kill(worker, signal.SIGSTOP)      # still importing: it has not reported ready
        try:
            assert stage.stall_timeout() == 3.0
            frozen_until = time.monotonic() + 4.5     # longer than the stall timeout: the student keeps polling
            while time.monotonic() < frozen_until:
                assert stage.poll(0.2) == []
            assert stage.counts["stalls"] == 0 and "set aside" not in pool.describe()
        finally:
            os.kill(worker, signal.SIGCONT)
        results, deadline = [], time.monotonic() + 60
        while not results and time.monotonic() < deadline:
            results = stage.poll(0.5)
        assert [r.task_id for r in results] == [task.task_id]
        np.testing.assert_allclose(results[0].outputs["prediction"], reference_predict(teacher_model.server_dir,
                                                                                         images), rtol=1e-5, atol=1e-6)
        assert stage.counts["stalls"] == 0 and stage.counts["requests"] == 1
        assert "set aside" not in pool.describe()
    finally:
        stage.close()


def _answer_of(stage: RemoteStage, task: Task, seconds: float = 60.0) -> list:
    stage.submit(task)
    results, deadline = [], time.monotonic() + seconds
    while not results and time.monotonic() < deadline:
        results = stage.poll(0.2)
    return results


def test_a_request_waiting_for_its_workers_first_connection_is_not_a_stall(teacher_model, teacher_server):
    """Issue 25: a worker's first request to a teacher waits while the worker makes its connection (a health check
    for the wire form and the round trip, then a connection with keepalive pings: ~4 round trips, 6 s to a teacher
    1.5 s away), which has timeouts of its own; the stall clock counted that wait, and a teacher 1.5 s away was set
    aside before its first request went out (bench_network_faults --far_from_start). Here the new teacher is
    frozen (SIGSTOP) while the worker connects, for 2.5 s: more than the 1 s stall timeout, less than the first
    health check's 5 s. The request is then sent and answered: no stall, the teacher never set aside, and its
    latency is the request's alone (before the fix: a stall, the teacher set aside, 2.5 s more latency)."""
    config = ServingConfig.load(teacher_model.client_conf)
    with TeacherServer(teacher_model.server_dir) as second:
        pool = TeacherPool([teacher_server.endpoint])
        stage = RemoteStage(pool, config, ["prediction"],
                            RemoteOptions(request_timeout=10.0, stall_min_timeout=1.0, num_workers=1))
        images = mnist_like_images(4, seed=5)
        try:
            stage.begin_epoch(1)
            for seq in range(4):   # latencies known: the stall timeout is its 1 s floor
                assert len(_answer_of(stage, Task(next_task_id(), seq, 4 * seq, 4, {"img": images}))) == 1
            assert stage.stall_timeout(second.endpoint) == pytest.approx(1.0)
            pool.set_endpoints([second.endpoint])
            task = Task(next_task_id(), 4, 16, 4, {"img": images})
            os.kill(second.pid, signal.SIGSTOP)
            try:
                stage.submit(task)
                frozen_until = time.monotonic() + 2.5
                while time.monotonic() < frozen_until:
                    assert stage.poll(0.2) == []
                assert stage.counts["stalls"] == 0 and "set aside" not in pool.describe()
            finally:
                os.kill(second.pid, signal.SIGCONT)
            results, deadline = [], time.monotonic() + 60
            while not results and time.monotonic() < deadline:
                results = stage.poll(0.2)
            assert [r.task_id for r in results] == [task.task_id]
            np.testing.assert_allclose(results[0].outputs["prediction"],
                                       reference_predict(teacher_model.server_dir, images), rtol=1e-5, atol=1e-6)
            assert stage.counts["stalls"] == 0 and stage.counts["requests"] == 5
            assert "set aside" not in pool.describe()
            assert stage.latencies.largest() < 2.0, "the connection's making is not the request's latency"
        finally:
            stage.close()


def test_the_pipeline_checks_answers_the_client_let_through():
    """The stage's own answer check (a second line behind the client's): rows that are not the task's samples
    set the teacher aside and re-queue the task. A stand-in message replaces the worker (not under test)."""
    pool = TeacherPool(["a:1", "b:2"])
    stage = RemoteStage(pool, ServingConfig(feeds=[], fetches=[]), ["prediction"], RemoteOptions())
    task = Task(next_task_id(), 0, 0, 4, {"img": np.zeros((4, 3), np.float32)})
    from distill_reader.remote_stage import _Request, _TaskState
    from distill_reader.worker_messages import Done

    state = stage._tasks[task.task_id] = _TaskState(task)
    stage._requests[7] = _Request(7, task.task_id, "a:1", time.monotonic())
    state.live.add(7)
    pool.started("a:1")
    stage._handle(Done(7, "a:1", {"prediction": np.zeros((3, 10), np.float32)}, 0.01))
    assert "a:1 (set aside: teacher a:1: fetch 'prediction' has shape [3, 10] for a request of 4)" in pool.describe()
    assert state.wrong and state.queued and task.task_id in stage._tasks and not stage._results
    assert pool.route() == ("b:2", None), "the slot was released and the other teacher takes the task"


def test_an_abandoned_epoch_ends_cleanly_in_the_offline_cache(teacher_model, teacher_server, data, tmp_path):
    """A new epoch while the old generator is still alive (and never resumed): the old epoch is ended on the stage
    at once, so the cache writer is closed and the new pass resumes after what was committed."""
    images, ref = data
    cache = str(tmp_path / "cache")
    dr = _reader(teacher_model, [teacher_server.endpoint])
    dr.set_offline_cache(cache, shard_samples=64)
    reader = dr.set_batch_generator(_batches(images))
    try:
        old = reader()
        for _ in range(9):
            next(old)
        full = list(reader())
        check_epoch(full, images, ref)
        assert dr.last_epoch_stats.stage["cache"] == "write"
        replay = list(reader())
        check_epoch(replay, images, ref)
        assert dr.last_epoch_stats.stage["cache"] == "read"
        with pytest.raises(RuntimeError, match="abandoned: a newer epoch started"):
            next(old)
    finally:
        dr.close()
    knowledge = KnowledgeReader(cache)
    assert knowledge.complete and knowledge.num_samples == N
    knowledge.verify()
    np.testing.assert_allclose(knowledge.read(0, N)["prediction"], ref, rtol=1e-5, atol=1e-6)


def test_close_from_another_thread_while_iterating(teacher_model, teacher_server, data):
    """close() from another thread: the iterating thread gets ReaderClosedError (not an OSError from a socket
    closed under it), and no worker process is left."""
    images, _ = data
    dr = _reader(teacher_model, [teacher_server.endpoint])
    pids, errors = [], []

    def consume():
        try:
            for i, _batch in enumerate(dr.set_batch_generator(lambda: (b for _ in range(50) for b in _batches(
                    images)()))()):
                if i == 3:
                    pids.extend(dr.worker_pids)
                    ready.set()
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    ready = threading.Event()
    thread = threading.Thread(target=consume)
    thread.start()
    assert ready.wait(60)
    dr.close()
    thread.join(15)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ReaderClosedError), errors
    assert pids and not any(pid_alive(p) for p in pids)


def test_close_from_another_thread_while_the_reader_waits_for_a_frozen_teacher(teacher_model, data):
    images, _ = data
    with TeacherServer(teacher_model.server_dir) as server:
        dr = _reader(teacher_model, [server.endpoint], request_timeout=60.0, keepalive_time=0,
                     stall_min_timeout=55.0, hedge_budget=0.0)
        errors, waiting = [], threading.Event()

        def consume():
            try:
                for _batch in dr.set_batch_generator(_batches(images))():
                    os.kill(server.pid, signal.SIGSTOP)
                    waiting.set()
            except BaseException as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        thread = threading.Thread(target=consume)
        try:
            thread.start()
            assert waiting.wait(60)
            time.sleep(1.0)      # the iterating thread is now inside the reader, waiting for answers
            started = time.monotonic()
            dr.close()
            thread.join(10)
            assert not thread.is_alive() and time.monotonic() - started < 10
            assert len(errors) == 1 and isinstance(errors[0], ReaderClosedError), errors
        finally:
            os.kill(server.pid, signal.SIGCONT)


def _read_ahead(dr, kind, images, ref, per_task):
    """One epoch of 320 samples in ``kind`` items of ``per_task`` samples, each checked: how many samples the
    generator had been read ahead of the student at each item."""
    read = [0]

    def generator():
        for i in range(0, 320, per_task):
            if kind == "sample":
                for k in range(i, i + per_task):
                    read[0] += 1
                    yield images[k], k
            else:
                read[0] += per_task
                rows = range(i, i + per_task)
                yield [(images[k], k) for k in rows] if kind == "sample_list" else (images[i:i + per_task],
                                                                                   np.arange(i, i + per_task))
    reader = {"sample": dr.set_sample_generator, "sample_list": dr.set_sample_list_generator,
              "batch": dr.set_batch_generator}[kind](generator)
    yielded, ahead = 0, []
    for item in reader():
        yielded += 1 if kind == "sample" else per_task
        ahead.append(read[0] - yielded)
        if kind == "sample_list":
            got = np.stack([s[-1] for s in item])
        else:
            got = item[-1] if kind == "batch" else item[-1][None]
        np.testing.assert_allclose(got, ref[yielded - len(got):yielded], rtol=1e-5, atol=1e-6)
    assert yielded == 320
    return ahead


@pytest.mark.parametrize("kind", ["sample", "sample_list", "batch"])
def test_the_generator_is_read_at_most_max_pending_tasks_ahead(teacher_model, teacher_server, data, kind):
    images, ref = data
    pending, per_task = 3, 8
    dr = _reader(teacher_model, [teacher_server.endpoint], max_pending_tasks=pending)
    dr.set_teacher_batch_size(per_task)
    try:
        ahead = _read_ahead(dr, kind, images, ref, per_task)
    finally:
        dr.close()
    assert max(ahead) <= pending * per_task, f"read {max(ahead)} samples ahead; bound {pending} tasks x {per_task}"
    assert max(ahead) >= per_task, "the reader reads ahead (requests overlap with the student)"


@pytest.mark.parametrize("kind", ["sample", "batch"])
def test_the_generator_is_read_at_most_max_pending_bytes_ahead(teacher_model, teacher_server, data, kind):
    """The feeds read ahead are bounded in bytes too: the task bound counts each near teacher's window up to 32
    times beside a far teacher (~450 tasks), gigabytes of big batches. Two tasks' feeds here, below the task
    bound (4), so the bytes hold first; a bad bound is refused when the reader is made."""
    images, ref = data
    per_task = 8
    task_bytes = images[:per_task].astype(np.float32).nbytes
    dr = _reader(teacher_model, [teacher_server.endpoint], max_pending_bytes=2 * task_bytes)
    dr.set_teacher_batch_size(per_task)
    try:
        ahead = _read_ahead(dr, kind, images, ref, per_task)
    finally:
        dr.close()
    assert per_task <= max(ahead) <= 2 * per_task, f"read {max(ahead)} samples ahead; bound 2 tasks' bytes"
    with pytest.raises(ValueError, match="max_pending_bytes must be >= 1, not 0"):
        _reader(teacher_model, [teacher_server.endpoint], max_pending_bytes=0)


def test_dynamic_teachers_survive_adding_an_offline_cache(teacher_model, teacher_server, zookeeper, zk_root,
                                                        tmp_path):
    """set_dynamic_teacher() then set_offline_cache(): the ZooKeeper subscription stays alive."""
    from discovery.teacher_registration import TeacherRegistration

    registration = TeacherRegistration(zookeeper.hosts, "gray", teacher_server.endpoint, root=zk_root,
                                       session_timeout=2.0, allow_open_acl=True)
    registration.start()
    images = mnist_like_images(96)
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], all_teachers_down_timeout=15.0)
    dr.set_serving_conf_file(teacher_model.client_conf)
    try:
        dr.set_dynamic_teacher(zookeeper.hosts, "gray", root=zk_root, session_timeout=2.0)
        dr.set_offline_cache(str(tmp_path / "cache"))
        wait_for(lambda: dr.pool.endpoints == [teacher_server.endpoint], 20, "the subscription's teacher")
        out = list(dr.set_batch_generator(_batches(images))())
        assert np.concatenate([b[1] for b in out]).tolist() == list(range(96))
    except AllTeachersDownError as exc:
        pytest.fail(f"the subscription was stopped by set_offline_cache: {exc}")
    finally:
        dr.close()
        registration.stop()
