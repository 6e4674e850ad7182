"""DistillReader with ragged (variable-length) samples against real LoD and padded teacher servers: the three
generator kinds, ragged pass-through slots untouched, the i-th sample gets its own pooled and per-token
predictions, a ragged slot for a fixed-shape feed is an error naming the slot and the sample, a teacher SIGKILLed
mid-epoch loses nothing, and the offline cache stores fixed-shape knowledge of ragged inputs and refuses
variable-length knowledge naming the predict.

Each of those runs against two teachers (``kind``): the LoD model (paddle 2.x only: PIR has no LoD tensors, so on
paddle 3 it is not collected) and its padded counterpart, the pad-sensitive model, with the reader's
``pad_value`` per feed and ``lengths_feeds`` (its ``length`` feed is no slot: the workers fill it). That model's
answers change with a wrong pad value or length, so the comparison with local Paddle Inference (each sample alone,
unpadded) checks that the options reach every worker; a test shows that the default padding is caught."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_base.serving_config import ConfigError
from distill_reader import DistillReader, PaddingOptionError
from distill_reader.errors import DistillReaderError
from distill_reader.knowledge.errors import InputMismatchError
from distill_reader.offline_cache import OfflineCacheError
from tests.support import lod_models
from tests.support.lod_models import lod_teacher, pad_sensitive_teacher, padded_teacher  # noqa: F401  (fixtures)
from tests.support.teacher import ExportedTeacher, TeacherServer

N = 41
TOL = {"rtol": 1e-5, "atol": 1e-6}
PREDICTS = ["prediction", "token_prediction"]
KINDS = ["lod", "padded"] if lod_models.lod_available() else ["padded"]


@dataclass
class Case:
    """One teacher kind: its samples (``words``, for ``padded`` also ``weights``), the reference answers and
    the reader's slots and options."""

    kind: str
    teacher: ExportedTeacher
    words: list
    extra: list
    pooled: np.ndarray
    tokens: list
    weights: list = field(default_factory=list)

    @property
    def ins(self) -> tuple:
        return ("words", "weights", "label", "extra") if self.weights else ("words", "label", "extra")

    @property
    def options(self) -> dict:
        return dict(lod_models.PAD_SENSITIVE) if self.weights else {}

    def sample(self, i: int, label: int, words=None) -> tuple:
        w = self.words[i] if words is None else words
        return (w, self.weights[i], label, self.extra[i]) if self.weights else (w, label, self.extra[i])

    def batch(self, idx) -> tuple:
        slots = ([self.words[i] for i in idx], np.array(list(idx)), [self.extra[i] for i in idx])
        return (slots[0], [self.weights[i] for i in idx], *slots[1:]) if self.weights else slots


@pytest.fixture(scope="module", params=KINDS)
def case(request) -> Case:
    words = lod_models.ragged_sequences(N, seed=21)
    extra = [list(range(i % 5)) for i in range(N)]       # a ragged student-only slot (token lists)
    if request.param == "lod":
        teacher = request.getfixturevalue("lod_teacher")
        pooled, tokens = lod_models.lod_reference(teacher.server_dir, words)
        return Case("lod", teacher, words, extra, pooled, tokens)
    teacher = request.getfixturevalue("pad_sensitive_teacher")
    weights = lod_models.token_weights(words, seed=21)
    pooled, tokens = lod_models.pad_sensitive_reference(teacher.server_dir, words, weights)
    return Case("padded", teacher, words, extra, pooled, tokens, weights)


@pytest.fixture(scope="module")
def servers(case):
    with TeacherServer(case.teacher.server_dir) as a, TeacherServer(case.teacher.server_dir) as b:
        yield [a.endpoint, b.endpoint]


def _reader(case: Case, endpoints, predicts=PREDICTS, **options) -> DistillReader:
    dr = DistillReader(ins=list(case.ins), predicts=list(predicts), **{**case.options, **options})
    dr.set_fixed_teacher(endpoints)
    dr.set_serving_conf_file(case.teacher.client_conf)
    dr.set_teacher_batch_size(4)
    return dr


