"""DistillReader against real teacher servers: the three generator kinds, pass-through slots, reshape, several
epochs, uneven last batches, teacher batch sizes 1 / 7 / 32, Paddle's DataLoader, and clear errors.

Every output is checked sample by sample (order and values) against local Paddle Inference predictions.
"""
from __future__ import annotations

import os
import subprocess

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_base.serving_config import ConfigError
from distill_reader import DistillReader
from distill_reader.errors import TeacherAnswerInvalid
from distill_reader.feeds import FeedError
from tests.support.procs import REPO_ROOT, ProcessGuard, free_port, pid_alive, wait_for
from tests.support.teacher import TeacherServer, grpc_health, mnist_like_images, reference_predict

N = 75   # samples per epoch: uneven for every batch size used below


@pytest.fixture(scope="module")
def two_teachers(teacher_model):
    with TeacherServer(teacher_model.server_dir) as a, TeacherServer(teacher_model.server_dir) as b:
        yield [a.endpoint, b.endpoint]


@pytest.fixture(scope="module")
def data(teacher_model):
    images = mnist_like_images(N, seed=5)
    return images, reference_predict(teacher_model.server_dir, images)


def _reader(teacher_model, endpoints, ins=("img", "label"), **options) -> DistillReader:
    dr = DistillReader(ins=list(ins), predicts=["prediction"], **options)
    dr.set_fixed_teacher(endpoints)
    dr.set_serving_conf_file(teacher_model.client_conf)
    return dr


def _check_samples(out, images, ref, flat=False):
    assert len(out) == len(images)
    for i, sample in enumerate(out):
        assert sample[1] == i, f"sample {i} out of order: label {sample[1]}"
        expected_img = images[i].reshape(-1) if flat else images[i]
        np.testing.assert_array_equal(sample[0], expected_img)
        np.testing.assert_allclose(sample[-1], ref[i], rtol=1e-5, atol=1e-6, err_msg=f"sample {i}")


def test_sample_generator_pass_through_and_reshape(teacher_model, two_teachers, data):
    images, ref = data
    tags = [f"id-{i}" for i in range(N)]

    def samples():   # flat float64 images (reshaped and cast to the feed), an int label, a tag nobody sends
        for i in range(N):
            yield images[i].reshape(-1).astype(np.float64), i, tags[i]

    dr = _reader(teacher_model, two_teachers, ins=("img", "label", None))
    dr.set_teacher_batch_size(7)
    try:
        out = list(dr.set_sample_generator(samples)())
        assert all(len(s) == 4 for s in out)
        assert [s[2] for s in out] == tags and all(s[2] is tags[i] for i, s in enumerate(out))
        assert all(s[0].dtype == np.float64 and s[0].shape == (784,) for s in out)   # inputs untouched
        _check_samples(out, images.astype(np.float64), ref, flat=True)
        assert dr.last_epoch_stats.samples == N and dr.last_epoch_stats.tasks == 11   # ceil(75 / 7)
        assert dr.last_epoch_stats.complete is True
    finally:
        dr.close()


