"""Variable-length test teachers (paddle 2.6.2 static graph), exported for serving.

- ``save_lod_model``: feed ``words`` int64 LoD [rows, 1] (lod_level 1) -> embedding -> ``sequence_pool``
  (sum: IR passes fuse it with the embedding into a kernel that trusts the LoD; a bad one crashed the server)
  -> fc -> softmax: fetch ``prediction`` [N, 3] (one row per sequence), and a per-token fetch
  ``token_prediction`` [rows, 4] that keeps the input's LoD.
- ``save_padded_model``: feeds ``words`` int64 [N, -1] (padded) and ``length`` int64 [N, 1] (the lengths feed)
  -> embedding -> masked mean -> fc -> softmax: fetch ``prediction`` [N, 3]; per-token ``token_prediction``
  [N, L, 4] (shape ``[-1, 4]`` per sample in the config).
- ``save_pad_sensitive_model``: the paddle 3 counterpart of the LoD model whose answers depend on how it is
  padded: feeds ``words`` int64 [N, -1] (pad id ``WORDS_PAD`` = 7: masked out), ``weights`` float32 [N, -1]
  (summed unmasked: pad 0) and ``length`` int64 [N, 1] -> pooled ``prediction`` [N, 3] from the masked word sum,
  the weight sum and the length; per-token ``token_prediction`` [N, L, 4] from the words and their weights.
  Padding ``words`` with anything but 7, ``weights`` with anything but 0, or a wrong length changes
  ``prediction``: ``pad_sensitive_reference`` runs each sample alone, unpadded, so the right padding matches it.
- ``export_model(src, out)``: the Paddle Serving folders (an ``ExportedTeacher``).
- ``local_predict(server_dir, feeds, lods)``: the answers of a local Paddle Inference predictor, to compare with.
- ``ragged_sequences(n, seed)``: deterministic token id sequences of lengths 1..9 (per-sample int64 arrays).

Example::

    teacher = export_model(save_lod_model(str(tmp / "src")), str(tmp))
    with TeacherServer(teacher.server_dir) as server: ...
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np  # (numpy before paddle)
import pytest

from tests.support.teacher import REFERENCE_THREAD, ExportedTeacher

VOCAB = 50
EMBED = 8
CLASSES = 3
TOKEN_CLASSES = 4


def _save(dirname: str, feeds: list, fetches: list, main, startup) -> str:
    import paddle

    scope = paddle.static.Scope()
    exe = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(scope):
        exe.run(startup)
        paddle.static.save_inference_model(os.path.join(dirname, "model"), feeds, fetches, exe, program=main)
    paddle.disable_static()
    return dirname


def _programs(seed: int):
    import paddle

    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    main.random_seed = startup.random_seed = 2000 + seed
    return main, startup


def save_lod_model(dirname: str, seed: int = 0) -> str:
    """Embedding + sequence_pool over a LoD feed; a pooled and a per-token (LoD) output."""
    import paddle

    main, startup = _programs(seed)
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        words = paddle.static.data("words", [-1, 1], "int64", lod_level=1)
        emb = paddle.static.nn.embedding(words, size=[VOCAB, EMBED])
        pooled = paddle.static.nn.sequence_pool(emb, "sum")   # sum: fused with the embedding by IR passes
        prediction = paddle.nn.functional.softmax(paddle.static.nn.fc(pooled, CLASSES))
        tokens = paddle.nn.functional.softmax(paddle.static.nn.fc(emb, TOKEN_CLASSES))
    return _save(dirname, [words], [prediction, tokens], main, startup)


def save_padded_model(dirname: str, seed: int = 0) -> str:
    """Embedding over padded ids [N, L] with a lengths feed [N, 1]; a pooled and a per-token output."""
    import paddle

    main, startup = _programs(seed)
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        words = paddle.static.data("words", [-1, -1], "int64")
        length = paddle.static.data("length", [-1, 1], "int64")
        emb = paddle.nn.functional.embedding(words, paddle.static.create_parameter([VOCAB, EMBED], "float32"))
        positions = paddle.arange(paddle.shape(words)[1], dtype="int64").unsqueeze(0)
        mask = paddle.cast(positions < length, "float32").unsqueeze(-1)            # [N, L, 1]
        pooled = paddle.sum(emb * mask, axis=1) / paddle.cast(length, "float32")
        prediction = paddle.nn.functional.softmax(paddle.static.nn.fc(pooled, CLASSES))
        weight = paddle.static.create_parameter([EMBED, TOKEN_CLASSES], "float32")   # per token (works on PIR too)
        bias = paddle.static.create_parameter([TOKEN_CLASSES], "float32", is_bias=True)
        tokens = paddle.nn.functional.softmax(paddle.matmul(emb, weight) + bias)
    return _save(dirname, [words, length], [prediction, tokens], main, startup)


WORDS_PAD = 7
PAD_SENSITIVE = {"pad_value": {"words": WORDS_PAD, "weights": 0.0}, "lengths_feeds": {"words": "length"}}


def save_pad_sensitive_model(dirname: str, seed: int = 0) -> str:
    """Padded feeds whose pad values matter (see the module docstring); built on paddle 2.6 and 3.x (PIR)."""
    import paddle

    main, startup = _programs(seed)
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        words = paddle.static.data("words", [-1, -1], "int64")
        weights = paddle.static.data("weights", [-1, -1], "float32")
        length = paddle.static.data("length", [-1, 1], "int64")
        emb = paddle.nn.functional.embedding(words, paddle.static.create_parameter([VOCAB, EMBED], "float32"))
        real = paddle.cast(words != WORDS_PAD, "float32").unsqueeze(-1)             # [N, L, 1]
        length_f = paddle.cast(length, "float32")
        features = paddle.concat([paddle.sum(emb * real, axis=1) / length_f,
                                  paddle.sum(weights, axis=1, keepdim=True), length_f / 4.0], axis=1)
        prediction = paddle.nn.functional.softmax(paddle.static.nn.fc(features, CLASSES))
        weight = paddle.static.create_parameter([EMBED, TOKEN_CLASSES], "float32")
        scale = paddle.static.create_parameter([TOKEN_CLASSES], "float32")
        tokens = paddle.nn.functional.softmax(paddle.matmul(emb, weight) + weights.unsqueeze(-1) * scale)
    return _save(dirname, [words, weights, length], [prediction, tokens], main, startup)


def export_model(src_dir: str, out_dir: str) -> ExportedTeacher:
    """Serving folders with fetch aliases ``prediction`` and ``token_prediction``."""
    from teachers.export import inference_model_to_serving

    server_dir, client_dir = os.path.join(out_dir, "serving_server"), os.path.join(out_dir, "serving_client")
    inference_model_to_serving(src_dir, server_dir, client_dir, fetch_alias_names="prediction,token_prediction")
    return ExportedTeacher(server_dir, client_dir, os.path.join(client_dir, "serving_client_conf.prototxt"), "lod")


_POOLS: dict = {}


def local_predict(server_dir: str, feeds: Mapping[str, np.ndarray],
                  lods: Optional[Mapping[str, list]] = None) -> dict:
    """{fetch var name: (array, lod)} of a local Paddle Inference predictor (oneDNN, as the server), run on
    ``tests.support.teacher.REFERENCE_THREAD`` whichever thread asks."""
    return REFERENCE_THREAD.submit(_local_predict, server_dir, feeds, lods).result()


def _local_predict(server_dir: str, feeds: Mapping[str, np.ndarray], lods: Optional[Mapping[str, list]]) -> dict:
    from teachers.predictor_pool import PredictorOptions, PredictorPool

    key = os.path.abspath(server_dir)
    if key not in _POOLS:
        _POOLS[key] = PredictorPool(PredictorOptions(model_dir=server_dir, size=1))
    pool = _POOLS[key]
    return pool.run(feeds, pool.output_names, lods)


def ragged_sequences(n: int, seed: int = 0, max_len: int = 9) -> list[np.ndarray]:
    """``n`` int64 token id arrays of lengths 1..max_len."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(rng.integers(1, max_len + 1))).astype(np.int64) for _ in range(n)]


