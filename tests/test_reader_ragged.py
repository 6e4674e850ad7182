"""DistillReader with ragged (variable-length) samples against real LoD and padded teacher servers: the three
generator kinds, ragged pass-through slots untouched, the i-th sample gets its own pooled and per-token
predictions, a ragged slot for a fixed-shape feed is an error naming the slot and the sample, a teacher SIGKILLed
mid-epoch loses nothing, and the offline cache stores fixed-shape knowledge of ragged inputs and refuses
variable-length knowledge naming the predict."""
from __future__ import annotations

import signal

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_reader import DistillReader
from distill_reader.knowledge.errors import InputMismatchError
from distill_reader.offline import OfflineCacheError
from distill_reader.pipeline import DistillReaderError
from tests.support import lod_models
from tests.support.lod_models import lod_teacher, padded_teacher  # noqa: F401  (fixtures)
from tests.support.teacher import TeacherServer

N = 41
TOL = {"rtol": 1e-5, "atol": 1e-6}
PREDICTS = ["prediction", "token_prediction"]


@pytest.fixture(scope="module")
def lod_servers(lod_teacher):  # noqa: F811
    with TeacherServer(lod_teacher.server_dir) as a, TeacherServer(lod_teacher.server_dir) as b:
        yield [a.endpoint, b.endpoint]


@pytest.fixture(scope="module")
def data(lod_teacher):  # noqa: F811
    words = lod_models.ragged_sequences(N, seed=21)
    extra = [list(range(i % 5)) for i in range(N)]       # a ragged student-only slot (token lists)
    pooled, tokens = lod_models.lod_reference(lod_teacher.server_dir, words)
    return words, extra, pooled, tokens


def _reader(teacher, endpoints, ins=("words", "label", "extra"), predicts=PREDICTS, **options) -> DistillReader:
    dr = DistillReader(ins=list(ins), predicts=list(predicts), **options)
    dr.set_fixed_teacher(endpoints)
    dr.set_serving_conf_file(teacher.client_conf)
    dr.set_teacher_batch_size(4)
    return dr


def _check(samples, data):
    words, extra, pooled, tokens = data
    assert [s[1] for s in samples] == list(range(N)), "every sample once, in order"
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(s[0], words[i])
        assert s[2] == extra[i], f"pass-through slot of sample {i} changed"
        np.testing.assert_allclose(s[3], pooled[i], **TOL, err_msg=f"sample {i}")
        assert s[4].shape == (len(words[i]), 4), f"sample {i}: {s[4].shape}"
        np.testing.assert_allclose(s[4], tokens[i], **TOL, err_msg=f"sample {i}")


def test_sample_and_sample_list_generators(lod_teacher, lod_servers, data):  # noqa: F811
    words, extra, _, _ = data
    dr = _reader(lod_teacher, lod_servers)
    try:
        samples = dr.set_sample_generator(lambda: ((words[i], i, extra[i]) for i in range(N)))
        _check(list(samples()), data)

        def lists():
            for start in range(0, N, 6):
                yield [(list(words[i]), i, extra[i]) for i in range(start, min(N, start + 6))]   # plain lists too

        out = [s for batch in dr.set_sample_list_generator(lists)() for s in batch]
        _check(out, data)
    finally:
        dr.close()


def test_batch_generator_with_ragged_slots(lod_teacher, lod_servers, data):  # noqa: F811
    words, extra, _, _ = data

    def batches():
        for start in range(0, N, 10):
            idx = range(start, min(N, start + 10))
            yield [words[i] for i in idx], np.array(list(idx)), [extra[i] for i in idx]

    dr = _reader(lod_teacher, lod_servers)
    try:
        out = []
        for batch in dr.set_batch_generator(batches)():
            assert isinstance(batch[2], list) and isinstance(batch[4], list)
            assert batch[3].shape == (len(batch[1]), 3) and len(batch[4]) == len(batch[1])
            out.extend(zip(batch[0], batch[1].tolist(), batch[2], batch[3], batch[4]))
        _check(out, data)
    finally:
        dr.close()


