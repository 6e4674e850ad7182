"""Ragged slots in DistillReader: variable-length samples in, per-sample predictions out.

A teacher feed is *variable-length* when the serving config marks it ``is_lod_tensor`` or its per-sample shape
has a ``-1`` (padded sequences). For such a feed, the samples of one task travel in Paddle Serving's client
form: the rows concatenated along their first dimension as ``feeds[name]`` plus ``feeds[name + ".lod"]``
(int64 offsets, ``[0, len_0, len_0 + len_1, ...]``). The worker's ``TeacherClient`` sends LoD feeds with those
offsets and pads padded feeds per request (``distill_reader.feeds``), and gives LoD / per-token fetches back as
one array per sample, so the i-th sample of a task gets its own rows.

- sample and sample-list generators: each sample's slot value is an array (or list) of any length;
- batch generators: the slot is a list (or object array) of per-sample arrays; a regular array is taken as
  equal-length samples;
- a ragged value for a fixed-shape feed is an error naming the slot and the sample (its index in the epoch);
- pass-through slots are never looked at, ragged or not;
- variable-length predictions are lists of per-sample arrays (batch kind: a list with one array per sample).

Offline caches: ``task_digests`` fingerprints ragged feeds per sample; predictions of variable length cannot be
stored in knowledge files (``check_storable`` refuses them naming the predict).

Example::

    feeds = slot_feeds(1, spec, [np.array([3, 1, 4]), np.array([1, 5])], first_sample=0)
    # {"words": array([3, 1, 4, 1, 5]), "words.lod": array([0, 3, 5])}
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from distill_base.serving_config import ServingConfig, VarSpec

from .feeds import LOD_SUFFIX, is_ragged, is_variable


class RaggedSlotError(ValueError):
    """A slot value that does not fit its teacher feed; the message names the slot and the sample."""


def slot_len(value: Any) -> int:
    """Number of samples in a batch slot (an array, or a list of per-sample arrays)."""
    if is_ragged(value) or isinstance(value, (list, tuple)):
        return len(value)
    return len(np.asarray(value))


def batch_rows(value: Any, start: int, end: int) -> Any:
    """Samples ``start:end`` of a batch slot: a list for ragged slots, else an array slice."""
    if is_ragged(value):
        return list(value[start:end])
    return np.asarray(value)[start:end]


def slot_feeds(slot: int, spec: VarSpec, values: Sequence[Any], first_sample: int) -> dict[str, np.ndarray]:
    """The feed arrays of one slot for ``values`` (one per sample, the first being sample ``first_sample``).

    Fixed-shape feeds: the samples stacked (``[N, *sample shape]``). Variable-length feeds: rows plus
    ``<name>.lod`` offsets. Raises RaggedSlotError naming the slot and sample for a ragged fixed-shape feed.

    Raises:
        RaggedSlotError: samples of a fixed-shape feed with different shapes, or a sample whose shape does not fit the
            feed (names the slot and the sample).
    """
    name = spec.alias_name
    if isinstance(values, np.ndarray) and values.dtype != object and not is_variable(spec):
        return {name: values}   # a batch slot of equal samples: no copy
    arrays = [np.asarray(v) for v in values]
    if not is_variable(spec):
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise _ragged_fixed_slot(slot, spec, arrays, first_sample)
        return {name: np.stack(arrays) if arrays else np.zeros((0, *spec.shape), spec.dtype)}
    var_dims = [k for k, d in enumerate(spec.shape) if d < 0]
    for k, array in enumerate(arrays):
        if array.ndim == 0 or (not spec.is_lod_tensor and array.ndim != len(spec.shape)):
            raise RaggedSlotError(f"slot {slot} ({name!r}) of sample {first_sample + k}: shape {list(array.shape)}, "
                                  f"the teacher's feed {name!r} takes {list(spec.shape)} per sample (-1: any length)")
        if not spec.is_lod_tensor and var_dims != [0] and array.shape[1:] != arrays[0].shape[1:]:
            raise RaggedSlotError(f"slot {slot} ({name!r}) of sample {first_sample + k}: shape {list(array.shape)}; "
                                  f"only the first dimension may vary between samples (sample {first_sample} has "
                                  f"{list(arrays[0].shape)})")
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
    rows = np.concatenate(arrays, axis=0) if arrays else np.zeros((0,), spec.dtype)
    return {name: rows.astype(spec.dtype, copy=False), name + LOD_SUFFIX: offsets}


def lengths_problem(offsets: np.ndarray, lengths: np.ndarray) -> tuple[int, Any, int] | None:
    """(sample index, given value, true length) of the first sample whose lengths-feed value differs from the
    length its offsets give, or None."""
    true = np.diff(np.asarray(offsets))
    given = np.asarray(lengths).reshape(len(true), -1)[:, 0] if len(true) else np.zeros(0)
    wrong = np.flatnonzero(given != true)
    if not len(wrong):
        return None
    k = int(wrong[0])
    return k, given[k].item(), int(true[k])


def _ragged_fixed_slot(slot: int, spec: VarSpec, arrays: Sequence[np.ndarray], first_sample: int) -> RaggedSlotError:
    """The error for samples of unequal shapes in a fixed-shape feed: names the first sample of the wrong size
    (else the first whose shape differs) and one sample with another shape."""
    want = int(np.prod(spec.shape))
    odd = next((k for k, a in enumerate(arrays) if a.size != want), None)
    if odd is None:
        odd = next(k for k, a in enumerate(arrays) if a.shape != arrays[0].shape)
    other = next(k for k, a in enumerate(arrays) if a.shape != arrays[odd].shape)
    return RaggedSlotError(
        f"slot {slot} ({spec.alias_name!r}) of sample {first_sample + odd} has shape {list(arrays[odd].shape)}, "
        f"sample {first_sample + other} has {list(arrays[other].shape)}: the teacher's feed {spec.alias_name!r} has "
        f"the fixed per-sample shape {list(spec.shape)} (ragged values need a LoD or -1 feed)")


def concat_predictions(parts: Sequence[Any]) -> Any:
    """Predictions of a batch from its tasks' parts: lists (per-sample arrays) are joined, arrays concatenated."""
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, list) for p in parts):
        return [row for part in parts for row in part]
    return np.concatenate(parts)