def pad_sensitive_reference(server_dir: str, words: list,
                            weights: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pooled [N, 3], per-sample token predictions) of the pad-sensitive model, each sample alone, unpadded."""
    pooled, tokens = [], []
    for w, x in zip(words, weights):
        out = local_predict(server_dir, {"words": np.asarray(w, np.int64)[None],
                                         "weights": np.asarray(x, np.float32)[None],
                                         "length": np.array([[len(w)]], np.int64)})
        (p, _), (t, _) = [out[k] for k in sorted(out)]
        pooled.append(p[0])
        tokens.append(t[0])
    return np.stack(pooled), tokens


def token_weights(words: list, seed: int = 0) -> list[np.ndarray]:
    """A float32 weight per token of each sequence (the pad-sensitive model's ``weights`` feed)."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.5, 2.0, size=len(w)).astype(np.float32) for w in words]


def lod_available() -> bool:
    """False on paddle 3: its PIR programs have no LoD tensors, so LoD models cannot be built there. Read from the
    installed distribution's version (no paddle import at collection time)."""
    from importlib import metadata

    for dist in ("paddlepaddle", "paddlepaddle-gpu"):
        try:
            return int(metadata.version(dist).split(".")[0]) < 3
        except metadata.PackageNotFoundError:
            continue
    import paddle

    return int(paddle.__version__.split(".")[0]) < 3


def skip_without_lod() -> None:
    """Skip on paddle 3: its PIR programs have no LoD tensors (``lod_level``, ``sequence_pool``, ...)."""
    import paddle

    if int(paddle.__version__.split(".")[0]) >= 3:
        pytest.skip(f"paddle {paddle.__version__}: PIR has no LoD tensors, LoD models are built on paddle 2.x "
                    f"(padded sequences are the paddle 3 way)")


@pytest.fixture(scope="session")
def lod_teacher(tmp_path_factory) -> ExportedTeacher:
    """The LoD model (``save_lod_model``) exported for serving (skipped on paddle 3)."""
    skip_without_lod()
    root = tmp_path_factory.mktemp("lod_teacher")
    return export_model(save_lod_model(str(root / "src")), str(root))


@pytest.fixture(scope="session")
def pad_sensitive_teacher(tmp_path_factory) -> ExportedTeacher:
    """The pad-sensitive model (``save_pad_sensitive_model``) exported for serving (paddle 2.6 and 3.x)."""
    root = tmp_path_factory.mktemp("pad_sensitive_teacher")
    return export_model(save_pad_sensitive_model(str(root / "src")), str(root))


@pytest.fixture(scope="session")
def padded_teacher(tmp_path_factory) -> ExportedTeacher:
    """The padded model (``save_padded_model``) exported for serving."""
    root = tmp_path_factory.mktemp("padded_teacher")
    return export_model(save_padded_model(str(root / "src")), str(root))


def lod_reference(server_dir: str, samples: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pooled [N, 3], per-sample token predictions) of the LoD model, from local Paddle Inference."""
    rows = np.concatenate(samples).reshape(-1, 1).astype(np.int64)
    lod = [0, *np.cumsum([len(s) for s in samples]).tolist()]
    out = local_predict(server_dir, {"words": rows}, {"words": lod})
    (pooled, _), (tokens, tok_lod) = [out[k] for k in sorted(out)]
    assert tok_lod == lod
    return pooled, [tokens[a:b] for a, b in zip(lod, lod[1:])]


def padded_reference(server_dir: str, samples: list, pad_value: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pooled [N, 3], per-sample token predictions cut to length) of the padded model, one sample at a time."""
    pooled, tokens = [], []
    for s in samples:
        out = local_predict(server_dir, {"words": np.asarray(s, np.int64)[None],
                                         "length": np.array([[len(s)]], np.int64)})
        (p, _), (t, _) = [out[k] for k in sorted(out)]
        pooled.append(p[0])
        tokens.append(t[0])
    return np.stack(pooled), tokens


__all__ = ["PAD_SENSITIVE", "WORDS_PAD", "export_model", "local_predict", "lod_available", "lod_reference",
           "lod_teacher", "pad_sensitive_reference", "pad_sensitive_teacher", "padded_reference", "padded_teacher",
           "ragged_sequences", "save_lod_model", "save_pad_sensitive_model", "save_padded_model", "skip_without_lod",
           "token_weights"]
