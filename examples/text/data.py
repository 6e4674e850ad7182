"""The text-classification corpus of the example: Debian's ``fortunes`` package, one class per fortune file.

``/usr/share/games/fortunes/<category>`` holds short texts separated by lines holding only ``%`` (the strfile
format); installed by ``scripts/setup.sh`` (``apt-get install fortunes``). No network is needed.

Texts are lower-cased and split into words (``[a-z']+`` and numbers), cut to ``max_len`` words, and mapped to ids
with a vocabulary built on the training split only (id 0 = padding, 1 = unknown word). Duplicate texts are
dropped; the split is a seeded shuffle per category, so every class keeps its share in both splits.

Example::

    corpus = load_corpus(("computers", "politics"))
    corpus.train_ids[0]          # int64 array of word ids, any length
    corpus.train_labels[:5]      # int64 class ids
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

FORTUNES_DIR = "/usr/share/games/fortunes"
DEFAULT_CATEGORIES = ("computers", "definitions", "politics", "science", "songs-poems", "zippy")
PAD, UNKNOWN = 0, 1
_WORD = re.compile(r"[a-z']+|[0-9]+")


@dataclass
class Corpus:
    """Token id sequences (int64 arrays of any length) and class ids of both splits."""

    categories: tuple[str, ...]
    vocab: dict[str, int]
    train_ids: list[np.ndarray]
    train_labels: np.ndarray
    test_ids: list[np.ndarray]
    test_labels: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2


def read_fortunes(path: str) -> list[str]:
    """The texts of one fortune file (strfile format: texts separated by ``%`` lines)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fortune file {path} not found: install Debian's 'fortunes' package "
                                f"(bash scripts/setup.sh does it)")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return [t.strip() for t in re.split(r"^%$", text, flags=re.MULTILINE) if t.strip()]


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def load_corpus(categories=DEFAULT_CATEGORIES, fortunes_dir: str = FORTUNES_DIR, test_fraction: float = 0.2,
                max_len: int = 64, vocab_size: int = 8000, min_count: int = 2, limit_per_category: int = 0,
                split_seed: int = 0) -> Corpus:
    """Read, split and encode the corpus (see the module docstring)."""
    rng = np.random.default_rng(split_seed)
    train, test, seen = [], [], set()
    for label, category in enumerate(categories):
        texts = [t for t in read_fortunes(os.path.join(fortunes_dir, category)) if not (t in seen or seen.add(t))]
        tokens = [w[:max_len] for w in map(tokenize, texts) if w]
        order = rng.permutation(len(tokens))
        if limit_per_category:
            order = order[:limit_per_category]
        n_test = max(1, int(round(len(order) * test_fraction)))
        test += [(tokens[i], label) for i in order[:n_test]]
        train += [(tokens[i], label) for i in order[n_test:]]
    counts = Counter(w for words, _ in train for w in words)
    kept = [w for w, c in counts.most_common(vocab_size - 2) if c >= min_count]
    vocab = {w: i + 2 for i, w in enumerate(kept)}

    def encode(pairs):
        ids = [np.array([vocab.get(w, UNKNOWN) for w in words], dtype=np.int64) for words, _ in pairs]
        return ids, np.array([label for _, label in pairs], dtype=np.int64)

    train_ids, train_labels = encode(train)
    test_ids, test_labels = encode(test)
    return Corpus(tuple(categories), vocab, train_ids, train_labels, test_ids, test_labels)


def pad_batch(sequences: list[np.ndarray]) -> np.ndarray:
    """``[B, longest]`` int64 ids padded with ``PAD`` (the student's input)."""
    out = np.full((len(sequences), max(len(s) for s in sequences)), PAD, dtype=np.int64)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = s
    return out
