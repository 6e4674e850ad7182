"""DistillReader offline mode against real teacher servers: the first pass writes the knowledge cache, later passes
and later processes read it with no teacher; a SIGKILLed writer is resumed; changed inputs are refused."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_reader import DistillReader
from distill_reader.knowledge import InputMismatchError, KnowledgeError, KnowledgeReader
from distill_reader.offline_cache import OfflineCacheError
from tests.support.procs import REPO_ROOT, ProcessGuard, wait_for
from tests.support.teacher import TeacherServer, mnist_like_images, reference_predict

N = 90          # samples per pass: uneven for the batch size 16 and teacher batch size 8 used below
BATCH = 16


@pytest.fixture(scope="module")
def data(teacher_model, teacher):
    """Images and the online answers of a plain DistillReader pass (what a cache must reproduce bit for bit)."""
    images = mnist_like_images(N, seed=11)
    dr = _reader(teacher_model, teacher.endpoint)
    try:
        online = np.concatenate([b[-1] for b in dr.set_batch_generator(_batches(images))()])
    finally:
        dr.close()
    np.testing.assert_allclose(online, reference_predict(teacher_model.server_dir, images), rtol=1e-5, atol=1e-6)
    return images, online


def _reader(teacher_model, endpoint=None, cache=None, conf=None, **cache_options) -> DistillReader:
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], all_teachers_down_timeout=20, num_workers=1)
    if endpoint:
        dr.set_fixed_teacher(endpoint)
    dr.set_serving_conf_file(conf or teacher_model.client_conf)
    dr.set_teacher_batch_size(8)
    if cache:
        dr.set_offline_cache(str(cache), **cache_options)
    return dr


def _batches(images, count=None):
    count = len(images) if count is None else count

    def gen():
        for lo in range(0, count, BATCH):
            hi = min(lo + BATCH, count)
            yield images[lo:hi], np.arange(lo, hi, dtype=np.int64)
    return gen


def _samples(images):
    def gen():
        for i in range(len(images)):
            yield images[i], i
    return gen


def _sample_lists(images):
    def gen():
        for lo in range(0, len(images), BATCH):
            yield [(images[i], i) for i in range(lo, min(lo + BATCH, len(images)))]
    return gen


def _one_pass(dr, kind, images):
    """Run one epoch of ``kind``; return (labels, predictions) flattened to samples."""
    if kind == "sample":
        out = list(dr.set_sample_generator(_samples(images))())
        return np.array([s[1] for s in out]), np.stack([s[-1] for s in out])
    if kind == "sample_list":
        out = [s for lst in dr.set_sample_list_generator(_sample_lists(images))() for s in lst]
        return np.array([s[1] for s in out]), np.stack([s[-1] for s in out])
    out = list(dr.set_batch_generator(_batches(images))())
    return np.concatenate([b[1] for b in out]), np.concatenate([b[-1] for b in out])


def _half_rounded(values: np.ndarray) -> np.ndarray:
    """IEEE 754 binary16 round-to-nearest-even of every value, by CPython's ``struct`` 'e' format (its own
    implementation, independent of NumPy's float16 cast that the knowledge files use), back as float32."""
    flat = [struct.unpack("<e", struct.pack("<e", float(v)))[0] for v in values.ravel()]
    return np.array(flat, dtype=np.float64).astype(np.float32).reshape(values.shape)


def test_half_rounding_reference():
    """The reference itself: exact halves, ties to even, subnormals, and the largest finite half."""
    got = _half_rounded(np.array([1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -24, 3 * 2 ** -25, 65504.0, 0.1],
                                 dtype=np.float32))
    want = [1.0, 1.0, 1 + 2 ** -9, 2 ** -24, 2 ** -23, 65504.0, 0.0999755859375]
    assert got.tolist() == want


@pytest.mark.parametrize("kind", ["sample", "sample_list", "batch"])
def test_first_pass_writes_later_passes_read_bit_for_bit(teacher_model, teacher, data, tmp_path, kind):
    images, online = data
    cache = tmp_path / "cache"
    dr = _reader(teacher_model, teacher.endpoint, cache, shard_samples=32)
    try:
        labels, preds = _one_pass(dr, kind, images)
        stage = dr.last_epoch_stats.stage
        assert stage["cache"] == "write" and stage["requests"] == 12 and stage["cache_served"] == 0  # 90 = 5x(8+8)+8+2
        assert np.array_equal(labels, np.arange(N)) and preds.tobytes() == online.tobytes()
        for _ in range(2):   # later passes: from the cache, no request
            labels, preds = _one_pass(dr, kind, images)
            stage = dr.last_epoch_stats.stage
            assert stage["cache"] == "read" and "requests" not in stage and stage["cache_served"] == N
            assert np.array_equal(labels, np.arange(N)) and preds.tobytes() == online.tobytes()
    finally:
        dr.close()
    with KnowledgeReader(cache) as r:
        assert r.complete and r.num_samples == N and [s.stop - s.start for s in r.shards] == [32, 32, 26]
        assert r.read(0, N)["prediction"].tobytes() == online.tobytes()
        assert r.meta["predicts"] == ["prediction"] and "feed_var" in r.meta["serving_config"]


