"""Variable-length inputs through a real teacher server: LoD models (pooled and per-token outputs) and padded
models, compared with local Paddle Inference; every LoD violation refused (err_no 5000 naming the feed and the
rule) while the server keeps serving; the client's ragged and Paddle Serving forms over gRPC and HTTP (JSON and
proto, raw and typed); concurrent LoD and padded requests under dynamic batching answer as unbatched.

Tests marked ``lod`` need a LoD model (paddle 2.x: PIR has no LoD tensors) and are deselected on paddle 3
(tests/conftest.py); each has a padded counterpart, run on both lines, with the same properties: answers in
order and equal to local Paddle Inference, per-token fetches cut per sample, bad input refused naming the feed and
the sample, the server serving on, merged requests answered as alone. Their teacher is the pad-sensitive model
(``lod_models.save_pad_sensitive_model``), whose answers change when it is padded wrongly."""
from __future__ import annotations

import json
import re
import threading
import time

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest
import requests

from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.tensor_codec import encode_tensor
from distill_reader.client import TeacherClient
from distill_reader.feeds import FeedError
from distill_reader.padding import PaddingOptionError
from teachers.lod_checks import LodError, check_lod_feed, fetch_lod
from tests.support import lod_models
from tests.support.lod_models import PAD_SENSITIVE, lod_teacher, pad_sensitive_teacher, padded_teacher  # noqa: F401
from tests.support.teacher import TeacherServer, grpc_health

TOL = {"rtol": 1e-5, "atol": 1e-6}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def lod_server(lod_teacher):  # noqa: F811
    with TeacherServer(lod_teacher.server_dir, http=True, max_batch_size=16, batch_timeout_ms=5,
                       extra_args=("--merge_requests", "yes")) as server:   # LoD requests merge (shifted offsets)
        yield server


@pytest.fixture(scope="module")
def padded_server(padded_teacher):  # noqa: F811
    with TeacherServer(padded_teacher.server_dir, http=True, max_batch_size=16, batch_timeout_ms=5) as server:
        yield server


@pytest.fixture(scope="module")
def pad_server(pad_sensitive_teacher):  # noqa: F811
    with TeacherServer(pad_sensitive_teacher.server_dir, http=True, max_batch_size=16, batch_timeout_ms=5,
                       extra_args=("--merge_requests", "yes")) as server:   # padded requests of equal length merge
        yield server


def _pad_samples(n: int, seed: int):
    words = lod_models.ragged_sequences(n, seed=seed)
    return words, lod_models.token_weights(words, seed=seed)


def _clients(server, conf, **options):
    yield TeacherClient(server.endpoint, conf, wire="raw", **options)
    yield TeacherClient(server.endpoint, conf, wire="typed", **options)
    yield TeacherClient(server.http_endpoint, conf, protocol="http", wire="raw", **options)
    yield TeacherClient(server.http_endpoint, conf, protocol="http", wire="typed", http_format="json", **options)


@pytest.mark.lod
def test_lod_model_matches_local_inference_in_both_client_forms(lod_teacher, lod_server):  # noqa: F811
    samples = lod_models.ragged_sequences(7, seed=1)
    pooled, tokens = lod_models.lod_reference(lod_teacher.server_dir, samples)
    rows = np.concatenate(samples)
    lod = [0, *np.cumsum([len(s) for s in samples]).tolist()]
    for client in _clients(lod_server, lod_teacher.client_conf):
        with client:
            out = client.predict({"words": samples})                      # ragged samples, split answers
            np.testing.assert_allclose(out["prediction"], pooled, **TOL)
            assert isinstance(out["token_prediction"], list) and len(out["token_prediction"]) == len(samples)
            for i, (got, want) in enumerate(zip(out["token_prediction"], tokens)):
                assert got.shape == (len(samples[i]), 4), f"sample {i}"
                np.testing.assert_allclose(got, want, **TOL, err_msg=f"sample {i}")
            out = client.predict({"words": rows, "words.lod": lod}, lod_form="serving")   # Paddle Serving's form
            np.testing.assert_allclose(out["prediction"], pooled, **TOL)
            assert out["token_prediction.lod"].tolist() == lod
            np.testing.assert_allclose(out["token_prediction"], np.concatenate(tokens), **TOL)


