"""The knowledge description: named fields, their per-sample shape and dtype, and how each one is stored.

A field is any named array that every sample has (a teacher's logits, a feature map, a label ...).
Storage options (per field, or one for all fields):

- ``"float32"`` (default): floating fields are stored as float32 (float16 fields stay float16, float64 fields are
  cast to float32 and cast back on read); a float32 field reads back bit for bit.
- ``"float16"``: floating fields are stored as float16 (half the size) and cast back to the described dtype on read;
  values beyond the float16 range are refused at write time instead of silently becoming inf.
- ``"raw"``: stored exactly in the described dtype (use it for float64 you need bit for bit).
- ``"topk:K"`` or ``"topk:K:FILL"``: for a floating field of shape ``(..., C)``, keep the K largest values along the
  last axis and their indices (sorted by value, largest first; ties by lower index). On read, either the sparse pair
  ``TopK(values, indices)`` or a dense array where every other entry is FILL (default ``0.0``; use ``-inf`` for
  logits so that a softmax of the dense vector is the renormalised top-k distribution).

Integer and bool fields are always stored exactly: one storage for all fields applies only to the floating ones;
``topk`` named for an integer field in a per-field dict is an error.

Example::

    fields = resolve_fields({"logits": ((1000,), "float32"), "label": ((), "int64")}, "topk:10:-inf")
    fields[0].storage, fields[0].k, fields[1].storage    # ('topk', 10, 'raw')
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..dtypes import parse_dtype
from .errors import FormatError, KnowledgeError

ALLOWED_KINDS = "biuf"  # bool, signed, unsigned, floating: never object, string, void or structured dtypes.
STORAGES = ("float32", "float16", "raw", "topk")
StorageArg = Union[str, Mapping[str, str]]
FieldsArg = Mapping[str, Tuple[Sequence[int], Any]]


class TopK(NamedTuple):
    """Sparse top-k knowledge: ``values`` (described dtype) and ``indices`` (int64), both ``(n, ..., k)``."""

    values: np.ndarray
    indices: np.ndarray


class Part(NamedTuple):
    """One stored array of a field: its part name, little-endian stored dtype and per-sample shape."""

    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]


def check_dtype(value: Any, what: str) -> np.dtype:
    """Parse ``value`` as a plain numeric dtype (bool, int, uint, float); anything else is a ``KnowledgeError``.

    Raises:
        FormatError: ``value`` is not a dtype, or not a plain bool/integer/floating one.
    """
    if isinstance(value, str):   # a name from a file or a user: never parsed by numpy as a literal
        return parse_dtype(value, ALLOWED_KINDS, what, FormatError)
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{what}: {value!r} is not a dtype ({exc})") from None
    if dtype.kind not in ALLOWED_KINDS or dtype.names is not None or dtype.subdtype is not None:
        raise FormatError(f"{what}: dtype {dtype} is not allowed (only bool, integer and floating dtypes)")
    return dtype


def little_endian(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def _check_shape(shape: Any, what: str) -> Tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FormatError(f"{what}: shape {shape!r} must be a sequence of non-negative integers")
    return tuple(int(d) for d in shape)


def cast_checked(array: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Cast to ``dtype`` (same kind or safe), refusing finite values that would become inf in a narrower float.

    Raises:
        KnowledgeError: the array's dtype cannot be stored as ``dtype``, or a finite value would overflow it.
    """
    if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise KnowledgeError(f"{what}: cannot store dtype {array.dtype} as {dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(array, dtype=dtype)
    if dtype.kind == "f" and array.dtype.kind == "f" and dtype.itemsize < array.dtype.itemsize:
        lost = np.isfinite(array) & ~np.isfinite(out)
        if lost.any():
            worst = float(np.max(np.abs(array[lost])))
            limit = float(np.finfo(dtype).max)
            raise KnowledgeError(f"{what}: value {worst:g} does not fit {dtype.name} (max {limit:g})")
    return out


@dataclass(frozen=True)
class FieldSpec:
    """One field of the knowledge description: what the reader gives back and how it is stored."""

    name: str
    shape: Tuple[int, ...]
    dtype: np.dtype
    storage: str = "float32"
    k: Optional[int] = None
    fill: Optional[float] = None

    @property
    def parts(self) -> List[Part]:
        """The arrays stored per sample for this field (one, or values + indices for top-k)."""
        if self.storage == "topk":
            classes = self.shape[-1]
            index_dtype = np.dtype("<u2") if classes <= 1 << 16 else np.dtype("<u4")
            sparse = self.shape[:-1] + (self.k,)
            return [Part("values", little_endian(self.dtype), sparse), Part("indices", index_dtype, sparse)]
        return [Part("data", self.stored_dtype, self.shape)]

    @property
    def stored_dtype(self) -> np.dtype:
        if self.storage == "float16":
            return np.dtype("<f2")
        if self.storage == "float32":
            return np.dtype("<f2") if self.dtype == np.float16 else np.dtype("<f4")
        return little_endian(self.dtype)

    @property
    def sample_nbytes(self) -> int:
        """Stored bytes per sample."""
        return sum(p.dtype.itemsize * math.prod(p.shape) for p in self.parts)

    def storage_label(self) -> str:
        """The storage as a user would write it, e.g. ``topk:10:-inf``."""
        if self.storage == "topk":
            return f"topk:{self.k}:{_fill_text(self.fill)}"
        return self.storage

    def encode(self, array: np.ndarray) -> Dict[str, np.ndarray]:
        """Turn ``(n, *shape)`` values into the stored part arrays; refuses values the storage cannot hold."""
        if self.storage == "topk":
            return dict(zip(("values", "indices"), _topk(array, self.k, self.parts[1].dtype)))
        where = f"field {self.name!r} with storage {self.storage!r} (use 'float32' or 'raw' for a wider range)"
        return {"data": cast_checked(array, self.stored_dtype, where)}

    def as_stored(self, array: np.ndarray) -> np.ndarray:
        """What a dense read returns for ``array`` written with this storage (fp16 rounding, top-k fill)."""
        array = cast_checked(np.asarray(array), self.dtype, f"field {self.name!r}")
        parts = self.encode(array)
        if self.storage == "topk":
            return dense_topk(parts["values"], parts["indices"], self.shape, self.dtype, self.fill)
        return parts["data"].astype(self.dtype)

    def to_json(self) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name,
                                 "storage": self.storage}
        if self.storage == "topk":
            entry.update(k=self.k, fill=_fill_text(self.fill))
        return entry

    @classmethod
    def from_json(cls, entry: Any) -> FieldSpec:
        """A field from its manifest entry (untrusted: every part is checked).

        Raises:
            FormatError: the entry has no name, an unknown storage, a bad top-k ``k``/fill, or a bad shape or dtype.
        """
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise FormatError(f"field entry {entry!r} has no name")
        name = entry["name"]
        shape = _check_shape(entry.get("shape"), f"field {name!r}")
        dtype = check_dtype(entry.get("dtype"), f"field {name!r}")
        storage = entry.get("storage")
        if storage == "topk":
            try:
                k, fill = entry["k"], float(entry["fill"])
                if isinstance(k, bool) or not isinstance(k, int) or math.isnan(fill):
                    raise ValueError(k)
            except (KeyError, TypeError, ValueError, OverflowError):
                raise FormatError(f"field {name!r}: top-k storage needs an integer k and a fill value") from None
            return _make(name, shape, dtype, "topk", k, fill)
        if storage not in STORAGES:
            raise FormatError(f"field {name!r}: unknown storage {storage!r}")
        return _make(name, shape, dtype, storage, None, None)