def _check(samples, case: Case, n: int = N, label_offset: int = 0):
    """Every sample once, in order, unchanged, with its own pooled and per-token predictions."""
    label = case.ins.index("label")
    first = len(case.ins)
    assert [s[label] - label_offset for s in samples] == list(range(n)), "every sample once, in order"
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(s[0], case.words[i])
        assert s[label + 1] == case.extra[i], f"pass-through slot of sample {i} changed"
        np.testing.assert_allclose(s[first], case.pooled[i], **TOL, err_msg=f"sample {i}")
        assert s[first + 1].shape == (len(case.words[i]), 4), f"sample {i}: {s[first + 1].shape}"
        np.testing.assert_allclose(s[first + 1], case.tokens[i], **TOL, err_msg=f"sample {i}")


def test_sample_and_sample_list_generators(case, servers):
    dr = _reader(case, servers)
    try:
        samples = dr.set_sample_generator(lambda: (case.sample(i, i) for i in range(N)))
        _check(list(samples()), case)

        def lists():
            for start in range(0, N, 6):
                yield [case.sample(i, i, words=list(case.words[i])) for i in range(start, min(N, start + 6))]

        out = [s for batch in dr.set_sample_list_generator(lists)() for s in batch]   # plain lists too
        _check(out, case)
    finally:
        dr.close()


def test_batch_generator_with_ragged_slots(case, servers):
    def batches():
        for start in range(0, N, 10):
            yield case.batch(range(start, min(N, start + 10)))

    dr = _reader(case, servers)
    first = len(case.ins)
    try:
        out = []
        for batch in dr.set_batch_generator(batches)():
            labels = batch[case.ins.index("label")]
            assert isinstance(batch[first - 1], list) and isinstance(batch[first + 1], list)
            assert batch[first].shape == (len(labels), 3) and len(batch[first + 1]) == len(labels)
            out.extend(zip(*batch[:first - 2], labels.tolist(), *batch[first - 1:]))
        _check(out, case)
    finally:
        dr.close()


def test_teacher_sigkilled_mid_epoch_every_sample_once_with_its_own_prediction(case):
    servers = [TeacherServer(case.teacher.server_dir) for _ in range(3)]
    try:
        for server in servers:
            server.start()
        dr = _reader(case, [s.endpoint for s in servers], probe_backoff=0.1, max_probe_backoff=0.5)
        dr.set_teacher_batch_size(2)

        def lists():
            for rep in range(6):   # a longer epoch: the same samples six times
                for start in range(0, N, 3):
                    yield [case.sample(i, rep * N + i) for i in range(start, min(N, start + 3))]

        out = []
        for step, batch in enumerate(dr.set_sample_list_generator(lists)()):
            out.extend(batch)
            if step == 10:
                servers[1].kill(signal.SIGKILL)
                servers[1].wait_exit(10)
        label = case.ins.index("label")
        assert [s[label] for s in out] == list(range(6 * N))
        for rep in range(6):
            _check(out[rep * N:(rep + 1) * N], case, label_offset=rep * N)
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
        dr = DistillReader(ins=["words", "length", "label"], predicts=PREDICTS)
        dr.set_fixed_teacher(server.endpoint)
        dr.set_serving_conf_file(padded_teacher.client_conf)
        dr.set_teacher_batch_size(4)
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


@pytest.fixture(scope="module")
def pad_case(pad_sensitive_teacher) -> Case:  # noqa: F811
    words = lod_models.ragged_sequences(N, seed=23)
    weights = lod_models.token_weights(words, seed=23)
    pooled, tokens = lod_models.pad_sensitive_reference(pad_sensitive_teacher.server_dir, words, weights)
    return Case("padded", pad_sensitive_teacher, words, [None] * N, pooled, tokens, weights)