@pytest.mark.lod
def test_client_refuses_bad_variable_feeds_naming_them(lod_teacher, lod_server):  # noqa: F811
    with TeacherClient(lod_server.endpoint, lod_teacher.client_conf) as client:
        with pytest.raises(FeedError, match=r"'words\.lod' offsets must never decrease"):
            client.predict({"words": np.arange(5), "words.lod": [0, 4, 2, 5]})
        with pytest.raises(FeedError, match=r"'words\.lod' must end at the row count 5"):
            client.predict({"words": np.arange(5), "words.lod": [0, 2, 7]})
        with pytest.raises(FeedError, match=r"feed 'words' is a LoD tensor: give a list of per-sample arrays"):
            client.predict({"words": np.arange(5)})
        with pytest.raises(ValueError, match="lod_form must be one of"):
            client.predict({"words": [np.arange(3)]}, lod_form="flat")


def _lod_request(rows: np.ndarray, lod, fetch="prediction") -> service_pb2.Request:
    request = service_pb2.Request(fetch_var_names=[fetch], log_id=3)
    encode_tensor(rows, name="words", raw=False, lod=lod, out=request.tensor.add())
    return request


VIOLATIONS = [
    ([0, 3, 50_000_000], r"lod must end at the tensor's row count 7 .*ends at 50000000"),
    ([0, 3, 9], r"lod must end at the tensor's row count 7 .*ends at 9"),
    ([0, 5, 3, 7], r"lod offsets must never decrease; offset 2 is 3 after 5"),
    ([2, 4, 7], r"lod must start at 0, it starts at 2"),
    ([0, 3, 5], r"lod must end at the tensor's row count 7 .*ends at 5"),
    ([7], r"lod offsets missing"),
    ([], r"lod offsets missing"),
]


@pytest.mark.lod
def test_every_lod_violation_is_refused_and_the_server_keeps_serving(lod_teacher, lod_server):  # noqa: F811
    rows = np.arange(7, dtype=np.int64).reshape(7, 1)
    with TeacherClient(lod_server.endpoint, lod_teacher.client_conf, wire="typed") as client:
        for lod, message in VIOLATIONS:
            for fetch in ("prediction", "token_prediction"):
                answer = client._call_grpc(_lod_request(rows, lod, fetch))
                assert answer.err_no == 5000, (lod, answer.err_msg)
                assert "feed 'words'" in answer.err_msg
                assert re.search(message, answer.err_msg), (lod, answer.err_msg)
            # the same over HTTP JSON, as Paddle Serving's curl examples send it
            doc = {"fetch_var_names": ["token_prediction"], "log_id": 5,
                   "tensor": [{"int64_data": list(range(7)), "shape": [7, 1], "elem_type": 0, "name": "words",
                               "lod": lod}]}
            answer = requests.post(f"http://{lod_server.http_endpoint}/GeneralModelService/inference",
                                   data=json.dumps(doc), headers=JSON, timeout=10).json()
            assert answer["err_no"] == 5000 and "feed 'words'" in answer["err_msg"], answer
            assert lod_server.alive() and grpc_health(lod_server.endpoint) == "SERVING"
        out = client.predict({"words": [np.arange(3), np.arange(4)]})     # and good requests still work
        assert out["prediction"].shape == (2, 3)
    assert "Segmentation" not in lod_server.log() and lod_server.alive()


@pytest.mark.lod
def test_lod_fetch_over_http_json_carries_its_lod(lod_teacher, lod_server):  # noqa: F811
    doc = {"fetch_var_names": ["token_prediction"], "log_id": 9,
           "tensor": [{"int64_data": [1, 2, 3, 4, 5], "shape": [5, 1], "elem_type": 0, "name": "words",
                       "lod": [0, 2, 5]}]}
    answer = requests.post(f"http://{lod_server.http_endpoint}/GeneralModelService/inference",
                           data=json.dumps(doc), headers={"Content-Type": "application/json"}, timeout=10).json()
    assert answer["err_no"] == 0, answer
    tensor = answer["outputs"][0]["tensor"][0]
    assert tensor["lod"] == [0, 2, 5] and tensor["shape"] == [5, 4] and tensor["alias_name"] == "token_prediction"


