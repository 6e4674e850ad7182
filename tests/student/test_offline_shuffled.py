"""The knowledge cache read in any order: a shuffled paddle.io.DataLoader over a cache gets each sample's own soft
labels in every epoch (compared with the teacher's own predictions), duplicates included, against a real teacher."""
from __future__ import annotations

import numpy as np  # noqa: I001  (numpy before paddle)
import paddle
import pytest

from distill_reader import DistillReader
from distill_reader.knowledge import InputMismatchError, KnowledgeReader
from tests.support.teacher import mnist_like_images, reference_predict

N = 100
DUPLICATES = {50: 3, 77: 3, 99: 10}   # sample -> the earlier sample whose inputs it repeats


@pytest.fixture(scope="module")
def data(teacher_model):
    images = mnist_like_images(N, seed=21)
    for copy, original in DUPLICATES.items():
        images[copy] = images[original]
    return images, reference_predict(teacher_model.server_dir, images)


class Images(paddle.io.Dataset):
    def __init__(self, images):
        super().__init__()
        self.images = images

    def __getitem__(self, i):
        return self.images[i], np.int64(i)

    def __len__(self):
        return len(self.images)


def _loader(images, shuffle=True, drop_last=False, batch_size=16):
    paddle.disable_static()
    return paddle.io.DataLoader(Images(images), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                return_list=True)


def _reader(teacher_model, cache, endpoint=None) -> DistillReader:
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], all_teachers_down_timeout=20, num_workers=1)
    if endpoint:
        dr.set_fixed_teacher(endpoint)
    dr.set_serving_conf_file(teacher_model.client_conf)
    dr.set_teacher_batch_size(8)
    dr.set_offline_cache(str(cache), shard_samples=32)
    return dr


def _epoch(dr, loader):
    """(sample indices in the order seen, soft labels) of one epoch of ``loader`` through ``dr``."""
    labels, preds = [], []
    for batch in dr.set_batch_generator(loader)():
        labels.append(np.asarray(batch[1]).reshape(-1))
        preds.append(np.asarray(batch[-1]))
    return np.concatenate(labels), np.concatenate(preds)


def _wrong(labels, preds, expected) -> int:
    """Soft labels that are not the teacher's own prediction for that sample (values, or argmax)."""
    close = np.all(np.isclose(preds, expected[labels], rtol=1e-5, atol=1e-6), axis=1)
    same_top = preds.argmax(axis=1) == expected[labels].argmax(axis=1)
    return int(np.sum(~(close & same_top)))


def test_shuffled_dataloader_over_an_ordered_cache_gets_every_samples_own_soft_labels(teacher_model, teacher, data,
                                                                                      tmp_path):
    images, expected = data
    assert len({expected[c].tobytes() for c in (3, 50, 77)}) == 1   # duplicates: one input, one prediction
    cache = tmp_path / "cache"
    writer = _reader(teacher_model, cache, teacher.endpoint)
    try:
        labels, preds = _epoch(writer, _loader(images, shuffle=False))   # the cache written in order
        assert np.array_equal(labels, np.arange(N)) and _wrong(labels, preds, expected) == 0
    finally:
        writer.close()
    with KnowledgeReader(cache) as r:
        assert r.complete and r.num_samples == N - len(DUPLICATES)   # identical inputs share one row

    paddle.seed(4)
    no_teacher = _reader(teacher_model, cache)
    try:
        orders = []
        for _ in range(3):
            labels, preds = _epoch(no_teacher, _loader(images))
            stage = no_teacher.last_epoch_stats.stage
            assert stage["cache"] == "read" and stage["cache_served"] == N and stage["cache_by_key"] > N // 2
            assert sorted(labels.tolist()) == list(range(N)) and not np.array_equal(labels, np.arange(N))
            assert _wrong(labels, preds, expected) == 0
            orders.append(labels.tolist())
        assert orders[0] != orders[1]   # really another order every epoch
        labels, preds = _epoch(no_teacher, _loader(images, drop_last=True))   # a subset: fine as well
        assert len(labels) == N // 16 * 16 and _wrong(labels, preds, expected) == 0
        unknown = images.copy()
        unknown[42] += 0.25
        with pytest.raises(InputMismatchError, match=r"no knowledge for sample \d+ of this pass"):
            _epoch(no_teacher, _loader(unknown))
    finally:
        no_teacher.close()


def test_shuffled_first_pass_interrupted_then_resumed_in_another_order(teacher_model, teacher, data, tmp_path):
    images, expected = data
    cache = tmp_path / "cache"
    paddle.seed(8)
    dr = _reader(teacher_model, cache, teacher.endpoint)
    try:
        for i, _ in enumerate(dr.set_batch_generator(_loader(images))()):
            if i == 3:
                break   # an interrupted shuffled first pass: its committed shards stay
        with KnowledgeReader(cache) as r:
            kept = r.num_samples
        assert not r.complete and kept >= 32
        labels, preds = _epoch(dr, _loader(images))   # another order: cached samples served, the rest asked
        stage = dr.last_epoch_stats.stage
        assert stage["cache"] == "write" and stage["cache_served"] < N and _wrong(labels, preds, expected) == 0
        labels, preds = _epoch(dr, _loader(images))
        assert dr.last_epoch_stats.stage["cache"] == "read" and _wrong(labels, preds, expected) == 0
    finally:
        dr.close()
    with KnowledgeReader(cache) as r:
        assert r.complete and r.num_samples == N - len(DUPLICATES)   # every distinct input once