@pytest.mark.parametrize("teacher_batch_size", [1, 7, 32])
def test_sample_list_generator_epochs_and_batch_sizes(teacher_model, two_teachers, data, teacher_batch_size):
    images, ref = data
    list_size = 20   # 20, 20, 20, 15: the last student batch is uneven

    def sample_lists():
        for start in range(0, N, list_size):
            yield [(images[i], i) for i in range(start, min(N, start + list_size))]

    dr = _reader(teacher_model, two_teachers)
    dr.set_teacher_batch_size(teacher_batch_size)
    reader = dr.set_sample_list_generator(sample_lists)
    try:
        pids = None
        for _epoch in range(2):
            lists = list(reader())
            assert [len(b) for b in lists] == [20, 20, 20, 15]
            _check_samples([s for b in lists for s in b], images, ref)
            # a request never crosses a student batch
            expected_tasks = sum(-(-len(b) // teacher_batch_size) for b in lists)
            assert dr.last_epoch_stats.tasks == expected_tasks
            assert len(dr.worker_pids) == 2
            pids = pids or dr.worker_pids
            assert dr.worker_pids == pids, "workers must persist across epochs"
        assert set(dr.last_epoch_stats.teachers) == set(two_teachers), "both teachers take requests"
    finally:
        dr.close()


@pytest.mark.parametrize("teacher_batch_size", [7, 32])
def test_batch_generator_stacks_predictions(teacher_model, two_teachers, data, teacher_batch_size):
    images, ref = data
    sizes = [32, 32, 11]

    def batches():
        start = 0
        for size in sizes:
            yield images[start:start + size], np.arange(start, start + size).reshape(-1, 1)
            start += size

    dr = _reader(teacher_model, two_teachers)
    dr.set_teacher_batch_size(teacher_batch_size)
    try:
        out = list(dr.set_batch_generator(batches)())
        assert isinstance(out[0], tuple) and len(out[0]) == 3
        assert [len(b[0]) for b in out] == sizes and [b[2].shape for b in out] == [(s, 10) for s in sizes]
        np.testing.assert_array_equal(np.concatenate([b[1] for b in out]).ravel(), np.arange(N))
        np.testing.assert_allclose(np.concatenate([b[2] for b in out]), ref, rtol=1e-5, atol=1e-6)
    finally:
        dr.close()


def test_paddle_dataloader_and_dygraph(teacher_model, two_teachers, data):
    """The wrapped reader plugs into paddle.base.io.DataLoader.from_generator (dygraph), as in the seed."""
    import paddle

    images, ref = data

    def sample_lists():
        for start in range(0, N, 25):
            yield [(images[i], np.array([i], dtype="int64")) for i in range(start, start + 25)]

    dr = _reader(teacher_model, two_teachers)
    dr.set_teacher_batch_size(8)
    try:
        paddle.disable_static()
        loader = paddle.base.io.DataLoader.from_generator(capacity=4, return_list=True)
        loader.set_sample_list_generator(dr.set_sample_list_generator(sample_lists), paddle.CPUPlace())
        for _epoch in range(2):
            got_labels, got_preds = [], []
            for img, label, prediction in loader():
                assert list(img.shape) == [25, 1, 28, 28]
                got_labels.append(label.numpy().ravel())
                got_preds.append(prediction.numpy())
            np.testing.assert_array_equal(np.concatenate(got_labels), np.arange(N))
            np.testing.assert_allclose(np.concatenate(got_preds), ref, rtol=1e-5, atol=1e-6)
        batch_loader = paddle.base.io.DataLoader.from_generator(capacity=4, return_list=True)
        batch_loader.set_batch_generator(dr.set_batch_generator(
            lambda: ((images[i:i + 15], np.arange(i, i + 15).reshape(-1, 1)) for i in range(0, N, 15))),
            paddle.CPUPlace())
        got = [(label.numpy().ravel(), prediction.numpy()) for _img, label, prediction in batch_loader()]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), np.arange(N))
        np.testing.assert_allclose(np.concatenate([g[1] for g in got]), ref, rtol=1e-5, atol=1e-6)
        # use_multiprocess=True runs the reader in a forked child: it starts workers of its own and leaves the
        # parent's alone
        parent_workers = dr.worker_pids
        fork_loader = paddle.base.io.DataLoader.from_generator(capacity=4, return_list=True, use_multiprocess=True)
        fork_loader.set_sample_list_generator(dr.set_sample_list_generator(sample_lists), paddle.CPUPlace())
        got = [(label.numpy().ravel(), prediction.numpy()) for _img, label, prediction in fork_loader()]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), np.arange(N))
        np.testing.assert_allclose(np.concatenate([g[1] for g in got]), ref, rtol=1e-5, atol=1e-6)
        assert dr.worker_pids == parent_workers and all(pid_alive(p) for p in parent_workers)
    finally:
        dr.close()


def test_http_protocol(teacher_model, teacher_server, data):
    """protocol="http" talks to the teacher's HTTP front (Paddle Serving's HttpClient wire format)."""
    images, ref = data
    dr = _reader(teacher_model, [teacher_server.http_endpoint], protocol="http")
    dr.set_teacher_batch_size(16)
    try:
        out = list(dr.set_batch_generator(lambda: iter([(images, np.arange(N))]))())
        np.testing.assert_allclose(out[0][2], ref, rtol=1e-5, atol=1e-6)
        assert dr.last_epoch_stats.tasks == 5 and list(dr.last_epoch_stats.teachers) == [teacher_server.http_endpoint]
    finally:
        dr.close()


def test_bad_inputs_and_config_errors(teacher_model, two_teachers, data):
    images, _ = data
    dr = _reader(teacher_model, two_teachers)
    try:
        with pytest.raises(FeedError, match=r"feed 'img'.*783 elements.*\[1, 28, 28\]"):
            list(dr.set_sample_generator(lambda: iter([(np.zeros(783, "float32"), 0)]))())
        unknown = DistillReader(ins=["img"], predicts=["logits"])
        unknown.set_fixed_teacher(two_teachers)
        unknown.set_serving_conf_file(teacher_model.client_conf)
        with pytest.raises(ConfigError, match=r"unknown fetch 'logits'.*\['prediction'\]"):
            list(unknown.set_batch_generator(lambda: iter([(images[:2],)]))())
        no_feed = DistillReader(ins=["image", "label"], predicts=["prediction"])
        no_feed.set_fixed_teacher(two_teachers)
        no_feed.set_serving_conf_file(teacher_model.client_conf)
        with pytest.raises(ConfigError, match=r"feed\(s\) \['img'\] are not among ins"):
            list(no_feed.set_batch_generator(lambda: iter([(images[:2], np.zeros(2))]))())
        # labels and predictions would part: a label slot shorter than the images, a sample with an extra slot
        with pytest.raises(RuntimeError, match=r"batch 1 of this epoch: slot 1 \('label'\) has 3 rows, slot 0 "
                                               r"\('img'\) has 4"):
            list(dr.set_batch_generator(lambda: iter([(images[:4], np.arange(4)), (images[:4], np.arange(3))]))())
        with pytest.raises(RuntimeError, match=r"a sample has 3 slot\(s\), ins names 2"):
            list(dr.set_sample_generator(lambda: iter([(images[0], 0), (images[1], 1, "extra")]))())
        with pytest.raises(ValueError, match="not 'host:port'"):
            dr.set_fixed_teacher("localhost")
    finally:
        dr.close()


