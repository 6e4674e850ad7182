"""MNIST data for the example: IDX files from ``--data_dir``, else Paddle's MNIST download, else Fashion-MNIST.

The images come back as float32 arrays of shape ``(N, 1, 28, 28)`` scaled to [-1, 1] (as the seed's
``paddle.dataset.mnist`` did) and labels as int64 arrays of shape ``(N, 1)``.

Example::

    data = load_data("/path/to/mnist")          # or load_data(None) to download / fall back
    print(data.source)                          # says which files were used
    reader = sample_list_reader(data.train_images, data.train_labels, batch_size=64, seed=1)
    for batch in reader():                      # a list of (img, label) samples per batch
        ...
"""
from __future__ import annotations

import gzip  # before paddle: paddle 2.6.2 exports zlib symbols (see docs/environment)
import logging
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# A folder holding only the 10k test files is split: this many of them train, the rest test.
TEST_ONLY_TRAIN_PART = 8000


class DataError(RuntimeError):
    """No usable MNIST data: names every place that was tried."""


@dataclass
class MnistData:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # human-readable: which files, which split

    def subset(self, train_samples: int = 0, test_samples: int = 0) -> MnistData:
        """The first ``train_samples`` / ``test_samples`` samples (0 keeps all)."""
        tr = slice(None, train_samples or None)
        te = slice(None, test_samples or None)
        return MnistData(self.train_images[tr], self.train_labels[tr], self.test_images[te], self.test_labels[te],
                         self.source)

    def shard(self, rank: int, nranks: int) -> MnistData:
        """This trainer's share of the training set (every ``nranks``-th sample); the test set stays whole."""
        if nranks <= 1:
            return self
        usable = len(self.train_images) - len(self.train_images) % nranks  # equal shards: equal step counts
        part = slice(rank, usable, nranks)
        return MnistData(self.train_images[part], self.train_labels[part], self.test_images,
                         self.test_labels, f"{self.source}; training shard {rank}/{nranks}")


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a uint8 array, e.g. ``(10000, 28, 28)`` for images."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file holds {body.size}")
    return body.reshape(dims)


def _find(folder: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _images(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)


def _labels(raw: np.ndarray) -> np.ndarray:
    return raw.astype(np.int64).reshape(-1, 1)


def _pair(folder: str, files: tuple[str, str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    paths = [_find(folder, f) for f in files]
    if None in paths:
        return None
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return _images(images), _labels(labels)


def load_idx_dir(folder: str, name: str = "MNIST") -> MnistData:
    """Read the four IDX files from ``folder``; a folder with only the t10k files is split 8000 train / 2000 test."""
    if not os.path.isdir(folder):
        raise DataError(f"--data_dir {folder!r} is not a directory")
    test = _pair(folder, TEST_FILES)
    train = _pair(folder, TRAIN_FILES)
    if test is None:
        raise DataError(f"{folder}: no {TEST_FILES[0]}[.gz] + {TEST_FILES[1]}[.gz]")
    if train is None:
        k = TEST_ONLY_TRAIN_PART
        return MnistData(test[0][:k], test[1][:k], test[0][k:], test[1][k:],
                         f"{name} test set only ({folder}): first {k} samples train, last {len(test[0]) - k} test")
    return MnistData(train[0], train[1], test[0], test[1], f"{name} ({folder}): {len(train[0])} train, "
                     f"{len(test[0])} test")


def download_mnist() -> MnistData:
    """Paddle's MNIST (downloaded into ~/.cache/paddle/dataset/mnist on first use)."""
    import paddle  # late: numpy and gzip are loaded by now

    paths = {}
    for mode in ("train", "test"):
        ds = paddle.vision.datasets.MNIST(mode=mode, download=True, backend="cv2")
        paths[mode] = (ds.image_path, ds.label_path)
    folder = os.path.dirname(paths["train"][0])
    train = _images(read_idx(paths["train"][0])), _labels(read_idx(paths["train"][1]))
    test = _images(read_idx(paths["test"][0])), _labels(read_idx(paths["test"][1]))
    return MnistData(train[0], train[1], test[0], test[1],
                     f"MNIST downloaded by paddle.vision ({folder}): {len(train[0])} train, {len(test[0])} test")


def load_data(data_dir: Optional[str] = None, fashion_dir: str = FASHION_MNIST_DIR) -> MnistData:
    """``data_dir`` if given; else Paddle's MNIST download; if that fails, Debian's Fashion-MNIST."""
    if data_dir:
        same_as_fashion = os.path.isdir(data_dir) and os.path.isdir(fashion_dir) and os.path.samefile(
            data_dir, fashion_dir)
        return load_idx_dir(data_dir, name="Fashion-MNIST" if same_as_fashion else "MNIST")
    try:
        return download_mnist()
    except Exception as exc:  # no network, proxy, checksum...: fall back, and say why
        log.warning("MNIST download failed (%s: %s); trying Fashion-MNIST in %s", type(exc).__name__, exc, fashion_dir)
        download_error = f"{type(exc).__name__}: {exc}"
    if os.path.isdir(fashion_dir) and _find(fashion_dir, TRAIN_FILES[0]):
        data = load_idx_dir(fashion_dir, name="Fashion-MNIST")
        data.source += " (MNIST download failed)"
        return data
    raise DataError(f"no data: MNIST download failed ({download_error}) and no Fashion-MNIST in {fashion_dir} "
                    "(apt-get install dataset-fashion-mnist, or pass --data_dir with MNIST IDX files)")


def sample_list_reader(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: Optional[int] = None,
                       drop_last: bool = False) -> Callable[[], Iterator[list]]:
    """A reader yielding lists of ``(img, label)`` samples; shuffled per epoch when ``seed`` is given.

    Each call of the returned reader is one epoch; epoch ``e`` uses the permutation of ``seed + e``, so two
    runs with the same seed see the same batches.
    """
    epoch = [0]

    def reader() -> Iterator[list]:
        order = np.arange(len(images))
        if seed is not None:
            np.random.RandomState(seed + epoch[0]).shuffle(order)
        epoch[0] += 1
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield [(images[i], labels[i]) for i in idx]

    return reader
