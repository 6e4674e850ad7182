"""MNIST data for the example: IDX files from ``--data_dir``, else MNIST (cached or downloaded once), else
Fashion-MNIST.

Offline (``offline=True``, ``--offline`` or ``DISTILL_OFFLINE=1``) nothing is downloaded: a cached MNIST download is
used if there is one, else Debian's Fashion-MNIST. Online, the download is tried once (one request per file, no
retries) and the data's ``source`` says which data was used and why.

The images come back as float32 arrays of shape ``(N, 1, 28, 28)`` scaled to [-1, 1] (as the seed's
``paddle.dataset.mnist`` did) and labels as int64 arrays of shape ``(N, 1)``.

Example::

    data = load_data("/path/to/mnist")          # or load_data(None, offline=True)
    print(data.source)                          # says which files were used
    reader = sample_list_reader(data.train_images, data.train_labels, batch_size=64, seed=1)
    for batch in reader():                      # a list of (img, label) samples per batch
        ...
"""
from __future__ import annotations

import gzip  # before paddle: paddle 2.6.2 exports zlib symbols (see docs/environment)
import hashlib
import logging
import os
import struct
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# A folder holding only the 10k test files is split: this many of them train, the rest test.
TEST_ONLY_TRAIN_PART = 8000
# Paddle's MNIST mirror (paddle.vision.datasets.MNIST's URLs and MD5 sums) and its cache folder.
MNIST_URL = "https://dataset.bj.bcebos.com/mnist/"
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
MNIST_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "paddle", "dataset", "mnist")
OFFLINE_ENV = "DISTILL_OFFLINE"


def offline_from_env() -> bool:
    """True when ``DISTILL_OFFLINE`` is set to 1/true/yes: the example then never tries to download."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class DataError(RuntimeError):
    """No usable MNIST data: names every place that was tried."""


@dataclass
class MnistData:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # human-readable: which files, which split
    name: str = "MNIST"  # the data set's name: "MNIST" or "Fashion-MNIST"
    val_images: Optional[np.ndarray] = None  # held out from the training set (``hold_out``); never trained on
    val_labels: Optional[np.ndarray] = None

    def subset(self, train_samples: int = 0, test_samples: int = 0) -> MnistData:
        """The first ``train_samples`` / ``test_samples`` samples (0 keeps all)."""
        tr = slice(None, train_samples or None)
        te = slice(None, test_samples or None)
        return MnistData(self.train_images[tr], self.train_labels[tr], self.test_images[te], self.test_labels[te],
                         self.source, self.name, self.val_images, self.val_labels)

    def hold_out(self, val_samples: int) -> MnistData:
        """The last ``val_samples`` training samples become the validation set (0: no validation set).

        Raises:
            DataError: when ``val_samples`` leaves no training samples.
        """
        if not val_samples:
            return self
        if val_samples >= len(self.train_images):
            raise DataError(f"--val_samples {val_samples} leaves nothing of the {len(self.train_images)} training "
                            "samples to train on")
        k = len(self.train_images) - val_samples
        return MnistData(self.train_images[:k], self.train_labels[:k], self.test_images, self.test_labels,
                         self.source, self.name, self.train_images[k:], self.train_labels[k:])

    def shard(self, rank: int, nranks: int) -> MnistData:
        """This trainer's share of the training set (every ``nranks``-th sample); the test set stays whole."""
        if nranks <= 1:
            return self
        usable = len(self.train_images) - len(self.train_images) % nranks  # equal shards: equal step counts
        part = slice(rank, usable, nranks)
        return MnistData(self.train_images[part], self.train_labels[part], self.test_images,
                         self.test_labels, f"{self.source}; training shard {rank}/{nranks}", self.name,
                         self.val_images, self.val_labels)


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
                         f"{name} test set only ({folder}): first {k} samples train, last {len(test[0]) - k} test",
                         name)
    return MnistData(train[0], train[1], test[0], test[1], f"{name} ({folder}): {len(train[0])} train, "
                     f"{len(test[0])} test", name)


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _cached_mnist(folder: str) -> bool:
    """True when ``folder`` holds the four MNIST files with Paddle's MD5 sums."""
    return all(os.path.isfile(os.path.join(folder, n)) and _md5(os.path.join(folder, n)) == md5
               for n, md5 in MNIST_MD5.items())