def test_float16_and_topk_storage_every_pass_sees_the_stored_answers(teacher_model, teacher, data, tmp_path):
    images, online = data
    order = np.argsort(-online, axis=1, kind="stable")[:, :3]
    topk = np.zeros_like(online)
    np.put_along_axis(topk, order, np.take_along_axis(online, order, axis=1), axis=1)
    expected = {"float16": _half_rounded(online), "topk:3": topk}
    for storage, want in expected.items():
        dr = _reader(teacher_model, teacher.endpoint, tmp_path / storage.replace(":", "_"), storage=storage)
        try:
            for mode in ("write", "read"):
                labels, preds = _one_pass(dr, "sample_list", images)
                assert dr.last_epoch_stats.stage["cache"] == mode
                assert preds.dtype == np.float32 and np.array_equal(preds, want), (storage, mode)
        finally:
            dr.close()
    np.testing.assert_allclose(expected["float16"], online, rtol=2 ** -11)
    assert np.count_nonzero(expected["float16"] != online) > online.size // 2  # the rounding is really exercised
    with KnowledgeReader(tmp_path / "topk_3", topk_as="sparse") as r:
        assert r.description["prediction"].storage_label() == "topk:3:0.0"
        assert np.array_equal(r.read(0, N)["prediction"].indices, order)


_READER_CHILD = r"""
import json, sys, time
import numpy as np
from distill_reader import DistillReader
cache, out, conf = sys.argv[1], sys.argv[2], sys.argv[3]
endpoint = sys.argv[4] if len(sys.argv) > 4 else None
slow = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
images = np.load(sys.argv[2] + ".images.npy", allow_pickle=False)
dr = DistillReader(ins=["img", "label"], predicts=["prediction"], all_teachers_down_timeout=20, num_workers=1)
if endpoint:
    dr.set_fixed_teacher(endpoint)
if conf != "-":
    dr.set_serving_conf_file(conf)
dr.set_teacher_batch_size(8)
dr.set_offline_cache(cache, shard_samples=16)
def batches():
    for lo in range(0, len(images), 16):
        yield images[lo:lo + 16], np.arange(lo, min(lo + 16, len(images)))
        time.sleep(slow)
preds = [b[-1] for b in dr.set_batch_generator(batches)()]
np.save(out, np.concatenate(preds), allow_pickle=False)
print(json.dumps({"stage": dr.last_epoch_stats.stage, "workers": dr.worker_pids}), flush=True)
dr.close()
"""


def _run_child(guard, cache, out, conf, *extra, **popen):
    return guard.python("-c", _READER_CHILD, str(cache), str(out), conf, *extra, env={"PYTHONPATH": REPO_ROOT},
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_second_process_reads_with_every_teacher_stopped(teacher_model, data, tmp_path):
    images, online = data
    cache, out = tmp_path / "cache", tmp_path / "preds.npy"
    np.save(str(out) + ".images.npy", images, allow_pickle=False)
    with TeacherServer(teacher_model.server_dir) as own:
        dr = _reader(teacher_model, own.endpoint, cache)
        try:
            assert np.array_equal(_one_pass(dr, "batch", images)[1], online)
        finally:
            dr.close()
    assert not own.alive()
    with ProcessGuard() as guard:   # no teacher, and no serving conf file either: the cache carries the config
        child = _run_child(guard, cache, out, str(tmp_path / "no_such_conf.prototxt"))
        stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.splitlines()[-1])
    assert report["stage"]["cache"] == "read" and report["stage"]["cache_served"] == N and report["workers"] == []
    assert np.load(out, allow_pickle=False).tobytes() == online.tobytes()
    # No conf file given, and another model's config at the default path: the cache's own config is used.
    other = tmp_path / "cwd" / "serving_client"
    other.mkdir(parents=True)
    text = open(os.path.join(teacher_model.client_dir, "serving_client_conf.prototxt")).read()
    (other / "serving_client_conf.prototxt").write_text(text.replace('"img"', '"image"'))
    os.remove(out)
    with ProcessGuard() as guard:
        child = _run_child(guard, cache, out, "-", cwd=str(tmp_path / "cwd"))
        stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr[-3000:]
    assert np.load(out, allow_pickle=False).tobytes() == online.tobytes()


def _committed(path) -> int:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f)["num_samples"]
    except FileNotFoundError:
        return 0