def _fill_text(fill: Optional[float]) -> str:
    return repr(float(fill)) if fill is not None else "0.0"


def _make(name: str, shape: Tuple[int, ...], dtype: np.dtype, storage: str, k: Optional[int],
          fill: Optional[float]) -> FieldSpec:
    if dtype.kind != "f" and storage in ("float32", "float16"):
        storage = "raw"  # integer and bool knowledge is always exact
    if storage == "topk":
        if dtype.kind != "f":
            raise KnowledgeError(f"field {name!r}: top-k storage needs a floating dtype, not {dtype}")
        if not shape:
            raise KnowledgeError(f"field {name!r}: top-k storage needs a per-sample shape (..., classes), not ()")
        if k is None or not 1 <= k <= shape[-1]:
            raise KnowledgeError(f"field {name!r}: top-k k={k} must be in 1..{shape[-1]} (the last dimension)")
    return FieldSpec(name, shape, dtype, storage, k, fill)


def parse_storage(text: str, where: str) -> Tuple[str, Optional[int], Optional[float]]:
    """``"float16"`` -> ("float16", None, None); ``"topk:10:-inf"`` -> ("topk", 10, -inf).

    Raises:
        KnowledgeError: ``text`` is not a string or not a known storage.
    """
    if not isinstance(text, str):
        raise KnowledgeError(f"{where}: storage must be a string, not {text!r}")
    if text in ("float32", "float16", "raw"):
        return text, None, None
    pieces = text.split(":")
    if pieces[0] == "topk" and len(pieces) in (2, 3):
        try:
            k = int(pieces[1])
            fill = float(pieces[2]) if len(pieces) == 3 else 0.0
        except ValueError:
            k = fill = None
        if k is not None and not math.isnan(fill):
            return "topk", k, fill
    raise KnowledgeError(f"{where}: unknown storage {text!r} (use float32, float16, raw, topk:K or topk:K:FILL)")


