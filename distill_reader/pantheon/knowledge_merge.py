"""Merging the knowledge of several teachers: descriptions, per-batch arrays, and re-batching.

A knowledge description maps each key to ``{"shape": [-1, ...], "dtype": "float32", "lod_level": 0}``.
Keys shared by several teachers are merged by their strategy (``"sum"`` or ``"mean"``); any other shared key
is an error naming the key and the teachers.

Example::

    desc = merge_descs([desc0, desc1], {"result": "mean"})
    merged = merge_batches([batch0, batch1], desc, {"result": "mean"})
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

import numpy as np

from ..dtypes import parse_dtype
from .errors import ProtocolError
from .transport import PantheonError

STRATEGIES = ("sum", "mean")


class KnowledgeMismatch(PantheonError):
    """Teachers' knowledge cannot be merged (conflicting keys, shapes, dtypes or sample counts)."""


def check_strategy(merge_strategy: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Validate ``merge_strategy`` (key -> "sum" | "mean") and return it as a plain dict.

    Raises:
        ValueError: ``merge_strategy`` is not a mapping, or a strategy is not ``sum``/``mean``.
    """
    if merge_strategy is None:
        return {}
    if not isinstance(merge_strategy, Mapping):
        raise ValueError(f"merge_strategy must be a dict of key -> 'sum' | 'mean', got {type(merge_strategy).__name__}")
    for key, strategy in merge_strategy.items():
        if strategy not in STRATEGIES:
            raise ValueError(f"merge strategy for {key!r} must be 'sum' or 'mean', got {strategy!r}")
    return dict(merge_strategy)


MAX_DESC_KEYS = 4096
MAX_DIMS = 32


def check_desc(desc: Any, name: str) -> OrderedDict[str, dict]:
    """A knowledge description from a peer or a file, checked: key -> ``{"shape": [-1, d1, ...], "dtype": name,
    "lod_level": int}`` with string keys, integer dimensions (-1 for unknown ones), an allowed dtype name
    (``distill_reader.dtypes``) and at most ``MAX_DESC_KEYS`` keys.

    Raises:
        ProtocolError: naming ``name`` and the key that is malformed.
    """
    if not isinstance(desc, Mapping) or len(desc) > MAX_DESC_KEYS:
        raise ProtocolError(f"{name} sent a knowledge description that is not a dict of at most {MAX_DESC_KEYS} keys: "
                            f"{type(desc).__name__}")
    checked: OrderedDict[str, dict] = OrderedDict()
    for key, item in desc.items():
        shape = item.get("shape") if isinstance(item, Mapping) else None
        lod_level = item.get("lod_level", 0) if isinstance(item, Mapping) else None
        if not isinstance(key, str) or not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS or not all(
                isinstance(d, int) and not isinstance(d, bool) and -1 <= d < 1 << 40 for d in shape) or \
                isinstance(lod_level, bool) or not isinstance(lod_level, int):
            raise ProtocolError(f"{name} described knowledge key {key!r} as {item!r}: expected "
                                f"{{'shape': [-1, ...], 'dtype': ..., 'lod_level': 0}}")
        dtype = parse_dtype(item.get("dtype"), "biufc", f"{name}: knowledge key {key!r}", ProtocolError)
        checked[key] = {**item, "shape": list(shape), "dtype": str(dtype), "lod_level": lod_level}
    return checked


def describe(knowledge: Mapping[str, np.ndarray]) -> OrderedDict[str, dict]:
    """The description of one batch of knowledge (batch dimension as -1).

    Raises:
        ValueError: a value is a scalar (no batch dimension).
    """
    desc = OrderedDict()
    for name, value in knowledge.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"knowledge {name!r} is a scalar: its first dimension must be the batch")
        desc[name] = {"shape": [-1] + list(value.shape[1:]), "dtype": str(value.dtype), "lod_level": 0}
    return desc


def merge_descs(descs: List[Mapping[str, dict]], merge_strategy: Mapping[str, str],
                names: Optional[List[str]] = None) -> OrderedDict[str, dict]:
    """One description for all teachers, in teacher order; shared keys need a strategy and equal shapes/dtypes.

    Raises:
        KnowledgeMismatch: a shared key without a merge strategy, or with other shapes or dtypes in another teacher.
    """
    names = names or [f"teacher {i}" for i in range(len(descs))]
    descs = [check_desc(desc, names[i]) for i, desc in enumerate(descs)]
    merged: OrderedDict[str, dict] = OrderedDict()
    owners: Dict[str, List[int]] = {}
    for index, desc in enumerate(descs):
        for key, item in desc.items():
            owners.setdefault(key, []).append(index)
            if key not in merged:
                merged[key] = dict(item)
                continue
            first = owners[key][0]
            if key not in merge_strategy:
                who = ", ".join(names[i] for i in owners[key])
                raise KnowledgeMismatch(f"knowledge key {key!r} is produced by {who} but has no merge strategy: "
                                        f"pass merge_strategy={{{key!r}: 'sum' | 'mean'}} to Student or rename it")
            if _static_dims(merged[key]["shape"]) != _static_dims(item["shape"]):
                raise KnowledgeMismatch(f"knowledge key {key!r} has shape {merged[key]['shape']} in {names[first]} "
                                        f"but {item['shape']} in {names[index]}: cannot {merge_strategy[key]} them")
            if merged[key]["dtype"] != item["dtype"]:
                raise KnowledgeMismatch(f"knowledge key {key!r} has dtype {merged[key]['dtype']} in {names[first]} "
                                        f"but {item['dtype']} in {names[index]}: cannot {merge_strategy[key]} them")
    return merged


def _static_dims(shape: Iterable[int]) -> list:
    return [int(d) for d in list(shape)[1:]]


def conform(batch: Mapping[str, np.ndarray], desc: Mapping[str, dict], name: str) -> Dict[str, np.ndarray]:
    """Check one teacher batch against its description and cast each array back to the described dtype.

    This is where float16 transport (``use_fp16``) is undone.

    Raises:
        ProtocolError: the batch is not a dict of numeric arrays, or the description is malformed.
        KnowledgeMismatch: keys, shapes or row counts differ from the description.
    """
    desc = check_desc(desc, name)
    if not isinstance(batch, Mapping) or not all(
            isinstance(v, np.ndarray) and v.dtype.kind in "biufc" for v in batch.values()):
        raise ProtocolError(f"{name} sent a knowledge batch that is not a dict of numeric arrays: "
                            f"{type(batch).__name__}")
    if set(batch) != set(desc):
        raise KnowledgeMismatch(f"{name} sent keys {sorted(batch)} but described {sorted(desc)}")
    out: Dict[str, np.ndarray] = {}
    rows = None
    for key, item in desc.items():
        value = np.asarray(batch[key])
        expected = _static_dims(item["shape"])
        if value.ndim != len(expected) + 1 or any(e >= 0 and e != d for e, d in zip(expected, value.shape[1:])):
            raise KnowledgeMismatch(f"{name} sent {key!r} with shape {list(value.shape)}, "
                                    f"described as {item['shape']}")
        if rows is None:
            rows = value.shape[0]
        elif value.shape[0] != rows:
            raise KnowledgeMismatch(f"{name} sent a batch whose keys disagree on the batch size "
                                    f"({key!r} has {value.shape[0]} rows, others {rows})")
        out[key] = value if str(value.dtype) == item["dtype"] else value.astype(item["dtype"])
    return out


def merge_batches(batches: List[Mapping[str, np.ndarray]], desc: Mapping[str, dict],
                  merge_strategy: Mapping[str, str]) -> OrderedDict[str, np.ndarray]:
    """Merge one aligned batch per teacher: single keys pass through, shared keys are summed or averaged."""
    gathered: Dict[str, list] = {key: [] for key in desc}
    for batch in batches:
        for key, value in batch.items():
            gathered[key].append(value)
    merged: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, item in desc.items():
        tensors = gathered[key]
        if not tensors:
            continue
        if len(tensors) == 1:
            value = tensors[0]
        else:
            value = np.add.reduce(tensors) if len(tensors) > 2 else tensors[0] + tensors[1]
            if merge_strategy[key] == "mean":
                value = value / len(tensors)
        merged[key] = value if str(value.dtype) == item["dtype"] else value.astype(item["dtype"])
    return merged


def rebatch(batches: Iterable[Mapping[str, np.ndarray]], batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
    """Cut a stream of batches of any sizes into batches of ``batch_size`` rows (the last one may be smaller).

    Raises:
        ValueError: ``batch_size`` <= 0.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    pending: List[Dict[str, np.ndarray]] = []
    rows = 0
    for batch in batches:
        n = len(next(iter(batch.values()))) if batch else 0
        start = 0
        while n - start > 0:
            take = min(batch_size - rows, n - start)
            if start == 0 and take == n:
                pending.append(dict(batch))
            else:
                pending.append({k: v[start:start + take] for k, v in batch.items()})
            rows += take
            start += take
            if rows == batch_size:
                yield _concat(pending)
                pending, rows = [], 0
    if rows:
        yield _concat(pending)


def _concat(parts: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def merged_stream(streams: List[Iterable[Mapping[str, np.ndarray]]], desc: Mapping[str, dict],
                  merge_strategy: Mapping[str, str], batch_size: int,
                  names: Optional[List[str]] = None) -> Iterator[OrderedDict[str, np.ndarray]]:
    """Re-batch every teacher's stream to ``batch_size`` and merge them batch by batch.

    Teachers must read the same data in the same order: a teacher that ends early or late is an error.

    Raises:
        KnowledgeMismatch: the teachers sent different numbers of samples.
    """
    names = names or [f"teacher {i}" for i in range(len(streams))]
    iterators = [rebatch(stream, batch_size) for stream in streams]
    samples = [0] * len(iterators)
    while True:
        batches, ended = [], []
        for index, iterator in enumerate(iterators):
            batch = next(iterator, None)
            if batch is None:
                ended.append(index)
            else:
                batches.append(batch)
                samples[index] += len(next(iter(batch.values())))
        if ended and len(ended) < len(iterators):
            early = ", ".join(f"{names[i]} ended after {samples[i]} samples" for i in ended)
            running = ", ".join(f"{names[i]} had more than {samples[i]}" for i in range(len(iterators))
                                if i not in ended)
            raise KnowledgeMismatch(f"teachers sent different numbers of samples ({early}; {running}): every "
                                    "teacher must read the same data in the same order")
        if ended:
            return
        sizes = {len(next(iter(b.values()))) for b in batches}
        if len(sizes) > 1:
            totals = ", ".join(f"{names[i]}: {samples[i]}" for i in range(len(iterators)))
            raise KnowledgeMismatch(f"teachers sent different numbers of samples ({totals}); every teacher must "
                                    "read the same data in the same order")
        yield merge_batches(batches, desc, merge_strategy)