def test_sigkilled_writer_then_new_run_completes_every_sample_once(teacher_model, teacher, data, tmp_path):
    images, online = data
    cache, out = tmp_path / "cache", tmp_path / "preds.npy"
    np.save(str(out) + ".images.npy", images, allow_pickle=False)
    conf = teacher_model.client_conf
    with ProcessGuard() as guard:
        first = _run_child(guard, cache, out, conf, teacher.endpoint, "0.3")
        wait_for(lambda: _committed(cache) >= 32 or first.poll() is not None, 60, "two committed shards")
        assert first.poll() is None, first.stderr.read()[-3000:]
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        kept = _committed(cache)
        assert kept % 16 == 0 and 32 <= kept < N
        second = _run_child(guard, cache, out, conf, teacher.endpoint)
        stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr[-3000:]
    stage = json.loads(stdout.splitlines()[-1])["stage"]
    # the second run served the committed samples from the cache and asked the teacher only for the rest
    assert stage["cache"] == "write" and stage["cache_served"] == kept
    assert stage["requests"] == (N - kept) // 16 * 2 + 2 and stage["retries"] == 0
    assert np.load(out, allow_pickle=False).tobytes() == online.tobytes()
    with KnowledgeReader(cache) as r:
        assert r.complete and r.num_samples == N and r.verify() == r.nbytes
        assert r.read(0, N)["prediction"].tobytes() == online.tobytes()   # every sample once, in order, correct
        assert [(s.start, s.stop) for s in r.shards] == [(lo, min(lo + 16, N)) for lo in range(0, N, 16)]


def test_changed_inputs_and_missing_teachers_are_errors(teacher_model, teacher, data, tmp_path):
    images, online = data
    cache = tmp_path / "cache"
    dr = _reader(teacher_model, teacher.endpoint, cache)
    try:
        _one_pass(dr, "batch", images)
    finally:
        dr.close()

    changed = images.copy()
    changed[37, 0, 5, 5] += 0.5
    no_teacher = _reader(teacher_model, None, cache)
    try:
        with pytest.raises(InputMismatchError, match=r"no knowledge for sample 37 of this pass \(1 of samples "
                                                     r"\[32, 40\)") as info:
            list(no_teacher.set_batch_generator(_batches(changed))())
        assert info.value.sample == 37
        # keyed by inputs: a subset, and repeated samples, are served, each sample its own knowledge
        assert _one_pass(no_teacher, "batch", images[:80])[1].tobytes() == online[:80].tobytes()
        longer = np.concatenate([images, images[:10]])
        assert _one_pass(no_teacher, "batch", longer)[1].tobytes() == np.concatenate([online, online[:10]]).tobytes()
        with pytest.raises(InputMismatchError, match=r"no knowledge for sample 90 of this pass"):
            list(no_teacher.set_batch_generator(_batches(np.concatenate([images, changed[37:38]])))())
        labels, preds = _one_pass(no_teacher, "sample", images)   # the right data still reads fine
        assert preds.tobytes() == online.tobytes() and no_teacher.worker_pids == []
    finally:
        no_teacher.close()
    by_position = _reader(teacher_model, None, cache, check_inputs=False)   # unchecked: read by position
    try:
        with pytest.raises(KnowledgeError, match=f"holds {N} samples but this pass had 80"):
            list(by_position.set_batch_generator(_batches(images, 80))())
        with pytest.raises(KnowledgeError, match=rf"holds {N} samples, but this pass has more"):
            list(by_position.set_batch_generator(_batches(longer))())
        assert _one_pass(by_position, "batch", images)[1].tobytes() == online.tobytes()
    finally:
        by_position.close()

    partial = tmp_path / "partial"
    dr = _reader(teacher_model, teacher.endpoint, partial, shard_samples=16)
    try:
        for i, _ in enumerate(dr.set_batch_generator(_batches(images))()):
            if i == 3:
                break   # an interrupted first pass: 64 samples read, the committed ones stay
    finally:
        dr.close()
    with KnowledgeReader(partial) as r:
        assert not r.complete and r.num_samples >= 32
    no_teacher = _reader(teacher_model, None, partial)
    try:
        with pytest.raises(OfflineCacheError, match="incomplete .* needs teachers"):
            list(no_teacher.set_batch_generator(_batches(images))())
    finally:
        no_teacher.close()
    resumed = _reader(teacher_model, teacher.endpoint, partial, shard_samples=16)
    try:
        # resuming with other data: what the cache lacks (the changed sample 5 and the rest) is asked and added
        other = images.copy()
        other[5] = 0
        preds = _one_pass(resumed, "batch", other)[1]
        assert resumed.last_epoch_stats.stage["cache"] == "write"
        np.testing.assert_allclose(preds[5:6], reference_predict(teacher_model.server_dir, other[5:6]),
                                   rtol=1e-5, atol=1e-6)
        assert np.array_equal(np.delete(preds, 5, axis=0), np.delete(online, 5, axis=0))
        assert np.array_equal(_one_pass(resumed, "batch", images)[1], online)   # both inputs of sample 5 held
        assert resumed.last_epoch_stats.stage["cache"] == "read"
    finally:
        resumed.close()
    with KnowledgeReader(partial) as r:
        assert r.complete and r.num_samples == N + 1
