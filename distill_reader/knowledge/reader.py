"""KnowledgeReader: memory-mapped, checksum-checked reads of a knowledge cache directory."""
from __future__ import annotations

import bisect
import hashlib
import logging
import math
import mmap
import os
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Deque, Dict, Iterator, List, Optional, Union

import numpy as np

from .errors import (
    CorruptShardError,
    FormatError,
    InputMismatchError,
    KnowledgeError,
    SizeLimitError,
    UnsafeShardError,
)
from .manifest import DIGEST_FIELD, DIGEST_NBYTES, DIGEST_SCHEME, Manifest, ShardInfo, read_manifest
from .safe_io import open_regular
from .spec import FieldSpec, TopK, dense_topk

log = logging.getLogger(__name__)

Batch = Dict[str, Union[np.ndarray, TopK]]
DEFAULT_MAX_DENSE_BYTES = 1 << 30  # one dense top-k result of one read call


class _Shard:
    """An opened, verified shard: its mmap and one read-only array view per segment."""

    def __init__(self, mapped: Optional[mmap.mmap], views: Dict[tuple, np.ndarray]) -> None:
        self.mapped = mapped
        self.views = views

    def close(self) -> None:
        self.views = {}
        if self.mapped is not None:
            try:
                self.mapped.close()
            except BufferError:  # arrays given out with copy=False still use it; the GC closes it later
                pass


