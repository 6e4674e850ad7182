"""KnowledgeWriter: append per-sample knowledge to a crash-safe, sharded cache directory."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import zlib
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from distill_base.atomic_file import create_exclusive, fsync_dir

from .errors import KnowledgeError, UnsafeFileError
from .manifest import (
    DIGEST_NBYTES,
    DIGEST_SCHEME,
    MANIFEST_NAME,
    Manifest,
    Segment,
    ShardInfo,
    expected_segments,
    read_manifest,
    shard_name,
    write_manifest,
)
from .safe_io import kind_of, remove_entry
from .spec import FieldsArg, FieldSpec, StorageArg, cast_checked, resolve_fields

log = logging.getLogger(__name__)

ALIGN = 64
LOCK_NAME = ".lock"
DEFAULT_SHARD_BYTES = 32 << 20
DEFAULT_SHARD_SAMPLES = 8192


class KnowledgeWriter:
    """Write knowledge (any set of named arrays per sample) to the cache directory ``path``, shard by shard.

    A shard is written to a temp name, fsynced and renamed, then the manifest is replaced atomically: after a crash
    (even SIGKILL) the cache holds exactly the committed shards. Opening an incomplete cache again resumes it:
    ``num_samples`` then tells how many samples are already stored, and the next ``append`` continues after them.

    Args:
        path: the cache directory (created if missing).
        fields: ``{name: (per_sample_shape, dtype)}``.
        storage: ``"float32"`` (default), ``"float16"``, ``"raw"``, ``"topk:K"``, ``"topk:K:FILL"``, or a dict per
            field (see ``distill_reader.knowledge.spec``).
        shard_samples: samples per shard; default: 32 MiB worth, at most 8192. A crash loses at most the samples
            of one unfinished shard; ``flush()`` commits earlier.
        meta: JSON-serialisable dict kept in the manifest (on resume, a given meta replaces the stored one).
        overwrite: remove an existing cache at ``path`` first (otherwise a complete cache is an error and an
            incomplete one with the same fields and storage is resumed).

    Example::

        with KnowledgeWriter("/tmp/kn", {"logits": ((10,), "float32")}, storage="float16") as w:
            w.append({"logits": np.zeros((32, 10), "float32")})
    """

    def __init__(self, path: str, fields: FieldsArg, storage: StorageArg = "float32",
                 shard_samples: Optional[int] = None, meta: Optional[Mapping[str, Any]] = None,
                 overwrite: bool = False) -> None:
        """Check the arguments.

        Raises:
            KnowledgeError: ``shard_samples`` < 1, a bad description, or the folder cannot be created.
        """
        self.path = os.fspath(path)
        specs = resolve_fields(fields, storage)
        meta_dict = dict(meta or {})
        _check_json(meta_dict)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise KnowledgeError(f"cannot create the knowledge cache folder {self.path}: {exc}") from None
        self._lock_fd = _lock(self.path)
        try:
            if overwrite:
                _remove_cache_files(self.path)
            self._manifest = self._open_manifest(specs, meta_dict if meta is not None else None)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.fields: List[FieldSpec] = self._manifest.fields
        sample_bytes = max(1, sum(f.sample_nbytes for f in self.fields))
        if shard_samples is not None and shard_samples < 1:
            os.close(self._lock_fd)
            raise KnowledgeError(f"shard_samples must be >= 1, got {shard_samples}")
        auto = max(1, min(DEFAULT_SHARD_SAMPLES, DEFAULT_SHARD_BYTES // sample_bytes))
        self.shard_samples = int(shard_samples or auto)
        self._pending: List[Dict[str, np.ndarray]] = []
        self._pending_digests: List[np.ndarray] = []
        self._pending_count = 0
        self._closed = False
        self._reader = None

    def _open_manifest(self, specs: List[FieldSpec], meta: Optional[Dict[str, Any]]) -> Manifest:
        if not os.path.lexists(os.path.join(self.path, MANIFEST_NAME)):
            _remove_cache_files(self.path)
            manifest = Manifest(specs, None, meta or {})
            write_manifest(self.path, manifest)
            return manifest
        manifest = read_manifest(self.path)
        if manifest.complete:
            raise KnowledgeError(f"knowledge cache {self.path} is complete: read it with KnowledgeReader, "
                                 "or pass overwrite=True to write it again")
        if manifest.fields != specs:
            raise KnowledgeError(f"knowledge cache {self.path} was started with other fields or storage:\n"
                                 f"  stored: {[f.to_json() for f in manifest.fields]}\n"
                                 f"  given:  {[f.to_json() for f in specs]}\n"
                                 "use the same description, another path, or overwrite=True")
        if manifest.input_digests and manifest.digest_scheme != DIGEST_SCHEME:
            raise KnowledgeError(f"knowledge cache {self.path} holds input digests of scheme "
                                 f"{manifest.digest_scheme!r}, this version computes {DIGEST_SCHEME!r}: it cannot "
                                 "be resumed; delete it (or pass overwrite=True) to write it again")
        _remove_stray_files(self.path, {s.file for s in manifest.shards})
        if meta is not None and meta != manifest.meta:
            manifest.meta = meta
            write_manifest(self.path, manifest)
        log.info("resuming knowledge cache %s after %d samples in %d shards", self.path, manifest.num_samples,
                 len(manifest.shards))
        return manifest

    @property
    def num_samples(self) -> int:
        """Samples appended so far, committed or pending (right after opening: those already in the cache)."""
        return self._manifest.num_samples + self._pending_count

    @property
    def committed_samples(self) -> int:
        """Samples in committed shards (what survives a crash right now)."""
        return self._manifest.num_samples

    @property
    def complete(self) -> bool:
        return self._manifest.complete

    @property
    def meta(self) -> Dict[str, Any]:
        return self._manifest.meta

    def append(self, arrays: Mapping[str, Any], input_digests: Optional[np.ndarray] = None) -> None:
        """Append ``n`` samples: ``arrays`` maps every field name to an array of shape ``(n, *shape)``.

        ``input_digests`` (``(n, 16)`` uint8 from ``sample_digests``) fingerprints what produced them; give it for
        every append or for none.

        Raises:
            KnowledgeError: a missing or unknown field, a wrong per-sample shape, fields of different sample counts, or
                ``input_digests`` given for some appends only or of the wrong shape/dtype; or the shard cannot be
                written.
        """
        self._check_open()
        missing = [f.name for f in self.fields if f.name not in arrays]
        extra = sorted(set(arrays) - {f.name for f in self.fields})
        if missing or extra:
            raise KnowledgeError(f"append to {self.path}: missing field(s) {missing}, unknown field(s) {extra}")
        n = None
        encoded: Dict[str, np.ndarray] = {}
        for f in self.fields:
            array = np.asarray(arrays[f.name])
            if array.ndim != len(f.shape) + 1 or array.shape[1:] != f.shape:
                raise KnowledgeError(f"append to {self.path}: field {f.name!r} has shape {array.shape}, "
                                     f"expected (n, {', '.join(map(str, f.shape))})")
            if n is None:
                n = array.shape[0]
            elif array.shape[0] != n:
                raise KnowledgeError(f"append to {self.path}: field {f.name!r} has {array.shape[0]} samples, "
                                     f"the first field has {n}")
            given = array
            array = cast_checked(array, f.dtype, f"append to {self.path}: field {f.name!r}")
            for part, stored in f.encode(array).items():
                # keep our own copy: the caller may reuse its buffers before the shard is written
                encoded[f"{f.name}\0{part}"] = stored.copy() if np.may_share_memory(stored, given) else stored
        with_digests = input_digests is not None
        if self._manifest.input_digests is None and not self._pending:
            self._manifest.input_digests = with_digests
            self._manifest.digest_scheme = DIGEST_SCHEME if with_digests else None
        elif self._manifest.input_digests != with_digests:
            raise KnowledgeError(f"append to {self.path}: input_digests must be given for every append or for none "
                                 f"(this cache {'has' if self._manifest.input_digests else 'has no'} digests)")
        if with_digests:
            digests = np.asarray(input_digests)
            if digests.dtype != np.uint8 or digests.shape != (n, DIGEST_NBYTES):
                raise KnowledgeError(f"append to {self.path}: input_digests must be uint8 of shape ({n}, "
                                     f"{DIGEST_NBYTES}), got {digests.dtype} {digests.shape}")
            self._pending_digests.append(np.array(digests, copy=True, order="C"))
        if n == 0:
            return
        self._pending.append(encoded)
        self._pending_count += n
        while self._pending_count >= self.shard_samples:
            self._commit(self.shard_samples)

    def flush(self) -> None:
        """Commit the pending samples as a (possibly short) shard now."""
        self._check_open()
        if self._pending_count:
            self._commit(self._pending_count)

    def close(self, complete: bool = True) -> None:
        """Commit what is pending; with ``complete=True`` mark the cache complete (read-only from now on)."""
        if self._closed:
            return
        try:
            if self._pending_count:
                self._commit(self._pending_count)
            if complete:
                if self._manifest.input_digests is None:
                    self._manifest.input_digests = False
                self._manifest.complete = True
                write_manifest(self.path, self._manifest)
                log.info("knowledge cache %s complete: %d samples", self.path, self._manifest.num_samples)
        finally:
            self._closed = True
            if self._reader is not None:
                self._reader.close()
            os.close(self._lock_fd)

    def check_inputs(self, start: int, digests: np.ndarray) -> None:
        """Check ``digests`` against the committed samples from ``start`` (see ``KnowledgeReader.check_inputs``)."""
        from .reader import KnowledgeReader

        if self._reader is None or self._reader.num_samples != self.committed_samples:
            if self._reader is not None:
                self._reader.close()
            self._reader = KnowledgeReader(self.path)
        self._reader.check_inputs(start, digests)

    def __enter__(self) -> KnowledgeWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    def _check_open(self) -> None:
        if self._closed:
            raise KnowledgeError(f"knowledge writer for {self.path} is closed")

    def _take(self, count: int) -> tuple:
        """Remove the first ``count`` pending samples: (part arrays, digests or None)."""
        taken: Dict[str, List[np.ndarray]] = {}
        digests: List[np.ndarray] = []
        need = count
        while need:
            chunk = self._pending[0]
            size = next(iter(chunk.values())).shape[0]
            use = min(size, need)
            for key, array in chunk.items():
                taken.setdefault(key, []).append(array[:use])
            if self._pending_digests:
                digests.append(self._pending_digests[0][:use])
            if use == size:
                self._pending.pop(0)
                if self._pending_digests:
                    self._pending_digests.pop(0)
            else:
                self._pending[0] = {k: a[use:] for k, a in chunk.items()}
                if self._pending_digests:
                    self._pending_digests[0] = self._pending_digests[0][use:]
            need -= use
        self._pending_count -= count
        parts = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in taken.items()}
        return parts, (np.concatenate(digests) if digests else None)

    def _commit(self, count: int) -> None:
        parts, digests = self._take(count)
        index = len(self._manifest.shards)
        name = shard_name(index)
        final = os.path.join(self.path, name)
        temp = final + ".tmp"
        hasher = hashlib.sha256()
        crc = 0
        segments = []
        offset = 0
        try:
            fd = create_exclusive(temp)
        except OSError as exc:
            raise KnowledgeError(f"knowledge cache {self.path}: cannot create {name}.tmp: {exc}") from None
        with os.fdopen(fd, "wb") as out:
            for field, part, dtype, shape in expected_segments(self.fields, bool(self._manifest.input_digests),
                                                               count):
                array = digests if field.startswith("#") else parts[f"{field}\0{part}"]
                assert array.dtype == dtype and array.shape == shape, (field, part, array.dtype, array.shape)
                pad = -offset % ALIGN
                if pad:
                    out.write(b"\0" * pad)
                    hasher.update(b"\0" * pad)
                    crc = zlib.crc32(b"\0" * pad, crc)
                    offset += pad
                data = memoryview(np.ascontiguousarray(array)).cast("B")
                out.write(data)
                hasher.update(data)
                crc = zlib.crc32(data, crc)
                segments.append(Segment(field, part, offset, data.nbytes, dtype, shape))
                offset += data.nbytes
            out.flush()
            os.fsync(out.fileno())
        try:
            os.replace(temp, final)  # replaces a planted link of that name, never writes through it
        except OSError as exc:
            raise KnowledgeError(f"knowledge cache {self.path}: cannot commit {name}: {exc}") from None
        start = self._manifest.num_samples
        self._manifest.shards.append(ShardInfo(name, start, start + count, offset, hasher.hexdigest(), crc,
                                               tuple(segments)))
        write_manifest(self.path, self._manifest)  # fsyncs the directory, which also makes the rename durable
        log.debug("committed %s: samples [%d, %d), %d bytes", name, start, start + count, offset)


def _check_json(meta: Dict[str, Any]) -> None:
    import json

    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise KnowledgeError(f"meta must be JSON-serialisable: {exc}") from None


def _lock(path: str) -> int:
    full = os.path.join(path, LOCK_NAME)
    try:
        fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{full} is a symbolic link: links inside a knowledge cache are never followed",
                                  LOCK_NAME) from None
        raise KnowledgeError(f"cannot open {full}: {exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFileError(f"{full} is {kind_of(mode)}, not a regular file: refused", LOCK_NAME)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KnowledgeError(f"knowledge cache {path} is being written by another writer") from None
    return fd


def _remove_stray_files(path: str, keep: set) -> None:
    """Delete shard files a crash left behind: temp files and shards the manifest does not list (links removed as
    names, never followed)."""
    removed = []
    for entry in os.listdir(path):
        if entry.startswith("shard-") and entry not in keep:
            _remove(path, entry)
            removed.append(entry)
    if removed:
        fsync_dir(path)
        log.warning("knowledge cache %s: removed %d uncommitted file(s) left by an interrupted writer: %s",
                    path, len(removed), ", ".join(sorted(removed)))


def _remove_cache_files(path: str) -> None:
    for entry in os.listdir(path):
        if entry.startswith("shard-") or entry.startswith(MANIFEST_NAME):
            _remove(path, entry)


def _remove(path: str, entry: str) -> None:
    try:
        remove_entry(os.path.join(path, entry))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KnowledgeError(f"knowledge cache {path}: cannot remove {entry}: {exc}") from None
