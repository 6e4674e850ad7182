"""Generators that reuse one buffer (``buf[:] = X[i]; yield buf, i``, as many data libraries do for speed).

The reader reads ahead of the student (tasks in flight, the reorder buffer), so it must never keep a reference to
the user's memory past the generator's next step: every slot is copied when read. Checked through a real reader
with real teachers in all three generator kinds, in offline-cache mode, and through the Pantheon teacher.
"""
from __future__ import annotations

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_reader import DistillReader
from tests.support.teacher import mnist_like_images, reference_predict

N, BATCH = 64, 16


@pytest.fixture(scope="module")
def data(teacher_model):
    images = mnist_like_images(N, seed=11)
    return images, reference_predict(teacher_model.server_dir, images)


def _reader(teacher_model, endpoints) -> DistillReader:
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], per_teacher_in_flight=1)
    dr.set_fixed_teacher(endpoints)
    dr.set_serving_conf_file(teacher_model.client_conf)
    dr.set_teacher_batch_size(4)
    return dr


def reused_samples(images):
    buf = np.empty_like(images[0])
    for i in range(len(images)):
        buf[:] = images[i]
        yield buf, i


def reused_sample_lists(images):
    rows = np.empty((BATCH, *images.shape[1:]), images.dtype)   # one array; each sample a row of it
    for start in range(0, len(images), BATCH):
        rows[:] = images[start:start + BATCH]
        yield [(rows[k], start + k) for k in range(BATCH)]


def reused_batches(images):
    buf = np.empty((BATCH, *images.shape[1:]), images.dtype)
    labels = np.empty(BATCH, np.int64)
    for start in range(0, len(images), BATCH):
        buf[:] = images[start:start + BATCH]
        labels[:] = np.arange(start, start + BATCH)
        yield buf, labels


def _wrong_items(samples, images, ref):
    """(wrong inputs, wrong predictions) among ``samples``, each (img, label, prediction)."""
    inputs = sum(not np.array_equal(s[0], images[s[1]]) for s in samples)
    predictions = sum(not np.allclose(s[2], ref[s[1]], rtol=1e-5, atol=1e-6) for s in samples)
    return inputs, predictions


def _as_samples(kind, out):
    if kind == "sample":
        return out
    if kind == "sample_list":
        return [s for sample_list in out for s in sample_list]
    return [(img, int(label), pred) for img, labels, pred in out for img, label, pred in zip(img, labels, pred)]


GENERATORS = {"sample": ("set_sample_generator", reused_samples),
              "sample_list": ("set_sample_list_generator", reused_sample_lists),
              "batch": ("set_batch_generator", reused_batches)}


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_reused_buffer_generator_gives_no_wrong_item(teacher_model, teacher, data, kind):
    images, ref = data
    setter, generator = GENERATORS[kind]
    dr = _reader(teacher_model, [teacher.endpoint])
    try:
        out = list(getattr(dr, setter)(lambda: generator(images))())
        samples = _as_samples(kind, out)
        assert sorted(s[1] for s in samples) == list(range(N))
        assert _wrong_items(samples, images, ref) == (0, 0)
    finally:
        dr.close()


@pytest.mark.parametrize("kind", ["sample", "batch"])
def test_reused_buffer_into_the_offline_cache(teacher_model, teacher, data, kind, tmp_path):
    """The writing pass stores answers for the right inputs; the replay pass checks the inputs' digests."""
    images, ref = data
    setter, generator = GENERATORS[kind]
    for passes in range(2):   # write, then replay from the cache
        dr = _reader(teacher_model, [teacher.endpoint])
        dr.set_offline_cache(tmp_path / "cache")
        try:
            samples = _as_samples(kind, list(getattr(dr, setter)(lambda: generator(images))()))
            assert _wrong_items(samples, images, ref) == (0, 0), f"pass {passes}"
        finally:
            dr.close()


PANTHEON_KINDS = {
    "sample_generator": lambda xs: {"sample_generator": lambda: ((row,) for row in _reused_rows(xs)), "batch_size": 8},
    "batch_generator": lambda xs: {"batch_generator": lambda: ([b] for b in _reused_rows(xs, 8))},
}


def _reused_rows(xs, rows=1):
    buf = np.empty((rows, xs.shape[1]), xs.dtype)
    for start in range(0, len(xs), rows):
        buf[:] = xs[start:start + rows]
        yield buf[0] if rows == 1 else buf


@pytest.mark.parametrize("kind", list(PANTHEON_KINDS))
def test_reused_buffer_through_the_pantheon_offline_teacher(tmp_path, kind):
    import paddle

    from distill_reader.pantheon import Teacher
    from distill_reader.pantheon.knowledge_files import OfflineKnowledgeReader

    xs = np.arange(64 * 4, dtype="float32").reshape(64, 4)
    paddle.enable_static()
    try:
        startup, program = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(program, startup):
            x = paddle.static.data(name="x", shape=[-1, 4], dtype="float32")
            y = x * 2.0
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        with Teacher(out_path=tmp_path / "knowledge") as teacher:
            teacher.start()
            teacher.start_knowledge_service(feed_list=[x], schema={"x": x, "y": y}, program=program,
                                            reader_config=PANTHEON_KINDS[kind](xs), exe=exe, buf_size=4)
    finally:
        paddle.disable_static()
    reader = OfflineKnowledgeReader(tmp_path / "knowledge")
    try:
        batches = list(reader.batches())
    finally:
        reader.close()
    got_x = np.concatenate([b["x"] for b in batches])
    got_y = np.concatenate([b["y"] for b in batches])
    wrong = int(((got_x != xs) | (got_y != 2 * xs)).any(axis=1).sum())
    assert got_x.shape == xs.shape and wrong == 0, f"{wrong} of {len(xs)} samples wrong"


def test_snapshot_copies_arrays_and_tensors_keeps_types():
    import collections

    import paddle

    from distill_reader.snapshot import snapshot

    Pair = collections.namedtuple("Pair", "img label")
    buf, ragged, tensor = np.zeros(3), [np.zeros(2), np.ones(1)], paddle.zeros([2])
    kept = snapshot((Pair(buf, 7), ragged, tensor, "tag"))
    buf[:] = 5
    ragged[0][:] = 5
    tensor.set_value(np.full(2, 5, "float32"))
    assert type(kept[0]) is Pair and kept[0].img.sum() == 0 and kept[0].label == 7
    assert isinstance(kept[1], list) and kept[1][0].sum() == 0
    assert isinstance(kept[2], paddle.Tensor) and float(kept[2].sum()) == 0
    assert kept[3] == "tag"