def test_padded_feeds_with_lengths_feed_and_pad_value(padded_teacher, padded_server):  # noqa: F811
    samples = lod_models.ragged_sequences(6, seed=2)
    pooled, tokens = lod_models.padded_reference(padded_teacher.server_dir, samples)
    for pad_value in (0, 7):
        for client in _clients(padded_server, padded_teacher.client_conf, pad_value=pad_value,
                               lengths_feeds={"words": "length"}):
            with client:
                out = client.predict({"words": samples})
                np.testing.assert_allclose(out["prediction"], pooled, **TOL)
                for i, (got, want) in enumerate(zip(out["token_prediction"], tokens)):
                    assert got.shape == (len(samples[i]), 4), f"sample {i}"
                    np.testing.assert_allclose(got, want, **TOL, err_msg=f"sample {i}")
                # Paddle Serving's form: the padded per-token output as the model gave it
                rows = np.concatenate(samples)
                lod = [0, *np.cumsum([len(s) for s in samples]).tolist()]
                raw = client.predict({"words": rows, "words.lod": lod}, lod_form="serving")
                assert raw["token_prediction"].shape == (6, max(map(len, samples)), 4)
    with TeacherClient(padded_server.endpoint, padded_teacher.client_conf) as client:
        with pytest.raises(FeedError, match=r"feed 'length' has the fixed per-sample shape \[1\]"):
            client.predict({"words": samples, "length": [np.array([1]), np.array([1, 2])]})
        with pytest.raises(FeedError, match=r"feed 'words', sample 1: shape \[2, 2\]"):
            client.predict({"words": [np.arange(3), np.ones((2, 2))], "length": np.array([[3], [2]])})


@pytest.mark.lod
def test_concurrent_lod_and_padded_requests_answer_as_unbatched(lod_teacher, lod_server, padded_teacher,  # noqa: F811
                                                                padded_server):
    """Many threads at once through the dynamic batcher: each answer equals the local, unbatched one. The local
    references are computed here, before the threads: the local predictor run from 24 threads in turn failed once
    in oneDNN ("could not execute a primitive", paddle 2.6.2), the test's fault, not the server's."""
    jobs = [lod_models.ragged_sequences(1 + k % 4, seed=100 + k) for k in range(24)]
    references = [lod_models.lod_reference(lod_teacher.server_dir, jobs[k]) if k % 2 else
                  lod_models.padded_reference(padded_teacher.server_dir, jobs[k]) for k in range(len(jobs))]
    errors: list = []

    def run(k: int) -> None:
        try:
            samples = jobs[k]
            pooled, tokens = references[k]
            if k % 2:
                client = TeacherClient(lod_server.endpoint, lod_teacher.client_conf)
            else:
                client = TeacherClient(padded_server.endpoint, padded_teacher.client_conf,
                                       lengths_feeds={"words": "length"})
            with client:
                for _ in range(3):
                    out = client.predict({"words": samples})
                    np.testing.assert_allclose(out["prediction"], pooled, **TOL)
                    for got, want in zip(out["token_prediction"], tokens):
                        np.testing.assert_allclose(got, want, **TOL)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((k, exc))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]


def test_lod_rules_unit():
    rows, lod, samples = check_lod_feed("w", np.arange(5), [0, 0, 5])
    assert rows.shape == (5,) and lod == [0, 0, 5] and samples == 2        # an empty sequence is allowed
    with pytest.raises(LodError, match="never decrease"):
        check_lod_feed("w", np.arange(5), [0, 3, 2, 5])
    assert fetch_lod([[0, 1, 2], [0, 3, 7]], 7) == [0, 3, 7]             # two levels composed to rows
    assert fetch_lod([], 4) == []
    with pytest.raises(LodError, match="does not describe its 6 rows"):
        fetch_lod([[0, 3, 7]], 6)