def download_mnist(folder: str = MNIST_CACHE, timeout: float = 15.0) -> None:
    """Download the four MNIST files into ``folder`` (Paddle's cache), one request each and no retry.

    Raises:
        OSError: on the first file that cannot be fetched (no network, proxy) or has the wrong MD5 sum.
    """
    os.makedirs(folder, exist_ok=True)
    for name, md5 in MNIST_MD5.items():
        path = os.path.join(folder, name)
        if os.path.isfile(path) and _md5(path) == md5:
            continue
        with urllib.request.urlopen(MNIST_URL + name, timeout=timeout) as response:
            body = response.read()
        if hashlib.md5(body).hexdigest() != md5:
            raise OSError(f"{MNIST_URL + name}: MD5 {hashlib.md5(body).hexdigest()}, expected {md5}")
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, path)


def load_data(data_dir: Optional[str] = None, fashion_dir: str = FASHION_MNIST_DIR, offline: Optional[bool] = None,
              mnist_cache: str = MNIST_CACHE) -> MnistData:
    """``data_dir`` if given; else MNIST (cached, or downloaded once unless offline); else Debian's Fashion-MNIST.

    ``offline`` None reads ``DISTILL_OFFLINE``. The result's ``source`` names the data and why it was chosen.

    Raises:
        DataError: when no data can be found (naming every place tried).
    """
    if data_dir:
        same_as_fashion = os.path.isdir(data_dir) and os.path.isdir(fashion_dir) and os.path.samefile(
            data_dir, fashion_dir)
        return load_idx_dir(data_dir, name="Fashion-MNIST" if same_as_fashion else "MNIST")
    offline = offline_from_env() if offline is None else offline
    if _cached_mnist(mnist_cache):
        return load_idx_dir(mnist_cache, name="MNIST")
    if offline:
        why = f"offline ({OFFLINE_ENV}=1 or --offline), no MNIST in {mnist_cache}"
    else:
        try:
            download_mnist(mnist_cache)
            return load_idx_dir(mnist_cache, name="MNIST")
        except Exception as exc:  # no network, proxy, checksum...: fall back, and say why
            why = f"MNIST download failed: {type(exc).__name__}: {exc}"
            log.warning("%s; using Fashion-MNIST from %s (set %s=1 to skip the download)", why, fashion_dir,
                        OFFLINE_ENV)
    if os.path.isdir(fashion_dir) and _find(fashion_dir, TRAIN_FILES[0]):
        data = load_idx_dir(fashion_dir, name="Fashion-MNIST")
        data.source += f" ({why})"
        return data
    raise DataError(f"no data: {why}, and no Fashion-MNIST in {fashion_dir} "
                    "(apt-get install dataset-fashion-mnist, or pass --data_dir with MNIST IDX files)")


def sample_list_reader(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: Optional[int] = None,
                       drop_last: bool = False, samples_per_epoch: int = 0) -> Callable[[], Iterator[list]]:
    """A reader yielding lists of ``(img, label)`` samples; shuffled per epoch when ``seed`` is given.

    Each call of the returned reader is one epoch; epoch ``e`` uses the permutation of ``seed + e``, so two
    runs with the same seed see the same batches. ``samples_per_epoch`` larger than ``len(images)`` makes an epoch
    that many samples, drawn as consecutive shuffled passes (a small labelled set trained for as many steps as a
    larger one).
    """
    epoch = [0]
    per_epoch = max(samples_per_epoch, len(images)) if samples_per_epoch else len(images)

    def reader() -> Iterator[list]:
        passes = -(-per_epoch // len(images))
        orders = []
        for k in range(passes):
            order = np.arange(len(images))
            if seed is not None:
                np.random.RandomState((seed + epoch[0]) * 1000 + k if k else seed + epoch[0]).shuffle(order)
            orders.append(order)
        order = np.concatenate(orders)[:per_epoch]
        epoch[0] += 1
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield [(images[i], labels[i]) for i in idx]

    return reader
