"""Teachers and student of the text example (paddle 2.6 and 3.x on CPU).

- LoD teacher (``train_teacher``, paddle 2.x only: PIR, paddle 3's program form, has no LoD tensors): a CNN over
  word ids in Paddle's static graph with a LoD input, as EDL's NLP teachers were served: ``words`` int64
  [rows, 1] (lod_level 1) -> embedding (64) -> ``sequence_conv`` (128 filters, width 3, tanh) -> ``sequence_pool``
  (max) -> fc -> ``logits`` [N, C] (and ``prediction`` = softmax). Saved with ``save_inference_model``.
- Padded teacher (``train_padded_teacher``, paddle 2.6 and 3.x): the same CNN written in dygraph for padded
  input, what a paddle 3 user writes: ``words`` int64 [N, L] padded with ``PAD`` (embedded as zeros, so the
  width-3 convolution sees the zeros ``sequence_conv`` pads with) and ``length`` int64 [N, 1] (positions past it
  masked out of the max) -> ``logits``, ``prediction``. Saved with ``paddle.jit.save`` (PIR ``.json`` on paddle 3,
  ``.pdmodel`` on 2.6). Served, it needs ``DistillReader(pad_value=PAD, lengths_feeds={"words": "length"})``.
  Either is exported for ``teachers.serve`` by ``run.py``.
- Student: a bag of words in dygraph: embedding (32) -> mean over the words (padding masked) -> linear -> logits.
  Trained alone (cross entropy) or distilled: ``w * CE(labels) + (1 - w) * T^2 * KL(softmax(t / T) ||
  softmax(s / T))`` with the teacher's logits ``t`` from DistillReader (Hinton et al., 2015).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

import numpy as np  # (numpy before paddle)
from data import PAD, Corpus, pad_batch


def _lod_tensor(sequences, place):
    import paddle

    rows = np.concatenate(sequences).reshape(-1, 1).astype(np.int64)
    return paddle.base.create_lod_tensor(rows, [[len(s) for s in sequences]], place)


def train_teacher(corpus: Corpus, out_dir: str, epochs: int, seed: int, batch_size: int = 64,
                  learning_rate: float = 0.002) -> float:
    """Train the LoD CNN teacher, save it as an inference model in ``out_dir``; returns its test accuracy."""
    import paddle

    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    main.random_seed = startup.random_seed = 1000 + seed
    classes = len(corpus.categories)
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        words = paddle.static.data("words", [-1, 1], "int64", lod_level=1)
        label = paddle.static.data("label", [-1, 1], "int64")
        emb = paddle.reshape(paddle.static.nn.embedding(words, size=[corpus.vocab_size, 64]), [-1, 64])
        conv = paddle.static.nn.sequence_conv(emb, num_filters=128, filter_size=3, act="tanh")
        pooled = paddle.static.nn.sequence_pool(conv, "max")
        logits = paddle.static.nn.fc(pooled, classes)
        prediction = paddle.nn.functional.softmax(logits)
        loss = paddle.mean(paddle.nn.functional.cross_entropy(logits, label))
        test_program = main.clone(for_test=True)
        paddle.optimizer.Adam(learning_rate).minimize(loss)
    place = paddle.CPUPlace()
    exe = paddle.static.Executor(place)
    scope = paddle.static.Scope()
    rng = np.random.default_rng(seed)
    with paddle.static.scope_guard(scope):
        exe.run(startup)
        for _ in range(epochs):
            order = rng.permutation(len(corpus.train_ids))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                exe.run(main, feed={"words": _lod_tensor([corpus.train_ids[i] for i in idx], place),
                                    "label": corpus.train_labels[idx].reshape(-1, 1)}, fetch_list=[loss])
        correct = 0
        for start in range(0, len(corpus.test_ids), 256):
            batch = corpus.test_ids[start:start + 256]
            out, = exe.run(test_program, feed={"words": _lod_tensor(batch, place),
                                               "label": corpus.test_labels[start:start + 256].reshape(-1, 1)},
                           fetch_list=[logits])
            correct += int((out.argmax(1) == corpus.test_labels[start:start + 256]).sum())
        paddle.static.save_inference_model(os.path.join(out_dir, "model"), [words], [logits, prediction], exe,
                                           program=test_program)
    paddle.disable_static()
    return correct / len(corpus.test_ids)


def padded_teacher(vocab_size: int, classes: int):
    """The padded CNN teacher (a ``paddle.nn.Layer``): ``(words [N, L], length [N, 1]) -> (logits, prediction)``."""
    import paddle

    class PaddedCnnTeacher(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.embedding = paddle.nn.Embedding(vocab_size, 64, padding_idx=PAD)
            self.conv = paddle.nn.Conv1D(64, 128, 3, padding=1)
            self.fc = paddle.nn.Linear(128, classes)

        def forward(self, words, length):
            conv = paddle.tanh(self.conv(self.embedding(words).transpose([0, 2, 1])))        # [N, 128, L]
            positions = paddle.arange(paddle.shape(words)[1], dtype="int64").unsqueeze(0)  # [1, L]
            outside = paddle.cast(positions >= length, "float32").unsqueeze(1)             # [N, 1, L]
            logits = self.fc((conv - 1e4 * outside).max(axis=2))
            return logits, paddle.nn.functional.softmax(logits)

    return PaddedCnnTeacher()


def train_padded_teacher(corpus: Corpus, out_dir: str, epochs: int, seed: int, batch_size: int = 64,
                         learning_rate: float = 0.002) -> float:
    """Train the padded CNN teacher in dygraph, save it with ``paddle.jit.save`` as ``out_dir/inference``;
    returns its test accuracy."""
    import paddle
    import paddle.nn.functional as F

    paddle.disable_static()
    paddle.seed(1000 + seed)
    model = padded_teacher(corpus.vocab_size, len(corpus.categories))
    optimizer = paddle.optimizer.Adam(learning_rate, parameters=model.parameters())
    rng = np.random.default_rng(seed)

    def tensors(sequences):
        lengths = np.array([[len(s)] for s in sequences], dtype=np.int64)
        return paddle.to_tensor(pad_batch(sequences)), paddle.to_tensor(lengths)

    for _ in range(epochs):
        order = rng.permutation(len(corpus.train_ids))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            logits, _ = model(*tensors([corpus.train_ids[i] for i in idx]))
            loss = F.cross_entropy(logits, paddle.to_tensor(corpus.train_labels[idx]))
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
    model.eval()
    correct = 0
    with paddle.no_grad():
        for start in range(0, len(corpus.test_ids), 256):
            logits, _ = model(*tensors(corpus.test_ids[start:start + 256]))
            correct += int((logits.numpy().argmax(1) == corpus.test_labels[start:start + 256]).sum())
    spec = [paddle.static.InputSpec([None, None], "int64", "words"),
            paddle.static.InputSpec([None, 1], "int64", "length")]
    paddle.jit.save(model, os.path.join(out_dir, "inference"), input_spec=spec)
    return correct / len(corpus.test_ids)


def make_student(vocab_size: int, classes: int, seed: int):
    """The bag-of-words student (a ``paddle.nn.Layer``), initialised from ``seed``."""
    import paddle

    paddle.seed(seed)

    class BowStudent(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.embedding = paddle.nn.Embedding(vocab_size, 32, padding_idx=PAD)
            self.fc = paddle.nn.Linear(32, classes)

        def forward(self, ids):
            mask = paddle.cast(ids != PAD, "float32").unsqueeze(-1)
            mean = (self.embedding(ids) * mask).sum(axis=1) / mask.sum(axis=1).clip(min=1.0)
            return self.fc(mean)

    return BowStudent()


def accuracy(model, corpus: Corpus) -> float:
    import paddle

    model.eval()
    correct = 0
    with paddle.no_grad():
        for start in range(0, len(corpus.test_ids), 256):
            logits = model(paddle.to_tensor(pad_batch(corpus.test_ids[start:start + 256])))
            correct += int((logits.numpy().argmax(1) == corpus.test_labels[start:start + 256]).sum())
    model.train()
    return correct / len(corpus.test_ids)


def train_student(corpus: Corpus, seed: int, epochs: int, batches: Callable[[int], Iterable[tuple]],
                  learning_rate: float = 0.01, temperature: float = 2.0, hard_label_weight: float = 0.5,
                  on_epoch: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Train a student; ``batches(epoch)`` yields ``(ids list, labels)`` or ``(ids list, labels, teacher logits)``
    (distilled). Returns the test accuracy after every epoch."""
    import paddle
    import paddle.nn.functional as F

    from distill_reader.dist.functional import kl_div_loss

    paddle.disable_static()   # (exporting the teacher leaves paddle in static mode)
    model = make_student(corpus.vocab_size, len(corpus.categories), seed)
    optimizer = paddle.optimizer.Adam(learning_rate, parameters=model.parameters())
    curve = []
    for epoch in range(epochs):
        for batch in batches(epoch):
            logits = model(paddle.to_tensor(pad_batch(list(batch[0]))))
            labels = paddle.to_tensor(np.asarray(batch[1], dtype=np.int64))
            loss = F.cross_entropy(logits, labels)
            if len(batch) > 2:   # distilled: the served teacher's logits; KL * T^2, 0 at equality
                kl = kl_div_loss(logits, np.asarray(batch[2], dtype=np.float32), temperature=temperature)
                loss = hard_label_weight * loss + (1 - hard_label_weight) * kl
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
        curve.append(accuracy(model, corpus))
        if on_epoch is not None:
            on_epoch(epoch, curve[-1])
    return curve