@pytest.mark.parametrize("bad", ["missing", "batch"])
def test_bad_answer_names_the_teacher(teacher_model, bad):
    """A teacher answering without the fetch, or with the wrong batch length: an error naming it.

    The misbehaving teacher is the benchmark's protocol-compatible fake (a real server cannot be made to lie);
    the reader, its workers and the client are real.
    """
    port = free_port()
    fake = os.path.join(REPO_ROOT, "benchmarks", "fake_teacher.py")
    with ProcessGuard() as guard:
        guard.python(fake, "--port", str(port), "--latency_ms", "1", "--bad", bad,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"127.0.0.1:{port}"
        wait_for(lambda: grpc_health(endpoint) == "SERVING", 30, "fake teacher")
        dr = _reader(teacher_model, [endpoint])
        images = mnist_like_images(8)
        try:
            with pytest.raises(TeacherAnswerInvalid) as info:
                list(dr.set_batch_generator(lambda: iter([(images, np.zeros(8))]))())
            assert info.value.endpoint == endpoint and endpoint in str(info.value)
            assert ("lacks fetch 'prediction'" if bad == "missing" else "expected a batch of 8") in str(info.value)
            wait_for(lambda: not dr.worker_pids, 5, "workers stopped after the error")
        finally:
            dr.close()


def test_reader_needs_a_teacher(teacher_model):
    dr = DistillReader(ins=["img"], predicts=["prediction"])
    dr.set_serving_conf_file(teacher_model.client_conf)
    with pytest.raises(RuntimeError, match="set_fixed_teacher"):
        next(dr.set_batch_generator(lambda: iter([]))())


def test_a_new_epoch_supersedes_an_unfinished_one(teacher_model, two_teachers, data):
    """Paddle's loader may start the next epoch while the old generator is still alive: the old one stops with a
    clear error, the new one delivers everything, and the workers are shared."""
    images, ref = data
    dr = _reader(teacher_model, two_teachers)
    reader = dr.set_batch_generator(lambda: ((images[i:i + 5], np.arange(i, i + 5)) for i in range(0, N, 5)))
    try:
        old = reader()
        next(old)
        pids = dr.worker_pids
        new = list(reader())
        np.testing.assert_allclose(np.concatenate([b[2] for b in new]), ref, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="abandoned: a newer epoch started"):
            next(old)
        assert dr.worker_pids == pids
        assert len(list(reader())) == N // 5
    finally:
        dr.close()


def test_large_requests_travel_in_shared_memory(teacher_model, two_teachers):
    """Tasks of 1 MiB or more go to the workers through reused shared memory blocks, not the socket."""
    from distill_reader import workers

    images = mnist_like_images(1000, seed=9)
    ref = reference_predict(teacher_model.server_dir, images)
    per_task = 400   # 400 x 3136 bytes = 1.25 MB >= SHARED_MEMORY_THRESHOLD; the 200-sample rest is pickled
    assert per_task * images[0].nbytes >= workers.SHARED_MEMORY_THRESHOLD > 200 * images[0].nbytes
    dr = _reader(teacher_model, two_teachers)
    dr.set_teacher_batch_size(per_task)
    reader = dr.set_batch_generator(lambda: ((images[i:i + 500], np.arange(i, i + 500)) for i in range(0, 1000, 500)))
    try:
        for _epoch in range(2):
            out = list(reader())
            np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), np.arange(1000))
            np.testing.assert_allclose(np.concatenate([b[2] for b in out]), ref, rtol=1e-5, atol=1e-6)
        handles = dr._resources.remote_stage().workers.workers
        buffers = [b for w in handles for b in w.buffers.values()]
        # free, or held by a request still out (a hedge's slower copy may outlive its epoch: its buffer is
        # released when it ends; seen once in CI under load), never by a request that has ended
        assert buffers and len(buffers) <= 4, len(buffers)
        assert all(b.task_id is None or b.task_id in w.outstanding for w in handles for b in w.buffers.values())
    finally:
        dr.close()