@pytest.mark.lod
def test_batcher_merges_lod_requests_with_shifted_offsets(lod_teacher):  # noqa: F811
    """Real Paddle Inference behind the real batcher: concurrent LoD requests run merged, each gets its own rows
    and LoD back, equal to running it alone."""
    from teachers.batcher import DynamicBatcher
    from teachers.predictor_pool import PredictorOptions, PredictorPool

    pool = PredictorPool(PredictorOptions(model_dir=lod_teacher.server_dir, size=1))
    names = pool.output_names

    def slow_run(feeds, fetch, lods):
        time.sleep(0.02)   # requests pile up meanwhile
        return pool.run(feeds, fetch, lods)

    jobs = [lod_models.ragged_sequences(1 + k % 3, seed=300 + k) for k in range(16)]
    alone = []
    for samples in jobs:
        rows = np.concatenate(samples).reshape(-1, 1)
        alone.append((rows, [0, *np.cumsum([len(s) for s in samples]).tolist()]))
    expected = [pool.run({"words": rows}, names, {"words": lod}) for rows, lod in alone]
    batcher = DynamicBatcher(slow_run, max_batch_size=64, timeout_ms=20, runners=1)
    results, errors = {}, []

    def client(k):
        try:
            rows, lod = alone[k]
            results[k] = batcher.submit({"words": rows}, names, {"words": lod})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(jobs))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        batcher.close()
    assert not errors, errors
    assert batcher.merged_jobs > 0 and batcher.runs < len(jobs), "LoD requests were merged"
    for k, got in results.items():
        for name in names:
            (array, lod), (want, want_lod) = got[name], expected[k][name]
            assert lod == want_lod, (k, name)
            np.testing.assert_allclose(array, want, **TOL, err_msg=f"request {k} {name}")
    assert results[3][names[1]][1] == alone[3][1]      # the per-token fetch carries the request's own LoD


def test_fixed_feeds_still_take_nested_lists():
    from distill_base.serving_config import ServingConfig, VarSpec
    from distill_reader.feeds import VariableFeedError, prepare_variable_feeds

    config = ServingConfig(feeds=(VarSpec("x", "x", 1, (2,)), VarSpec("w", "w", 0, (-1,), is_lod_tensor=True)),
                           fetches=())
    out = prepare_variable_feeds(config, {"x": [[0.5, 1.0], [2.0, 3.0]], "w": [[1, 2, 3], [4]]})
    assert out.feeds["x"] == [[0.5, 1.0], [2.0, 3.0]] and out.lods["w"] == [0, 3, 4] and out.batch_size == 2
    assert out.feeds["w"].shape == (4, 1)
    with pytest.raises(VariableFeedError, match=r"feed 'x' has the fixed per-sample shape \[2\]"):
        prepare_variable_feeds(config, {"x": [[0.5, 1.0], [2.0]], "w": [[1], [2]]})


# -- padded counterparts of the LoD tests (both paddle lines) -------------------------------------------------------
def _check_tokens(got, want, words):
    assert isinstance(got, list) and len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == (len(words[i]), 4), f"sample {i}: {g.shape}"
        np.testing.assert_allclose(g, w, **TOL, err_msg=f"sample {i}")


