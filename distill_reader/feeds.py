"""The student's feeds, ready to send: fixed-shape feeds (``prepare_feed``: cast + reshape to the config's
shape) and variable-length feeds and fetches: LoD tensors and padded sequences.

Two kinds of variable-length feed, told apart by the serving config:

- **LoD** (``is_lod_tensor: true``, Paddle Serving's way): the samples' rows are concatenated and sent with
  one level of offsets in ``Tensor.lod`` (``[0, 3, 7]``: sample 0 is rows 0-2, sample 1 rows 3-6).
  Per-sample 1-D id arrays become rows of shape ``[rows, 1]``, Paddle Serving's layout for id lists (and of
  ``data(name, [-1, 1], lod_level=1)``); samples of 2 or more dimensions are concatenated as they are.
- **padded** (not a LoD tensor, a ``-1`` in the per-sample shape; Paddle 3 / PIR has no LoD): the samples of a
  request are padded with ``pad_value`` (one number, or a dict per feed: ``distill_reader.padding``) to the
  longest one along every ``-1`` dimension. A *lengths feed* (``lengths_feeds={"words": "length"}``) is filled
  with each sample's length (its first ``-1`` dimension) unless the caller gives it; a given one is checked.

Both kinds accept, for feed ``words``:

- a list of per-sample arrays (ragged): ``{"words": [np.array([4, 8, 1]), np.array([7, 7])]}``;
- Paddle Serving's client form: the concatenated rows plus offsets, ``{"words": rows, "words.lod": [0, 3, 5]}``.

A padded feed given as one array is taken as already padded (no lengths known, outputs not cut).

Fetches, ``lod_form="split"`` (default): a LoD fetch comes back as a list with one array per sample (its rows);
a per-token output of a padded request (a fetch whose per-sample shape starts with ``-1`` and whose second
dimension is the padded length) is cut back to each sample's length, also a list. ``lod_form="serving"``:
Paddle Serving's form, the rows as one array plus ``"<name>.lod"`` (int32 offsets); padded outputs unchanged.

Example::

    variable = prepare_variable_feeds(config, {"words": [ids_a, ids_b]})
    variable.feeds["words"].shape, variable.lods["words"]      # (len_a + len_b, 1), [0, len_a, len_a + len_b]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from distill_base.serving_config import ConfigError, ServingConfig, VarSpec

from .padding import PadValue, pad_value_for

LOD_SUFFIX = ".lod"
LOD_FORMS = ("split", "serving")


class FeedError(ValueError):
    """An input that cannot be sent as the named feed (wrong element count, dtype or shape)."""


def prepare_feed(spec: VarSpec, value: Any, batch_size: int) -> np.ndarray:
    """Cast ``value`` to the feed's dtype and reshape it to ``(batch_size, *spec.shape)``.

    Variable-length (LoD, padded) feeds are only cast (``prepare_variable_feeds`` shapes them first).

    Raises:
        FeedError: naming the feed, when ``value`` cannot be cast to the feed's dtype or its element count does
            not match ``batch_size`` samples of the config's per-sample shape.
    """
    array = np.asarray(value)
    try:
        array = array.astype(spec.dtype, copy=False)
    except (TypeError, ValueError) as exc:
        raise FeedError(f"feed {spec.alias_name!r}: cannot convert {array.dtype} to {spec.dtype}: {exc}") from exc
    if spec.is_lod_tensor or any(d < 0 for d in spec.shape):
        return array
    target = (batch_size, *spec.shape)
    if array.shape == target:
        return array
    if array.size != int(np.prod(target)):
        per_sample = int(np.prod(spec.shape))
        hint = (f"; this looks like one sample without its batch dimension: give it shape {[1, *spec.shape]}"
                if array.size == per_sample else "")
        raise FeedError(f"feed {spec.alias_name!r}: got shape {list(array.shape)} ({array.size} elements) for a "
                        f"batch of {batch_size} (the first dimension of the feeds, or batch_size=); the model "
                        f"expects {list(spec.shape)} per sample ({per_sample} elements){hint}")
    return array.reshape(target)


class VariableFeedError(ValueError):
    """A variable-length feed that cannot be sent; the message names the feed and the sample."""


def is_variable(spec: VarSpec) -> bool:
    """True for a LoD feed/fetch or one with a ``-1`` per-sample dimension."""
    return spec.is_lod_tensor or any(d < 0 for d in spec.shape)


def is_ragged(value: Any) -> bool:
    """True when ``value`` is a list/tuple (or object array) of per-sample arrays rather than one array."""
    if isinstance(value, np.ndarray):
        return value.dtype == object
    return isinstance(value, (list, tuple)) and any(isinstance(v, (np.ndarray, list, tuple)) for v in value)


@dataclass
class VariableFeeds:
    """Feeds ready for ``prepare_feed``/``encode_tensor``, with what is needed to shape the answer.

    ``feeds``: alias -> array; ``lods``: alias -> offsets (LoD feeds); ``lengths``: per-sample lengths of the
    first padded feed given ragged; ``padded_to``: its padded length; ``batch_size``: samples, when a
    variable-length feed tells it.
    """

    feeds: dict[str, Any]
    lods: dict[str, list[int]] = field(default_factory=dict)
    lengths: Optional[list[int]] = None
    padded_to: int = -1
    batch_size: Optional[int] = None


def prepare_variable_feeds(config: ServingConfig, feeds: Mapping[str, Any], pad_value: PadValue = 0,
                           lengths_feeds: Optional[Mapping[str, str]] = None) -> VariableFeeds:
    """Turn ragged and ``<name>.lod`` feeds into LoD rows + offsets or padded arrays; others pass unchanged.

    ``pad_value``: one number, or a dict feed -> number (feeds left out pad with 0). ``lengths_feeds``: padded
    feed -> the feed that gets each sample's length (filled unless given; a given one must hold the lengths).

    Raises VariableFeedError naming the feed (and the sample) for a ragged value of a fixed-shape feed, a bad
    ``.lod``, samples whose fixed dimensions do not match the config, or a given lengths feed that does not
    hold its padded feed's lengths.

    Raises:
        VariableFeedError: ragged values for a fixed-shape feed, ``<name>.lod`` without its feed, a LoD feed given as
            one array without offsets, bad offsets, a sample of the wrong shape or dtype, or a lengths feed that does
            not match its feed (names the feed and the sample).
    """
    out = VariableFeeds(feeds={})
    lengths_feeds = lengths_feeds or {}
    padded_lengths: dict[str, list[int]] = {}   # ragged padded feed -> its samples' lengths
    for name, value in feeds.items():
        if name.endswith(LOD_SUFFIX) and name[:-len(LOD_SUFFIX)] in feeds:
            continue   # consumed with its feed
        spec = _spec(config, name)
        offsets = feeds.get(name + LOD_SUFFIX)
        if spec is None or (not is_variable(spec) and offsets is None and not _irregular(value)):
            out.feeds[name] = value   # a fixed-shape feed (nested lists of equal length are fine)
            continue
        if not is_variable(spec):
            raise VariableFeedError(f"feed {name!r} has the fixed per-sample shape {list(spec.shape)}; it takes "
                                    f"one array [N, {', '.join(map(str, spec.shape))}], not ragged samples or "
                                    f"'{name}{LOD_SUFFIX}' offsets")
        if offsets is not None:
            samples = split_rows(name, np.asarray(value), offsets)
        elif is_ragged(value):
            samples = [np.asarray(v) for v in value]
        elif spec.is_lod_tensor:
            raise VariableFeedError(f"feed {name!r} is a LoD tensor: give a list of per-sample arrays or the rows "
                                    f"with '{name}{LOD_SUFFIX}' offsets (Paddle Serving's form)")
        else:
            out.feeds[name] = value   # already padded by the caller
            continue
        samples = [_cast(name, i, s, spec) for i, s in enumerate(samples)]
        _set_batch(out, name, len(samples))
        if spec.is_lod_tensor:
            out.feeds[name], out.lods[name] = lod_rows(samples)
        else:
            out.feeds[name], lengths = pad_samples(name, samples, spec, pad_value_for(pad_value, name))
            padded_lengths[name] = lengths
            if out.lengths is None:
                out.lengths, out.padded_to = lengths, int(out.feeds[name].shape[1]) if samples else 0
    for name in feeds:
        if name.endswith(LOD_SUFFIX) and name[:-len(LOD_SUFFIX)] not in feeds:
            raise VariableFeedError(f"'{name}' given without its feed {name[:-len(LOD_SUFFIX)]!r}")
    for name, length_name in lengths_feeds.items():
        if name not in out.feeds or _spec(config, length_name) is None:
            continue
        if length_name in feeds:
            check_given_lengths(name, length_name, feeds[length_name], padded_lengths.get(name), out.feeds[name])
        elif name in padded_lengths:
            length_spec = config.feed(length_name)
            out.feeds[length_name] = np.asarray(padded_lengths[name], dtype=length_spec.dtype).reshape(
                (len(padded_lengths[name]), *[d for d in length_spec.shape if d >= 0]))
    return out


def check_given_lengths(name: str, length_name: str, given: Any, lengths: Optional[Sequence[int]],
                        padded: Any) -> None:
    """A caller's lengths feed must hold the lengths of ``name``'s samples (ragged), or lengths within the
    padded length (an array padded by the caller). Raises VariableFeedError naming the first wrong sample.

    Raises:
        VariableFeedError: the lengths feed is not one number per sample, or a length differs from its sample's (ragged)
            or lies outside the padded length.
    """
    try:
        values = np.asarray(given).reshape(-1)
        if values.dtype == object:
            raise ValueError("ragged")
    except ValueError:
        raise VariableFeedError(f"feed {length_name!r} (the lengths of {name!r}) must hold one number per "
                                f"sample") from None
    rule = f"lengths_feeds maps {name!r} -> {length_name!r}"
    if lengths is not None:
        if len(values) != len(lengths):
            raise VariableFeedError(f"feed {length_name!r} has {len(values)} values for {len(lengths)} samples of "
                                    f"{name!r} ({rule})")
        for i, (got, want) in enumerate(zip(values.tolist(), lengths)):
            if got != want:
                raise VariableFeedError(f"feed {length_name!r}, sample {i}: length {got}, but sample {i} of "
                                        f"{name!r} has {want} ({rule})")
        return
    array = np.asarray(padded)
    if array.ndim < 2:
        return   # the request builder names the shape problem
    for i, got in enumerate(values.tolist()):
        if not 0 <= got <= array.shape[1]:
            raise VariableFeedError(f"feed {length_name!r}, sample {i}: length {got} is outside [0, "
                                    f"{array.shape[1]}], the padded length of {name!r} ({rule})")


def _irregular(value: Any) -> bool:
    """True for ragged samples that do not make one regular array."""
    if not is_ragged(value):
        return False
    try:
        return np.asarray(value).dtype == object
    except ValueError:
        return True


def _spec(config: ServingConfig, name: str) -> Optional[VarSpec]:
    try:
        return config.feed(name)
    except ConfigError:
        return None   # unknown: the request builder names the model's feeds


def _set_batch(out: VariableFeeds, name: str, count: int) -> None:
    if out.batch_size is not None and out.batch_size != count:
        raise VariableFeedError(f"feed {name!r} has {count} samples, another variable-length feed has "
                                f"{out.batch_size}")
    out.batch_size = count


def _cast(name: str, index: int, sample: np.ndarray, spec: VarSpec) -> np.ndarray:
    try:
        sample = sample.astype(spec.dtype, copy=False)
    except (TypeError, ValueError) as exc:
        raise VariableFeedError(f"feed {name!r}, sample {index}: cannot convert {sample.dtype} to "
                                f"{spec.dtype}: {exc}") from None
    if spec.is_lod_tensor:
        if sample.ndim == 0:
            raise VariableFeedError(f"feed {name!r}, sample {index}: a scalar; a LoD sample is an array of rows")
        return sample
    if sample.ndim != len(spec.shape) or any(d >= 0 and d != g for d, g in zip(spec.shape, sample.shape)):
        raise VariableFeedError(f"feed {name!r}, sample {index}: shape {list(sample.shape)}, the model expects "
                                f"{list(spec.shape)} per sample (-1: any length)")
    return sample


def split_rows(name: str, rows: np.ndarray, offsets: Any) -> list[np.ndarray]:
    """Per-sample views of ``rows`` cut at ``offsets``; VariableFeedError names the rule a bad LoD breaks.

    Raises:
        VariableFeedError: the offsets do not start at 0, decrease, or do not end at the row count.
    """
    lod = [int(x) for x in np.asarray(offsets).reshape(-1)]
    total = rows.shape[0] if rows.ndim else 0
    if len(lod) < 2 or lod[0] != 0:
        raise VariableFeedError(f"'{name}{LOD_SUFFIX}' must start at 0 and hold at least two offsets, got {lod}")
    if any(b < a for a, b in zip(lod, lod[1:])):
        raise VariableFeedError(f"'{name}{LOD_SUFFIX}' offsets must never decrease, got {lod}")
    if lod[-1] != total:
        raise VariableFeedError(f"'{name}{LOD_SUFFIX}' must end at the row count {total} of {name!r}, got {lod}")
    return [rows[a:b] for a, b in zip(lod, lod[1:])]


def lod_rows(samples: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """(concatenated rows, offsets); 1-D samples give rows of shape [rows, 1]."""
    offsets = [0]
    for sample in samples:
        offsets.append(offsets[-1] + int(sample.shape[0]))
    rows = np.concatenate(samples, axis=0)
    if rows.ndim == 1:
        rows = rows.reshape(-1, 1)
    return rows, offsets


def pad_samples(name: str, samples: Sequence[np.ndarray], spec: VarSpec,
                pad_value: float) -> tuple[np.ndarray, list[int]]:
    """(padded array [N, *longest], lengths along the first -1 dimension)."""
    first_var = next(i for i, d in enumerate(spec.shape) if d < 0)
    dims = [max((s.shape[k] for s in samples), default=0) if d < 0 else d for k, d in enumerate(spec.shape)]
    padded = np.full((len(samples), *dims), pad_value, dtype=spec.dtype)
    for i, sample in enumerate(samples):
        padded[(i, *[slice(0, d) for d in sample.shape])] = sample
    return padded, [int(s.shape[first_var]) for s in samples]


def shape_fetches(config: ServingConfig, outputs: Mapping[str, np.ndarray], lods: Mapping[str, Sequence[int]],
                  variable: VariableFeeds, batch_size: int, lod_form: str = "split") -> dict[str, Any]:
    """Give LoD and per-token fetches back per sample (``split``) or in Paddle Serving's form (``serving``).

    ``outputs``: fetch name -> array as decoded; ``lods``: fetch name -> the offsets the answer carried.
    Raises ValueError naming the fetch when its LoD does not fit the answer or the request's samples.
    """
    check_lod_form(lod_form)
    result: dict[str, Any] = {}
    for name, array in outputs.items():
        spec = config.fetch(name)
        offsets = [int(x) for x in lods.get(name, ())]
        if offsets:
            _check_fetch_lod(name, array, offsets, batch_size)
            if lod_form == "serving":
                result[name], result[name + LOD_SUFFIX] = array, np.asarray(offsets, dtype=np.int32)
            else:
                result[name] = [array[a:b] for a, b in zip(offsets, offsets[1:])]
        elif (lod_form == "split" and variable.lengths is not None and spec.shape and spec.shape[0] < 0
              and array.ndim >= 2 and array.shape[1] == variable.padded_to):
            result[name] = [array[i, :n] for i, n in enumerate(variable.lengths)]
        else:
            result[name] = array
    return result


def check_lod_form(lod_form: str) -> None:
    """ValueError unless ``lod_form`` is ``split`` or ``serving``.

    Raises:
        ValueError: ``lod_form`` is not ``split`` or ``serving``.
    """
    if lod_form not in LOD_FORMS:
        raise ValueError(f"lod_form must be one of {LOD_FORMS}, not {lod_form!r}")


def _check_fetch_lod(name: str, array: np.ndarray, offsets: list[int], batch_size: int) -> None:
    rows = array.shape[0] if array.ndim else 0
    if len(offsets) != batch_size + 1:
        raise ValueError(f"fetch {name!r}: lod {offsets[:8]}... has {len(offsets) - 1} sequences for a request "
                         f"of {batch_size} samples")
    if offsets[0] != 0 or offsets[-1] != rows or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"fetch {name!r}: lod {offsets[:8]}... does not describe its {rows} rows")


def feed_nbytes(feeds: Mapping[str, Any]) -> int:
    """The bytes of a task's feeds (name -> array, or a list of per-sample arrays for a variable-length feed), as
    they travel to a worker and, about, to the teacher.

    Example::

        feed_nbytes({"img": np.zeros((32, 1, 28, 28), np.float32)})   # 100352
    """
    total = 0
    for value in feeds.values():
        if isinstance(value, (list, tuple)):
            total += sum(np.asarray(part).nbytes for part in value)
        else:
            total += np.asarray(value).nbytes
    return total
