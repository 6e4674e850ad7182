"""The manifest: a JSON file that describes a knowledge cache and lists its committed shards with their checksums.

It is replaced atomically (temp file, fsync, ``os.replace``, fsync of the directory), so a reader or a resumed
writer always sees either the old or the new list of shards, never a torn one. Everything read from it is checked
before use: a knowledge cache may come from someone else.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from distill_base.atomic_file import atomic_write

from .errors import FormatError, KnowledgeError, UnsafeFileError
from .safe_io import open_regular
from .spec import FieldSpec, check_dtype

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "distill-reader-knowledge"
FORMAT_VERSION = 1
CHECKSUM = "sha256"
DIGEST_FIELD = "#input_digest"  # the segment holding per-sample input digests (not a field name users can give)
DIGEST_NBYTES = 16
# how input digests are computed (``digest.py``); a cache with digests of another scheme cannot check inputs
DIGEST_SCHEME = "mix64x2-v1"
LEGACY_DIGEST_SCHEME = "sha256-128"  # written before the scheme was recorded (no "input_digest_scheme" entry)
SHARD_NAME = re.compile(r"shard-\d{6,}\.bin")   # use fullmatch: "$" also matches before a final newline
MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists ~600 bytes per shard: room for ~400,000 shards
MAX_SAMPLE_ELEMENTS = 1 << 48  # elements of one sample of one field (a declared shape beyond it is refused)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.bin"


@dataclass(frozen=True)
class Segment:
    """Where one stored array lives inside a shard file."""

    field: str
    part: str
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: Tuple[int, ...]

    def to_json(self) -> Dict[str, Any]:
        return {"field": self.field, "part": self.part, "offset": self.offset, "nbytes": self.nbytes,
                "dtype": self.dtype.str, "shape": list(self.shape)}


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard: samples ``[start, stop)``, its byte size, checksum and segments."""

    file: str
    start: int
    stop: int
    nbytes: int
    checksum: str  # sha256 hex: the strong check (verify(), the CLI)
    crc32: int  # the fast check on first read (about 3x faster than sha256 on one core)
    segments: Tuple[Segment, ...]

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "start": self.start, "stop": self.stop, "nbytes": self.nbytes,
                CHECKSUM: self.checksum, "crc32": self.crc32, "segments": [s.to_json() for s in self.segments]}


@dataclass
class Manifest:
    """The parsed, checked manifest."""

    fields: List[FieldSpec]
    input_digests: Optional[bool] = None  # None until the first shard says whether digests are stored
    meta: Dict[str, Any] = field(default_factory=dict)
    shards: List[ShardInfo] = field(default_factory=list)
    complete: bool = False
    digest_scheme: Optional[str] = None  # how the input digests were computed (DIGEST_SCHEME for new caches)

    @property
    def num_samples(self) -> int:
        return self.shards[-1].stop if self.shards else 0

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "checksum": CHECKSUM,
                "fields": [f.to_json() for f in self.fields], "input_digests": self.input_digests,
                "input_digest_scheme": self.digest_scheme if self.input_digests else None,
                "num_samples": self.num_samples, "complete": self.complete, "meta": self.meta,
                "shards": [s.to_json() for s in self.shards]}


def expected_segments(fields: List[FieldSpec], input_digests: bool, n: int) -> List[Tuple[str, str, np.dtype,
                                                                                         Tuple[int, ...]]]:
    """(field, part, dtype, shape) of every segment a shard of ``n`` samples holds, in file order."""
    out = [(f.name, p.name, p.dtype, (n,) + p.shape) for f in fields for p in f.parts]
    if input_digests:
        out.append((DIGEST_FIELD, "digest", np.dtype("u1"), (n, DIGEST_NBYTES)))
    return out


def write_manifest(directory: str, manifest: Manifest) -> None:
    """Atomically replace ``directory/manifest.json`` (temporary created exclusively, links never followed).

    Raises:
        KnowledgeError: the manifest cannot be written (the OSError's reason).
    """
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        atomic_write(path, json.dumps(manifest.to_json(), indent=1).encode("utf-8"))
    except OSError as exc:
        raise KnowledgeError(f"cannot write {path}: {exc}") from None


def _load_json(directory: str, path: str) -> Any:
    """The manifest's JSON: opened without following a link or blocking, bounded in size and nesting."""
    try:
        fd, size = open_regular(path, UnsafeFileError, MANIFEST_NAME)
    except (FileNotFoundError, NotADirectoryError):
        raise FormatError(f"{directory} is not a knowledge cache: {MANIFEST_NAME} not found") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot be read ({exc})") from None
    with os.fdopen(fd, "rb") as f:
        if size > MAX_MANIFEST_BYTES:
            raise FormatError(f"{path}: {size} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})")
        data = f.read(size + 1)   # what fstat says (a file growing meanwhile shows as one byte more), not the maximum
    if len(data) > size:
        raise FormatError(f"{path}: grew while it was read (more than its {size} bytes)")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"{path}: not a manifest (JSON nested too deeply)") from None