def test_pad_sensitive_model_matches_local_inference_in_both_client_forms(pad_sensitive_teacher,  # noqa: F811
                                                                          pad_server):
    """Counterpart of the LoD one: every client kind, ragged and Paddle Serving's form, answers in order and equal
    to each sample run alone, per-token fetches cut per sample; a client padding wrongly gets other answers."""
    words, weights = _pad_samples(7, seed=1)
    pooled, tokens = lod_models.pad_sensitive_reference(pad_sensitive_teacher.server_dir, words, weights)
    lod = [0, *np.cumsum([len(w) for w in words]).tolist()]
    for client in _clients(pad_server, pad_sensitive_teacher.client_conf, **PAD_SENSITIVE):
        with client:
            out = client.predict({"words": words, "weights": weights})            # ragged samples, split answers
            np.testing.assert_allclose(out["prediction"], pooled, **TOL)
            _check_tokens(out["token_prediction"], tokens, words)
            out = client.predict({"words": np.concatenate(words), "words.lod": lod, "weights": np.concatenate(weights),
                                  "weights.lod": lod}, lod_form="serving")          # Paddle Serving's form
            np.testing.assert_allclose(out["prediction"], pooled, **TOL)
            assert out["token_prediction"].shape == (7, max(map(len, words)), 4)   # as the model gave it
            _check_tokens([t[:len(w)] for t, w in zip(out["token_prediction"], words)], tokens, words)
            reversed_out = client.predict({"words": words[::-1], "weights": weights[::-1]})
            np.testing.assert_allclose(reversed_out["prediction"], pooled[::-1], **TOL)   # order follows the input
    with TeacherClient(pad_server.endpoint, pad_sensitive_teacher.client_conf,
                       lengths_feeds={"words": "length"}) as default_padding:     # pads the words with 0, not 7
        wrong = default_padding.predict({"words": words, "weights": weights})["prediction"]
        assert np.abs(wrong - pooled).max() > 1e-3


def test_client_refuses_bad_padded_feeds_and_lengths_naming_them(pad_sensitive_teacher, pad_server):  # noqa: F811
    """Counterpart of the LoD one: bad offsets, lengths that are not the samples' lengths and padding options
    that do not fit the model are refused before sending, naming the feed and the sample."""
    words, weights = _pad_samples(4, seed=3)
    with TeacherClient(pad_server.endpoint, pad_sensitive_teacher.client_conf, **PAD_SENSITIVE) as client:
        with pytest.raises(FeedError, match=r"'words\.lod' offsets must never decrease"):
            client.predict({"words": np.arange(5), "words.lod": [0, 4, 2, 5], "weights": weights[:3]})
        with pytest.raises(FeedError, match=r"'words\.lod' must end at the row count 5"):
            client.predict({"words": np.arange(5), "words.lod": [0, 2, 7], "weights": weights[:2]})
        lengths = np.array([[len(w)] for w in words])
        lengths[2, 0] += 2
        with pytest.raises(FeedError, match=rf"feed 'length', sample 2: length {len(words[2]) + 2}, but sample 2 "
                                            rf"of 'words' has {len(words[2])} \(lengths_feeds maps 'words'"):
            client.predict({"words": words, "weights": weights, "length": lengths})
        padded = np.full((2, 5), 7)
        with pytest.raises(FeedError, match=r"feed 'length', sample 1: length 9 is outside \[0, 5\], the padded "
                                            r"length of 'words'"):
            client.predict({"words": padded, "weights": np.zeros((2, 5)), "length": [[5], [9]]})
        with pytest.raises(FeedError, match=r"feed 'weights', sample 1: shape \[2, 2\]"):
            client.predict({"words": words[:2], "weights": [weights[0], np.ones((2, 2))]})
        with pytest.raises(ValueError, match="lod_form must be one of"):
            client.predict({"words": words, "weights": weights}, lod_form="flat")
    conf = pad_sensitive_teacher.client_conf
    with pytest.raises(PaddingOptionError, match=r"pad_value = 0.5 does not fit feed 'words' \(int64\)"):
        TeacherClient(pad_server.endpoint, conf, pad_value=0.5)
    with pytest.raises(PaddingOptionError, match=r"pad_value: feed 'length' has the fixed per-sample shape \[1\]"):
        TeacherClient(pad_server.endpoint, conf, pad_value={"length": 0})
    with pytest.raises(PaddingOptionError, match=r"lengths_feeds\['words'\] = 'weights': the lengths feed must "
                                                 r"hold one number per sample"):
        TeacherClient(pad_server.endpoint, conf, lengths_feeds={"words": "weights"})


def _padded_request(feeds: dict, fetch="prediction") -> service_pb2.Request:
    request = service_pb2.Request(fetch_var_names=[fetch], log_id=4)
    for name, value in feeds.items():
        encode_tensor(np.asarray(value), name=name, raw=False, out=request.tensor.add())
    return request