def resolve_fields(fields: FieldsArg, storage: StorageArg = "float32") -> List[FieldSpec]:
    """Build the field specs from ``{name: (per_sample_shape, dtype)}`` and a storage (one, or a dict per field).

    Raises:
        KnowledgeError: no field, a storage for an unknown field, a bad field name, or a value that is not
            ``(per_sample_shape, dtype)``.
    """
    if not fields:
        raise KnowledgeError("a knowledge description needs at least one field")
    if isinstance(storage, Mapping):
        unknown = sorted(set(storage) - set(fields))
        if unknown:
            raise KnowledgeError(f"storage given for unknown field(s) {unknown}; fields are {list(fields)}")
    specs = []
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise KnowledgeError(f"field names must be non-empty strings, not {name!r}")
        try:
            shape, dtype = value
        except (TypeError, ValueError):
            raise KnowledgeError(f"field {name!r}: give (per_sample_shape, dtype), not {value!r}") from None
        per_field = storage.get(name, "float32") if isinstance(storage, Mapping) else storage
        kind, k, fill = parse_storage(per_field, f"field {name!r}")
        dims = _check_shape(shape, f"field {name!r}")
        dt = check_dtype(dtype, f"field {name!r}")
        if kind == "topk" and dt.kind != "f" and not isinstance(storage, Mapping):
            kind = "raw"  # one top-k storage for all fields applies to the floating ones
        specs.append(_make(name, dims, dt, kind, k, fill))
    return specs


def dense_topk(values: np.ndarray, indices: np.ndarray, shape: Tuple[int, ...], dtype: np.dtype,
               fill: Optional[float]) -> np.ndarray:
    """Rebuild ``(n, *shape)`` from top-k ``values``/``indices``: every entry not among the top k is ``fill``."""
    dense = np.full((values.shape[0],) + tuple(shape), 0.0 if fill is None else fill, dtype)
    np.put_along_axis(dense, indices.astype(np.intp), values, axis=-1)
    return dense


def _topk(array: np.ndarray, k: int, index_dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    """The k largest entries along the last axis, largest first, ties by lower index."""
    classes = array.shape[-1]
    if k < classes:
        picked = np.argpartition(-array, k - 1, axis=-1)[..., :k]
        picked.sort(axis=-1)
    else:
        picked = np.broadcast_to(np.arange(classes), array.shape).copy()
    values = np.take_along_axis(array, picked, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    values = np.take_along_axis(values, order, axis=-1)
    indices = np.take_along_axis(picked, order, axis=-1)
    return (np.ascontiguousarray(values, dtype=little_endian(array.dtype)),
            np.ascontiguousarray(indices, dtype=index_dtype))


def describe(fields: Sequence[FieldSpec]) -> str:
    """One line per field: ``name  shape  dtype  storage``."""
    lines = []
    for f in fields:
        lines.append(f"  {f.name}: shape {f.shape}, dtype {f.dtype.name}, storage {f.storage_label()}, "
                     f"{f.sample_nbytes} B/sample stored")
    return "\n".join(lines)