def test_pad_value_and_lengths_feeds_reach_the_workers(pad_case):
    """Only the right padding gives the local answers: the default (0 for every feed) and one value for all
    (7, which the weights must not get) are caught; a lengths slot given too is checked per sample."""
    with TeacherServer(pad_case.teacher.server_dir) as server:
        def run(ins=pad_case.ins, samples=None, **options):
            dr = DistillReader(ins=list(ins), predicts=["prediction"], num_workers=2, **options)
            dr.set_fixed_teacher(server.endpoint)
            dr.set_serving_conf_file(pad_case.teacher.client_conf)
            dr.set_teacher_batch_size(5)
            try:
                samples = samples or [pad_case.sample(i, i) for i in range(N)]
                return np.stack([s[len(ins)] for s in dr.set_sample_generator(lambda: iter(samples))()])
            finally:
                dr.close()

        np.testing.assert_allclose(run(**lod_models.PAD_SENSITIVE), pad_case.pooled, **TOL)
        for wrong in ({"lengths_feeds": {"words": "length"}},                          # pad 0 for both feeds
                      {"pad_value": 7, "lengths_feeds": {"words": "length"}}):         # 7 for the weights too
            assert np.abs(run(**wrong) - pad_case.pooled).max() > 1e-3, f"{wrong} went unnoticed"

        lengths = [np.array([len(w)]) for w in pad_case.words]
        ins = ("words", "weights", "length", "label", "extra")
        given = [(w, x, n, i, None) for i, (w, x, n) in enumerate(zip(pad_case.words, pad_case.weights, lengths))]
        np.testing.assert_allclose(run(ins, given, **lod_models.PAD_SENSITIVE), pad_case.pooled, **TOL)
        given[6] = (*given[6][:2], np.array([len(pad_case.words[6]) + 3]), *given[6][3:])
        with pytest.raises(DistillReaderError, match=r"slot 2 \('length'\) of sample 6 is \d+, but the sample's "
                                                     r"slot 0 \('words'\) has length \d+ \(lengths_feeds maps"):
            run(ins, given, **lod_models.PAD_SENSITIVE)
        with pytest.raises(PaddingOptionError, match=r"pad_value: feed 'length' has the fixed per-sample shape"):
            run(pad_value={"length": 1}, lengths_feeds={"words": "length"})          # at the first epoch
        with pytest.raises(PaddingOptionError, match=r"pad_value\['weights'\] = 0.5 does not fit|"
                                                     r"pad_value = 0.5 does not fit feed 'words'"):
            run(pad_value=0.5, lengths_feeds={"words": "length"})
        with pytest.raises(ConfigError, match=r"feed\(s\) \['length'\] are not among ins"):
            run(pad_value={"words": 7})                                                 # no lengths_feeds
    with pytest.raises(PaddingOptionError, match=r"pad_value must be a real number"):
        DistillReader(ins=["words"], predicts=["prediction"], pad_value="7")          # at construction
    with pytest.raises(PaddingOptionError, match=r"lengths_feeds must be a dict"):
        DistillReader(ins=["words"], predicts=["prediction"], lengths_feeds=["length"])


def test_offline_cache_of_ragged_inputs_and_refusal_of_variable_knowledge(case, servers, tmp_path):
    refused = _reader(case, servers)
    refused.set_offline_cache(str(tmp_path / "tokens"))
    with pytest.raises(OfflineCacheError, match=r"predict 'token_prediction' has variable length"):
        list(refused.set_sample_generator(lambda: (case.sample(i, i) for i in range(N)))())
    refused.close()

    passes = []
    first = len(case.ins)
    for teachers in (servers, None):
        dr = DistillReader(ins=list(case.ins), predicts=["prediction"], **case.options)
        if teachers:
            dr.set_fixed_teacher(teachers)
        dr.set_serving_conf_file(case.teacher.client_conf)
        dr.set_offline_cache(str(tmp_path / "pooled"))
        passes.append(list(dr.set_sample_generator(lambda: (case.sample(i, i) for i in range(N)))()))
        if teachers is None:   # the cache notices changed ragged inputs
            changed = [w.copy() for w in case.words]
            changed[5] = changed[5][:-1] if len(changed[5]) > 1 else np.append(changed[5], 1)
            if case.weights:   # the padded model's weights must keep the words' length
                case_changed = Case(case.kind, case.teacher, changed, case.extra, case.pooled, case.tokens,
                                    [w[:len(c)] if len(c) <= len(w) else np.append(w, 1.0).astype(np.float32)
                                     for w, c in zip(case.weights, changed)])
            else:
                case_changed = Case(case.kind, case.teacher, changed, case.extra, case.pooled, case.tokens)
            with pytest.raises(InputMismatchError, match="sample 5"):
                list(dr.set_sample_generator(lambda c=case_changed: (c.sample(i, i) for i in range(N)))())
        dr.close()
    label = case.ins.index("label")
    for out in passes:
        assert [s[label] for s in out] == list(range(N))
        np.testing.assert_allclose(np.stack([s[first] for s in out]), case.pooled, **TOL)
    np.testing.assert_array_equal(np.stack([s[first] for s in passes[0]]), np.stack([s[first] for s in passes[1]]))