def test_malformed_padded_requests_are_refused_and_the_server_keeps_serving(pad_sensitive_teacher,  # noqa: F811
                                                                           pad_server):
    """Counterpart of the LoD violations: what a server can see of a padded request (sample counts, ranks; ids
    out of range: the predictor's own error) is refused naming it, over gRPC and HTTP JSON, and the server answers
    the next good request correctly."""
    words = np.arange(15, dtype=np.int64).reshape(3, 5) % 50
    weights, length = np.ones((3, 5), np.float32), np.array([[5], [3], [2]], np.int64)
    bad = [({"words": words, "weights": weights, "length": length[:2]}, 5000,
            r"feed 'length' has batch size 2, other feeds have 3"),
           ({"words": words.reshape(-1), "weights": weights, "length": length}, 5000,
            r"feed 'words': shape \[15\].*the model expects int64 \[N, \?\]"),
           ({"words": words.reshape(3, 5, 1), "weights": weights, "length": length}, 5000, r"feed 'words': shape"),
           ({"words": words + 1000, "weights": weights, "length": length}, (5000, 10000), r"expected >= 0 and < 50")]
    with TeacherClient(pad_server.endpoint, pad_sensitive_teacher.client_conf, wire="typed", **PAD_SENSITIVE) as client:
        for feeds, err_no, message in bad:
            for fetch in ("prediction", "token_prediction"):
                answer = client._call_grpc(_padded_request(feeds, fetch))
                assert answer.err_no in np.atleast_1d(err_no), (list(feeds), answer.err_msg)
                assert re.search(message, answer.err_msg), answer.err_msg
            doc = {"fetch_var_names": ["prediction"], "log_id": 5,
                   "tensor": [{"int64_data" if v.dtype.kind == "i" else "float_data": v.reshape(-1).tolist(),
                               "shape": list(v.shape), "elem_type": 0 if v.dtype.kind == "i" else 1, "name": k}
                              for k, v in ((k, np.asarray(v)) for k, v in feeds.items())]}
            answer = requests.post(f"http://{pad_server.http_endpoint}/GeneralModelService/inference",
                                   data=json.dumps(doc), headers=JSON, timeout=10).json()
            assert answer["err_no"] in np.atleast_1d(err_no) and re.search(message, answer["err_msg"]), answer
            assert pad_server.alive() and grpc_health(pad_server.endpoint) == "SERVING"
        samples, sample_weights = _pad_samples(3, seed=4)
        pooled, _ = lod_models.pad_sensitive_reference(pad_sensitive_teacher.server_dir, samples, sample_weights)
        out = client.predict({"words": samples, "weights": sample_weights})          # good requests still work
        np.testing.assert_allclose(out["prediction"], pooled, **TOL)
    assert "Segmentation" not in pad_server.log() and pad_server.alive()


def test_padded_fetch_over_http_json_keeps_its_padded_shape(pad_sensitive_teacher, pad_server):  # noqa: F811
    """Counterpart of the LoD fetch over HTTP JSON: the per-token output comes back [N, L, 4] without a LoD, as
    Paddle Serving sends it, and its rows up to each length are the sample's own."""
    words, weights = _pad_samples(2, seed=5)
    _, tokens = lod_models.pad_sensitive_reference(pad_sensitive_teacher.server_dir, words, weights)
    longest = max(map(len, words))
    padded = np.full((2, longest), lod_models.WORDS_PAD, np.int64)
    padded_weights = np.zeros((2, longest), np.float32)
    for i, (w, x) in enumerate(zip(words, weights)):
        padded[i, :len(w)], padded_weights[i, :len(x)] = w, x
    doc = {"fetch_var_names": ["token_prediction"], "log_id": 9,
           "tensor": [{"int64_data": padded.reshape(-1).tolist(), "shape": [2, longest], "elem_type": 0,
                       "name": "words"},
                      {"float_data": padded_weights.reshape(-1).tolist(), "shape": [2, longest], "elem_type": 1,
                       "name": "weights"},
                      {"int64_data": [len(w) for w in words], "shape": [2, 1], "elem_type": 0, "name": "length"}]}
    answer = requests.post(f"http://{pad_server.http_endpoint}/GeneralModelService/inference",
                           data=json.dumps(doc), headers=JSON, timeout=10).json()
    assert answer["err_no"] == 0, answer
    tensor = answer["outputs"][0]["tensor"][0]
    assert tensor["shape"] == [2, longest, 4] and not tensor.get("lod") and tensor["alias_name"] == "token_prediction"
    values = np.asarray(tensor["float_data"], np.float32).reshape(2, longest, 4)
    for i, w in enumerate(words):
        np.testing.assert_allclose(values[i, :len(w)], tokens[i], **TOL, err_msg=f"sample {i}")