def test_teacher_sigkilled_mid_epoch_every_sample_once_with_its_own_prediction(lod_teacher, data):  # noqa: F811
    words, extra, _, _ = data
    servers = [TeacherServer(lod_teacher.server_dir) for _ in range(3)]
    try:
        for server in servers:
            server.start()
        dr = _reader(lod_teacher, [s.endpoint for s in servers], probe_backoff=0.1, max_probe_backoff=0.5)
        dr.set_teacher_batch_size(2)

        def lists():
            for rep in range(6):   # a longer epoch: the same samples six times
                for start in range(0, N, 3):
                    yield [(words[i], rep * N + i, extra[i]) for i in range(start, min(N, start + 3))]

        out = []
        for step, batch in enumerate(dr.set_sample_list_generator(lists)()):
            out.extend(batch)
            if step == 10:
                servers[1].kill(signal.SIGKILL)
                servers[1].wait_exit(10)
        assert [s[1] for s in out] == list(range(6 * N))
        for rep in range(6):
            _check([(s[0], s[1] - rep * N, *s[2:]) for s in out[rep * N:(rep + 1) * N]], data)
        victim = dr.last_epoch_stats.teachers[servers[1].endpoint]
        assert victim["requests"] >= 1, "the victim served part of the epoch before it was killed"
        assert sum(t["requests"] for t in dr.last_epoch_stats.teachers.values()) > victim["requests"]
        dr.close()
    finally:
        for server in servers:
            server.close()


def test_padded_teacher_and_a_ragged_slot_for_a_fixed_feed(padded_teacher):  # noqa: F811
    words = lod_models.ragged_sequences(N, seed=22)
    lengths = [np.array([len(w)]) for w in words]
    pooled, tokens = lod_models.padded_reference(padded_teacher.server_dir, words)
    with TeacherServer(padded_teacher.server_dir) as server:
        dr = _reader(padded_teacher, [server.endpoint], ins=("words", "length", "label"))
        try:
            out = list(dr.set_sample_generator(lambda: ((words[i], lengths[i], i) for i in range(N)))())
            assert [s[2] for s in out] == list(range(N))
            for i, s in enumerate(out):
                np.testing.assert_allclose(s[3], pooled[i], **TOL, err_msg=f"sample {i}")
                np.testing.assert_allclose(s[4], tokens[i], **TOL, err_msg=f"sample {i}")
            bad = list(lengths)
            bad[6] = np.array([3, 4])
            with pytest.raises(DistillReaderError, match=r"slot 1 \('length'\) of sample 6 has shape \[2\].*"
                                                         r"fixed per-sample shape \[1\]"):
                list(dr.set_sample_generator(lambda: ((words[i], bad[i], i) for i in range(N)))())
            with pytest.raises(DistillReaderError, match=r"slot 1 \('length'\) of sample 6 has shape \[2\]"):
                list(dr.set_batch_generator(lambda: iter([(words[:10], bad[:10], np.arange(10))]))())
            first_bad = [np.array([3, 4])] + list(lengths[1:])   # the wrong one first: compared with another
            with pytest.raises(DistillReaderError, match=r"slot 1 \('length'\) of sample 0 has shape \[2\], "
                                                         r"sample 1 has \[1\]"):
                list(dr.set_sample_generator(lambda: ((words[i], first_bad[i], i) for i in range(N)))())
        finally:
            dr.close()


def test_offline_cache_of_ragged_inputs_and_refusal_of_variable_knowledge(lod_teacher, lod_servers, data,  # noqa: F811
                                                                          tmp_path):
    words, extra, pooled, _ = data
    refused = _reader(lod_teacher, lod_servers)
    refused.set_offline_cache(str(tmp_path / "tokens"))
    with pytest.raises(OfflineCacheError, match=r"predict 'token_prediction' has variable length"):
        list(refused.set_sample_generator(lambda: ((words[i], i, extra[i]) for i in range(N)))())
    refused.close()

    passes = []
    for teachers in (lod_servers, None):
        dr = DistillReader(ins=["words", "label", "extra"], predicts=["prediction"])
        if teachers:
            dr.set_fixed_teacher(teachers)
        dr.set_serving_conf_file(lod_teacher.client_conf)
        dr.set_offline_cache(str(tmp_path / "pooled"))
        passes.append(list(dr.set_sample_generator(lambda: ((words[i], i, extra[i]) for i in range(N)))()))
        if teachers is None:   # the cache notices changed ragged inputs
            changed = [w.copy() for w in words]
            changed[5] = changed[5][:-1] if len(changed[5]) > 1 else np.append(changed[5], 1)
            with pytest.raises(InputMismatchError, match="sample 5"):
                list(dr.set_sample_generator(lambda c=changed: ((c[i], i, extra[i]) for i in range(N)))())
        dr.close()
    for out in passes:
        assert [s[1] for s in out] == list(range(N))
        np.testing.assert_allclose(np.stack([s[3] for s in out]), pooled, **TOL)
    np.testing.assert_array_equal(np.stack([s[3] for s in passes[0]]), np.stack([s[3] for s in passes[1]]))