def read_manifest(directory: str) -> Manifest:
    """Load and check ``directory/manifest.json``; ``FormatError`` names what is wrong.

    Raises:
        FormatError: missing, unreadable, too large, malformed, of another version, or inconsistent.
        UnsafeFileError: ``manifest.json`` is a symbolic link, FIFO, directory or device (never followed or read).
    """
    path = os.path.join(directory, MANIFEST_NAME)
    raw = _load_json(directory, path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a {FORMAT_NAME} manifest")
    if raw.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {raw.get('version')!r}, this code reads version {FORMAT_VERSION}")
    if raw.get("checksum") != CHECKSUM:
        raise FormatError(f"{path}: checksum {raw.get('checksum')!r} is not supported (only {CHECKSUM})")
    entries = raw.get("fields")
    if not isinstance(entries, list) or not entries:
        raise FormatError(f"{path}: no fields")
    fields = [FieldSpec.from_json(e) for e in entries]
    for f in fields:
        if any(p.shape and math.prod(p.shape) > MAX_SAMPLE_ELEMENTS for p in f.parts) or (
                f.shape and math.prod(d for d in f.shape if d) > MAX_SAMPLE_ELEMENTS):
            raise FormatError(f"{path}: field {f.name!r}: shape {list(f.shape)} is too large for one sample")
    names = [f.name for f in fields]
    if len(set(names)) != len(names) or DIGEST_FIELD in names:
        raise FormatError(f"{path}: field names {names} repeat or use a reserved name")
    digests = raw.get("input_digests")
    meta = raw.get("meta", {})
    if digests not in (None, True, False) or not isinstance(meta, dict) or not isinstance(raw.get("complete"), bool):
        raise FormatError(f"{path}: bad input_digests, meta or complete entry")
    scheme = raw.get("input_digest_scheme", LEGACY_DIGEST_SCHEME if digests else None)
    if scheme is not None and not (isinstance(scheme, str) and re.fullmatch(r"[0-9A-Za-z._-]{1,64}", scheme)):
        raise FormatError(f"{path}: bad input_digest_scheme {scheme!r}")
    manifest = Manifest(fields, digests, meta, [], raw["complete"], scheme if digests else None)
    shard_entries = raw.get("shards")
    if not isinstance(shard_entries, list):
        raise FormatError(f"{path}: no shard list")
    for entry in shard_entries:
        manifest.shards.append(_check_shard(path, entry, manifest))
    if raw.get("num_samples") != manifest.num_samples:
        raise FormatError(f"{path}: num_samples {raw.get('num_samples')!r} disagrees with the shards "
                          f"({manifest.num_samples})")
    if manifest.shards and digests is None:
        raise FormatError(f"{path}: shards present but input_digests undecided")
    return manifest


def _check_shard(path: str, entry: Any, manifest: Manifest) -> ShardInfo:
    try:
        name, start, stop, nbytes, checksum, crc = (entry["file"], entry["start"], entry["stop"], entry["nbytes"],
                                                    entry[CHECKSUM], entry["crc32"])
        segments_raw = entry["segments"]
    except (KeyError, TypeError):
        raise FormatError(f"{path}: malformed shard entry {entry!r}") from None
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise FormatError(f"{path}: shard file name {name!r} is not allowed")
    if not all(isinstance(v, int) for v in (start, stop, nbytes, crc)) or not 0 <= crc < 1 << 32 or not (
            isinstance(checksum, str) and re.fullmatch(r"[0-9a-f]{64}", checksum)):
        raise FormatError(f"{path}: shard {name}: bad range, size or checksum")
    if start != manifest.num_samples or stop <= start:
        raise FormatError(f"{path}: shard {name}: samples [{start}, {stop}) do not follow the previous shard "
                          f"(which ends at {manifest.num_samples})")
    expected = expected_segments(manifest.fields, bool(manifest.input_digests), stop - start)
    if not isinstance(segments_raw, list) or len(segments_raw) != len(expected):
        raise FormatError(f"{path}: shard {name}: expected {len(expected)} segments")
    segments = []
    for seg, (fname, part, dtype, shape) in zip(segments_raw, expected):
        try:
            offset, size = seg["offset"], seg["nbytes"]
            ok = (seg["field"] == fname and seg["part"] == part and check_dtype(seg["dtype"], name) == dtype
                  and tuple(seg["shape"]) == shape and isinstance(offset, int) and isinstance(size, int))
        except (KeyError, TypeError, FormatError):
            ok = False
        if not ok or size != dtype.itemsize * math.prod(shape) or offset < 0 or offset + size > nbytes \
                or offset % dtype.itemsize:
            raise FormatError(f"{path}: shard {name}: segment {seg!r} does not match field {fname!r} part {part!r} "
                              f"({dtype.str} {shape})")
        segments.append(Segment(fname, part, offset, size, dtype, shape))
    return ShardInfo(name, start, stop, nbytes, checksum, crc, tuple(segments))