def test_concurrent_padded_requests_answer_as_unbatched(pad_sensitive_teacher, pad_server):  # noqa: F811
    """Counterpart of the concurrent LoD test: many threads through the merging batcher (requests of equal padded
    length merge), each answer equal to the local, unbatched one."""
    jobs = []
    for k in range(24):
        words, weights = _pad_samples(1 + k % 4, seed=100 + k)
        words[0] = np.resize(words[0], 6 + 3 * (k % 2))   # padded length 6 or 9 (or longer): many can merge
        weights[0] = np.resize(weights[0], len(words[0]))
        jobs.append((words, weights))
    references = [lod_models.pad_sensitive_reference(pad_sensitive_teacher.server_dir, *job) for job in jobs]
    errors: list = []

    def run(k: int) -> None:
        try:
            (words, weights), (pooled, tokens) = jobs[k], references[k]
            with TeacherClient(pad_server.endpoint, pad_sensitive_teacher.client_conf, **PAD_SENSITIVE) as client:
                for _ in range(3):
                    out = client.predict({"words": words, "weights": weights})
                    np.testing.assert_allclose(out["prediction"], pooled, **TOL)
                    _check_tokens(out["token_prediction"], tokens, words)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((k, exc))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]


def test_batcher_merges_padded_requests_of_equal_length(pad_sensitive_teacher):  # noqa: F811
    """Counterpart of the LoD merge test: real Paddle Inference behind the real batcher; concurrent padded
    requests of the same padded length run merged, others apart, each answer equal to running it alone."""
    from teachers.batcher import DynamicBatcher
    from teachers.predictor_pool import PredictorOptions, PredictorPool

    pool = PredictorPool(PredictorOptions(model_dir=pad_sensitive_teacher.server_dir, size=1))
    names = pool.output_names

    def slow_run(feeds, fetch, lods):
        time.sleep(0.02)   # requests pile up meanwhile
        return pool.run(feeds, fetch, lods)

    jobs = []
    for k in range(16):
        words, weights = _pad_samples(1 + k % 3, seed=300 + k)
        longest = 5 if k < 8 else 9                    # two padded lengths (a job of another length ends a merge)
        words = [w[:longest] for w in words]
        words[0] = np.resize(words[0], longest)
        weights = [np.resize(x, len(w)).astype(np.float32) for x, w in zip(weights, words)]
        feeds = {"words": np.full((len(words), longest), lod_models.WORDS_PAD, np.int64),
                 "weights": np.zeros((len(words), longest), np.float32),
                 "length": np.array([[len(w)] for w in words], np.int64)}
        for i, (w, x) in enumerate(zip(words, weights)):
            feeds["words"][i, :len(w)], feeds["weights"][i, :len(x)] = w, x
        jobs.append(feeds)
    expected = [pool.run(feeds, names, None) for feeds in jobs]
    batcher = DynamicBatcher(slow_run, max_batch_size=64, timeout_ms=20, runners=1)
    results, errors = {}, []

    def client(k):
        try:
            results[k] = batcher.submit(jobs[k], names)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(jobs))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        batcher.close()
    assert not errors, errors
    assert batcher.merged_jobs > 0 and batcher.runs < len(jobs), "padded requests of equal length were merged"
    assert len(results) == len(jobs)
    for k, got in results.items():
        for name in names:
            (array, lod), (want, _) = got[name], expected[k][name]
            assert not lod and array.shape == want.shape, (k, name, array.shape, want.shape)
            np.testing.assert_allclose(array, want, **TOL, err_msg=f"request {k} {name}")