def empty_prediction(spec: VarSpec) -> Any:
    """The prediction of an empty batch: ``[]`` for a variable-length fetch, else a ``[0, *shape]`` array."""
    return [] if is_variable(spec) else np.zeros((0, *spec.shape), dtype=spec.dtype)


def task_digests(feeds: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    """A ``(size, 16)`` per-sample digest of a task's feeds, ragged ones included (see knowledge.digest)."""
    from .knowledge import sample_digests

    ragged = {n[:-len(LOD_SUFFIX)] for n in feeds if n.endswith(LOD_SUFFIX)}
    if not ragged:
        return sample_digests(feeds)
    parts = {n: v for n, v in feeds.items() if n not in ragged and not n.endswith(LOD_SUFFIX)}
    for name in sorted(ragged):
        rows, offsets = np.asarray(feeds[name]), np.asarray(feeds[name + LOD_SUFFIX])
        per_sample = [sample_digests({name: rows[a:b][None]})[0] for a, b in zip(offsets[:-1], offsets[1:])]
        parts[name] = np.stack(per_sample) if per_sample else np.zeros((0, 16), np.uint8)
    return sample_digests(parts) if size else np.zeros((0, 16), np.uint8)


def check_storable(config: ServingConfig, predicts: Sequence[str], path: str) -> None:
    """Refuse (ValueError naming the predict) predicts of variable length in a knowledge cache at ``path``.

    Raises:
        ValueError: a predict has variable length (a knowledge cache stores fixed shapes).
    """
    for name in predicts:
        spec = config.fetch(name)
        if is_variable(spec):
            raise ValueError(
                f"offline cache {path}: predict {name!r} has variable length (shape {list(spec.shape)}"
                f"{', LoD' if spec.is_lod_tensor else ''}); knowledge files store fixed-shape rows only. Cache only "
                f"fixed-shape predicts (e.g. the pooled ones) or use the teachers online for this one")