class KnowledgeReader:
    """Read a knowledge cache written by ``KnowledgeWriter`` (complete, or the committed part of an incomplete one).

    Shards are memory-mapped and each one is checked on its first use (the next shards are checked ahead in
    background threads), so a corrupted shard raises ``CorruptShardError`` naming it instead of giving wrong values.
    The first-use check compares the CRC-32 in the manifest by default (about 3 GB/s per core, it catches
    accidental corruption: bit flips, torn or zeroed blocks); ``verify()`` and the CLI compare the sha256.

    Args:
        path: the cache directory.
        topk_as: how top-k fields are returned: ``"dense"`` (``(n, ..., C)`` in the described dtype, every entry
            that is not among the top k set to the fill value stored in the description, or ``topk_fill``) or
            ``"sparse"`` (``TopK(values, indices)``, each ``(n, ..., k)``, values largest first, indices int64).
        topk_fill: overrides the fill value of dense top-k fields.
        verify_threads: background threads that check the checksums of the next shards while the current one is
            read; 0 checks each shard in the reading thread only.
        lazy_check: the checksum compared on a shard's first use: ``"crc32"`` (default, fast) or ``"sha256"``
            (about 1 GB/s per core).
        max_dense_bytes: the most one dense top-k field of one ``read`` may allocate (default 1 GiB): the class
            count comes from the manifest, not from bytes on disk, so a larger result is a ``SizeLimitError``
            (read fewer samples, use ``topk_as="sparse"``, or raise this limit for a cache you trust).

    The cache is untrusted input: files inside it are opened without following links or blocking (a symbolic
    link, FIFO, directory or device is ``UnsafeFileError`` for the manifest, ``UnsafeShardError`` for a shard),
    and every array is a view of bytes actually present in a shard whose size the manifest states.

    Example::

        with KnowledgeReader("/tmp/kn") as r:
            for batch in r.iter_batches(256):
                logits = batch["logits"]
    """

    def __init__(self, path: str, topk_as: str = "dense", topk_fill: Optional[float] = None,
                 verify_threads: int = 2, lazy_check: str = "crc32",
                 max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES) -> None:
        """Check the arguments.

        Raises:
            ValueError: ``topk_as``, ``lazy_check`` or ``max_dense_bytes`` is not one of its values.
            KnowledgeError: the folder is not a readable knowledge cache (missing or malformed manifest, unsafe file).
        """
        if topk_as not in ("dense", "sparse"):
            raise ValueError(f"topk_as must be 'dense' or 'sparse', not {topk_as!r}")
        if lazy_check not in ("crc32", "sha256"):
            raise ValueError(f"lazy_check must be 'crc32' or 'sha256', not {lazy_check!r}")
        if isinstance(max_dense_bytes, bool) or not isinstance(max_dense_bytes, int) or max_dense_bytes < 1:
            raise ValueError(f"max_dense_bytes must be a positive integer, not {max_dense_bytes!r}")
        self.lazy_check = lazy_check
        self.max_dense_bytes = max_dense_bytes
        self.path = os.fspath(path)
        self.topk_as = topk_as
        self.topk_fill = topk_fill
        self._lock = threading.Lock()
        self._opened: Dict[int, _Shard] = {}
        self._pending: Dict[int, Future] = {}
        self._ahead = max(0, int(verify_threads))
        self._executor = ThreadPoolExecutor(self._ahead, thread_name_prefix="knowledge-verify") if self._ahead else None
        self._load(read_manifest(self.path))

    def _load(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._starts = [s.start for s in manifest.shards]

    def refresh(self) -> None:
        """Re-read the manifest (to see shards a writer committed since this reader opened).

        Raises:
            FormatError: the cache was rewritten with another description.
            KnowledgeError: the new manifest cannot be read or is malformed.
        """
        manifest = read_manifest(self.path)
        if manifest.fields != self._manifest.fields:
            raise FormatError(f"knowledge cache {self.path} was rewritten with another description")
        self._load(manifest)

    # --- description -------------------------------------------------------------------------------------------
    @property
    def fields(self) -> List[FieldSpec]:
        return list(self._manifest.fields)

    @property
    def description(self) -> Dict[str, FieldSpec]:
        """``{name: FieldSpec}``: per-sample shape, dtype and storage of every field."""
        return {f.name: f for f in self._manifest.fields}

    @property
    def meta(self) -> dict:
        return self._manifest.meta

    @property
    def num_samples(self) -> int:
        return self._manifest.num_samples

    @property
    def complete(self) -> bool:
        return self._manifest.complete

    @property
    def has_input_digests(self) -> bool:
        return bool(self._manifest.input_digests)

    @property
    def digest_scheme(self) -> Optional[str]:
        """How the stored input digests were computed (``DIGEST_SCHEME``), None without digests."""
        return self._manifest.digest_scheme

    @property
    def shards(self) -> List[ShardInfo]:
        return list(self._manifest.shards)

    @property
    def nbytes(self) -> int:
        """Bytes of all shard files."""
        return sum(s.nbytes for s in self._manifest.shards)

    def __len__(self) -> int:
        return self.num_samples

    # --- reading -----------------------------------------------------------------------------------------------
    def read(self, start: int, stop: int, copy: bool = True) -> Batch:
        """Samples ``[start, stop)`` as ``{name: array (n, *shape)}`` in the described dtypes.

        With ``copy=False`` a field stored exactly and lying in one shard comes back as a read-only view of the
        memory map (no copy); otherwise arrays are fresh and writable.

        Raises:
            IndexError: ``[start, stop)`` is not within the stored samples.
            FormatError: a top-k field holds an index beyond its classes.
            CorruptShardError: a shard's checksum does not match on first use.
        """
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_samples:
            raise IndexError(f"knowledge cache {self.path}: samples [{start}, {stop}) out of range "
                             f"[0, {self.num_samples})")
        pieces = self._pieces(start, stop)
        out: Batch = {}
        for f in self._manifest.fields:
            if f.storage == "topk":
                values = self._gather(pieces, f.name, "values", f.dtype, True)
                indices = self._gather(pieces, f.name, "indices", None, False)
                if indices.size and int(indices.max()) >= f.shape[-1]:
                    raise FormatError(f"knowledge cache {self.path}: field {f.name!r} holds a top-k index beyond "
                                      f"{f.shape[-1]} classes")
                out[f.name] = self._topk_result(f, values, indices)
            else:
                out[f.name] = self._gather(pieces, f.name, "data", f.dtype, copy)
        return out

    def take(self, rows) -> Batch:
        """Samples at ``rows`` (any order, repeats allowed) as ``{name: array (len(rows), *shape)}``, like ``read``.

        Raises:
            IndexError: a row is outside ``[0, num_samples)``.

        Example::

            batch = reader.take([5, 0, 5])     # rows 5, 0 and 5 again
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.num_samples):
            bad = int(rows[(rows < 0) | (rows >= self.num_samples)][0])
            raise IndexError(f"knowledge cache {self.path}: sample {bad} out of range [0, {self.num_samples})")
        groups = self._row_groups(rows)
        out: Batch = {}
        for f in self._manifest.fields:
            if f.storage == "topk":
                values = self._take(groups, rows.size, f.name, "values", f.dtype)
                indices = self._take(groups, rows.size, f.name, "indices", None)
                if indices.size and int(indices.max()) >= f.shape[-1]:
                    raise FormatError(f"knowledge cache {self.path}: field {f.name!r} holds a top-k index beyond "
                                      f"{f.shape[-1]} classes")
                out[f.name] = self._topk_result(f, values, indices)
            else:
                out[f.name] = self._take(groups, rows.size, f.name, "data", f.dtype)
        return out

    def iter_batches(self, batch_size: int, start: int = 0, stop: Optional[int] = None, drop_last: bool = False,
                     copy: bool = True) -> Iterator[Batch]:
        """Yield ``read`` results of ``batch_size`` samples from ``start`` to ``stop`` (default: the end).

        Raises:
            ValueError: ``batch_size`` < 1.
            IndexError, FormatError, CorruptShardError: as ``read``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stop = self.num_samples if stop is None else stop
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            if drop_last and hi - lo < batch_size:
                return
            yield self.read(lo, hi, copy=copy)

    def input_digests(self, start: int, stop: int) -> np.ndarray:
        """The stored ``(n, 16)`` input digests of samples ``[start, stop)``.

        Raises:
            KnowledgeError: the cache was written without input digests.
            IndexError: ``[start, stop)`` is not within the stored samples.
        """
        if not self.has_input_digests:
            raise KnowledgeError(f"knowledge cache {self.path} was written without input digests")
        if not 0 <= start <= stop <= self.num_samples:
            raise IndexError(f"knowledge cache {self.path}: samples [{start}, {stop}) out of range "
                             f"[0, {self.num_samples})")
        return self._gather(self._pieces(start, stop), DIGEST_FIELD, "digest", None, False)

    def check_inputs(self, start: int, digests: np.ndarray) -> None:
        """Raise ``InputMismatchError`` unless ``digests`` (``sample_digests``) equal the stored ones from ``start``.

        The error names the first differing sample and its shard. Asking beyond the stored samples is a
        ``KnowledgeError`` (the inputs hold more samples than the cache).

        Raises:
            ValueError: ``digests`` is not of shape ``(n, 16)``.
            KnowledgeError: the cache holds digests of another scheme, or fewer samples than asked for.
            InputMismatchError: a digest differs (names the first such sample and its shard).
        """
        digests = np.asarray(digests)
        if digests.ndim != 2 or digests.shape[1] != DIGEST_NBYTES:
            raise ValueError(f"digests must have shape (n, {DIGEST_NBYTES}), got {digests.shape}")
        stop = start + digests.shape[0]
        if self.has_input_digests and self.digest_scheme != DIGEST_SCHEME:
            raise KnowledgeError(f"knowledge cache {self.path} holds input digests of scheme {self.digest_scheme!r}, "
                                 f"this version computes {DIGEST_SCHEME!r}: the inputs cannot be checked; write the "
                                 "cache again (or read it without checking inputs)")
        if stop > self.num_samples:
            state = "complete" if self.complete else "incomplete"
            raise KnowledgeError(f"knowledge cache {self.path} ({state}) holds {self.num_samples} samples, but "
                                 f"inputs for samples [{start}, {stop}) were given: the data differs from what "
                                 "the cache was written for")
        stored = self.input_digests(start, stop)
        differ = np.flatnonzero(np.any(stored != digests, axis=1))
        if differ.size:
            sample = start + int(differ[0])
            shard = self._manifest.shards[bisect.bisect_right(self._starts, sample) - 1].file
            raise InputMismatchError(
                f"knowledge cache {self.path}: sample {sample} (shard {shard}) was written for other inputs than the "
                f"ones given now ({differ.size} of samples [{start}, {stop}) differ): the data or its order changed "
                "since the cache was written; delete the cache or use another path", sample, shard)

    def verify(self, progress: bool = False) -> int:
        """Check every shard's size and sha256 now; return the bytes checked.

        Raises ``CorruptShardError`` naming every bad shard (``.shard`` is the first, ``.shards`` all of them).

        Raises:
            CorruptShardError: a shard has the wrong size or sha256 (``.shards`` names all of them).
        """
        from tqdm import tqdm

        bad: List[CorruptShardError] = []
        total = 0
        with tqdm(total=self.nbytes, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
            for (index, info), checked in zip(enumerate(self._manifest.shards), self._sha256_checks()):
                try:
                    shard = checked.result()
                except CorruptShardError as exc:
                    bad.append(exc)
                else:
                    with self._lock:
                        old = self._opened.pop(index, None)
                        self._opened[index] = shard
                    if old is not None:
                        old.close()
                    total += info.nbytes
                bar.update(info.nbytes)
        if bad:
            error = CorruptShardError("\n".join(str(e) for e in bad), bad[0].shard)
            error.shards = [e.shard for e in bad]
            raise error
        return total

    def _sha256_checks(self) -> Iterator[Future]:
        """One future per shard, in order, resolving to the sha256-checked shard (a bounded window in parallel)."""
        count = len(self._manifest.shards)
        if self._executor is None:
            for index in range(count):
                future: Future = Future()
                try:
                    future.set_result(self._open_checked(index, "sha256"))
                except CorruptShardError as exc:
                    future.set_exception(exc)
                yield future
            return
        window: Deque[Future] = deque()
        submitted = 0
        for _ in range(count):
            while submitted < count and len(window) <= self._ahead:
                window.append(self._executor.submit(self._open_checked, submitted, "sha256"))
                submitted += 1
            yield window.popleft()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            opened, self._opened = self._opened, {}
            self._pending.clear()
        for shard in opened.values():
            shard.close()

    def __enter__(self) -> KnowledgeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------------------
    def _pieces(self, start: int, stop: int) -> List[tuple]:
        """(shard views, lo, hi) for every shard overlapping ``[start, stop)``, lo/hi relative to the shard."""
        if start == stop:
            return []
        out = []
        index = bisect.bisect_right(self._starts, start) - 1
        shards = self._manifest.shards
        while index < len(shards) and shards[index].start < stop:
            info = shards[index]
            out.append((self._shard(index).views, max(start, info.start) - info.start,
                        min(stop, info.stop) - info.start))
            index += 1
        return out

    def _row_groups(self, rows: np.ndarray) -> List[tuple]:
        """(shard views, positions in ``rows``, rows relative to the shard) for every shard ``rows`` touch."""
        if not rows.size:
            return []
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        groups = []
        for index in np.unique(shard_of):
            where = np.flatnonzero(shard_of == index)
            groups.append((self._shard(int(index)).views, where, rows[where] - self._starts[int(index)]))
        return groups

    def _take(self, groups: List[tuple], n: int, field: str, part: str, dtype: Optional[np.dtype]) -> np.ndarray:
        template_dtype, shape = self._segment_template(field, part)
        out = np.empty((n,) + tuple(shape), dtype if dtype is not None else template_dtype)
        for views, where, local in groups:
            out[where] = views[(field, part)][local]
        return out

    def _gather(self, pieces: List[tuple], field: str, part: str, dtype: Optional[np.dtype],
                copy: bool) -> np.ndarray:
        key = (field, part)
        if not pieces:
            spec = self._segment_template(field, part)
            return np.empty((0,) + spec[1], dtype if dtype is not None else spec[0])
        arrays = [views[key][lo:hi] for views, lo, hi in pieces]
        target = dtype if dtype is not None else arrays[0].dtype.newbyteorder("=")
        if len(arrays) == 1 and not copy and arrays[0].dtype == target:
            return arrays[0]
        n = sum(a.shape[0] for a in arrays)
        out = np.empty((n,) + arrays[0].shape[1:], target)
        row = 0
        for a in arrays:
            np.copyto(out[row:row + a.shape[0]], a, casting="unsafe")
            row += a.shape[0]
        return out

    def _segment_template(self, field: str, part: str) -> tuple:
        if field == DIGEST_FIELD:
            return np.dtype("u1"), (DIGEST_NBYTES,)
        for p in self.description[field].parts:
            if p.name == part:
                return p.dtype.newbyteorder("="), p.shape
        raise KeyError((field, part))

    def _topk_result(self, f: FieldSpec, values: np.ndarray, indices: np.ndarray) -> Union[np.ndarray, TopK]:
        indices = indices.astype(np.int64)
        if self.topk_as == "sparse":
            return TopK(values, indices)
        dense_bytes = values.shape[0] * math.prod(f.shape) * f.dtype.itemsize
        if dense_bytes > self.max_dense_bytes:
            raise SizeLimitError(f"knowledge cache {self.path}: field {f.name!r} declares {f.shape[-1]} classes: a "
                                 f"dense read of {values.shape[0]} samples would allocate {dense_bytes} bytes, more "
                                 f"than max_dense_bytes={self.max_dense_bytes} (read fewer samples, use "
                                 "topk_as='sparse', or raise max_dense_bytes for a cache you trust)")
        return dense_topk(values, indices, f.shape, f.dtype, self.topk_fill if self.topk_fill is not None else f.fill)

    def _shard(self, index: int) -> _Shard:
        """The verified shard ``index`` (checked now, or by a background thread); schedules the next shards' checks."""
        with self._lock:
            shard = self._opened.get(index)
            future = self._pending.pop(index, None) if shard is None else None
        if shard is None:
            shard = future.result() if future is not None else self._open_checked(index)
            with self._lock:
                self._opened.setdefault(index, shard)
                shard = self._opened[index]
        if self._executor is not None:
            with self._lock:
                for nxt in range(index + 1, min(index + 1 + self._ahead, len(self._manifest.shards))):
                    if nxt not in self._opened and nxt not in self._pending:
                        self._pending[nxt] = self._executor.submit(self._open_checked, nxt)
        return shard

    def _open_checked(self, index: int, check: Optional[str] = None) -> _Shard:
        """Map shard ``index``, check its size and checksum (``check``, default ``lazy_check``), build its views."""
        info = self._manifest.shards[index]
        full = os.path.join(self.path, info.file)
        where = f"knowledge cache {self.path}: shard {info.file} (samples [{info.start}, {info.stop}))"
        try:
            fd, size = open_regular(full, lambda message, name: UnsafeShardError(f"{where}: {message}", name),
                                    info.file)
        except FileNotFoundError:
            raise CorruptShardError(f"{where} is missing", info.file) from None
        except OSError as exc:
            raise CorruptShardError(f"{where} cannot be read: {exc}", info.file) from None
        try:
            if size != info.nbytes:
                raise CorruptShardError(f"{where} has {size} bytes, the manifest says {info.nbytes}", info.file)
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        except OSError as exc:
            raise CorruptShardError(f"{where} cannot be mapped: {exc}", info.file) from None
        finally:
            os.close(fd)
        data = mapped if mapped is not None else b""
        if (check or self.lazy_check) == "sha256":
            actual, wanted = hashlib.sha256(data).hexdigest(), info.checksum
        else:
            actual, wanted = f"{zlib.crc32(data):08x}", f"{info.crc32:08x}"
        if actual != wanted:
            if mapped is not None:
                mapped.close()
            raise CorruptShardError(f"{where} is corrupt: {check or self.lazy_check} {actual[:16]} differs from "
                                    f"the manifest's {wanted[:16]}", info.file)
        views = {(s.field, s.part): np.ndarray(s.shape, s.dtype, buffer=data, offset=s.offset)
                 for s in info.segments}
        return _Shard(mapped, views)
