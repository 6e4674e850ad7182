"""LoD (level-of-detail) checks and packing for the teacher server: nothing malformed reaches Paddle Inference.

Paddle Serving 0.9 carries one LoD level per tensor on the wire: ``Tensor.lod`` holds flat offsets into the
tensor's rows (dim 0), e.g. ``[0, 3, 7]`` = two sequences of 3 and 4 rows in a tensor of 7 rows. A request's
LoD is checked against these rules before any predictor sees it (Paddle Inference trusts the LoD: a last offset
past the rows makes it read out of bounds, which can kill the process):

1. present: a feed marked ``is_lod_tensor`` in the serving config carries at least two offsets;
2. starts at 0;
3. never decreases (empty sequences, equal neighbours, are allowed: Paddle's sequence ops pad them);
4. ends at the row count of the tensor;
5. at most ``MAX_SEQUENCES`` sequences (bounds the work before anything is allocated from it).

The number of samples of a LoD feed is its number of sequences; the request handler checks that every feed
carries the same number of samples. The rows go to Paddle in the shape they were sent (as Paddle Serving does).

Fetches: Paddle Inference may return several LoD levels; ``fetch_lod`` turns them into the one level of row
offsets per sample that Paddle Serving sends (level 0 composed through the lower levels) and checks it ends at
the output's row count.

Dynamic batching: ``samples_of``/``lod_key`` give the batcher a request's sample count and merge key;
``merge_jobs`` concatenates requests with each LoD shifted by the rows before it; ``split_outputs`` cuts a merged
answer back per request (LoD outputs by their offsets, others by rows), so merged answers equal unmerged ones.

Example::

    rows, offsets, samples = check_lod_feed("words", np.arange(7), [0, 3, 7])   # rows as sent, 2 samples
    fetch_lod([[0, 1, 2], [0, 3, 7]], rows=7)                                    # [0, 3, 7]
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

MAX_SEQUENCES = 1 << 20


class LodError(ValueError):
    """A LoD that breaks one of the module's rules; the message names the tensor and the rule."""


def check_lod_feed(name: str, array: np.ndarray, lod: Sequence[int]) -> tuple[np.ndarray, list[int], int]:
    """Check the LoD of feed ``name``; returns (rows to feed, offsets, number of samples).

    Raises LodError naming the feed and the rule broken.

    Raises:
        LodError: a scalar, missing offsets, too many sequences, or offsets that do not start at 0, decrease or do not
            end at the row count (names the feed and the rule).
    """
    label = f"feed {name!r} (a LoD tensor)"
    if array.ndim == 0:
        raise LodError(f"{label}: a scalar has no rows; send the sequences' rows with their lod offsets")
    rows = int(array.shape[0])
    count = len(lod)
    if count < 2:
        raise LodError(f"{label}: lod offsets missing (got {list(lod)}); a LoD feed needs the offsets of its "
                       f"sequences, e.g. [0, 3, {max(rows, 3)}] for two sequences in {max(rows, 3)} rows")
    if count - 1 > MAX_SEQUENCES:
        raise LodError(f"{label}: {count - 1} sequences, more than the limit of {MAX_SEQUENCES}")
    offsets = np.asarray(lod, dtype=np.int64)
    if offsets[0] != 0:
        raise LodError(f"{label}: lod must start at 0, it starts at {int(offsets[0])}")
    steps = np.diff(offsets)
    if (steps < 0).any():
        at = int(np.argmax(steps < 0)) + 1
        raise LodError(f"{label}: lod offsets must never decrease; offset {at} is {int(offsets[at])} after "
                       f"{int(offsets[at - 1])}")
    if offsets[-1] != rows:
        raise LodError(f"{label}: lod must end at the tensor's row count {rows} (shape {list(array.shape)}), "
                       f"it ends at {int(offsets[-1])}")
    return array, [int(x) for x in offsets], count - 1


def fetch_lod(levels: Sequence[Sequence[int]], rows: int, name: str = "fetch") -> list[int]:
    """One level of row offsets per sample from Paddle's LoD ``levels`` (empty when there is none).

    Raises LodError when the result does not end at ``rows`` (a LoD this server must not send).

    Raises:
        LodError: the levels do not fit each other or the offsets do not describe ``rows`` rows.
    """
    levels = [list(level) for level in levels if len(level)]
    if not levels:
        return []
    offsets = [int(x) for x in levels[0]]
    for lower in levels[1:]:   # level k indexes the entries of level k+1; compose down to rows
        if offsets and offsets[-1] >= len(lower):
            raise LodError(f"{name}: LoD levels do not fit each other ({levels})")
        offsets = [int(lower[x]) for x in offsets]
    if offsets[0] != 0 or offsets[-1] != rows or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise LodError(f"{name}: output LoD {offsets} does not describe its {rows} rows")
    return offsets


# -- dynamic batching of LoD requests --------------------------------------------------------------------------
def samples_of(feeds: Mapping[str, np.ndarray], lods: Optional[Mapping[str, Sequence[int]]]) -> int:
    """Samples of a request: sequences of a LoD feed, else the first feed's rows."""
    for offsets in (lods or {}).values():
        if offsets:
            return len(offsets) - 1
    return int(next(iter(feeds.values())).shape[0]) if feeds else 0


def lod_key(lods: Optional[Mapping[str, Sequence[int]]]) -> tuple:
    """Part of the batcher's merge key: which feeds carry a LoD (jobs merge only with the same ones)."""
    return tuple(sorted(n for n, lod in (lods or {}).items() if lod))


def merge_jobs(jobs: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, Sequence[int]]]]
               ) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """(feeds, lods) of several requests run as one: rows concatenated, each LoD shifted by the rows before it.

    Raises:
        LodError: the jobs cannot be one batch (other feeds, dtypes or per-row shapes, a LoD that does not end at
            its rows, or merged rows whose non-zero dimensions multiply past ``MAX_MERGED_ELEMENTS``), checked
            before anything is allocated; the caller runs such jobs one by one.
    """
    names = list(jobs[0][0])
    key = lod_key(jobs[0][1])
    for name in names:
        _check_mergeable(name, [f.get(name) for f, _ in jobs])
    feeds = {n: np.concatenate([f[n] for f, _ in jobs], axis=0) for n in names}
    lods: dict[str, list[int]] = {}
    for name in key:
        merged, base = [0], 0
        for (feeds_of_job, job_lods) in jobs:
            offsets = (job_lods or {}).get(name)
            if lod_key(job_lods) != key or not offsets or int(offsets[0]) != 0 or \
                    int(offsets[-1]) != feeds_of_job[name].shape[0]:
                raise LodError(f"feed {name!r}: the jobs' LoDs cannot be merged (each must start at 0 and end at "
                               f"its rows)")
            merged.extend(base + int(x) for x in offsets[1:])
            base += int(offsets[-1])
        lods[name] = merged
    return feeds, lods


MAX_MERGED_ELEMENTS = 1 << 48   # non-zero dimensions of a merged feed (a 0-element feed may declare any others)


def _check_mergeable(name: str, arrays: Sequence[Optional[np.ndarray]]) -> None:
    if any(a is None or not isinstance(a, np.ndarray) or a.ndim == 0 for a in arrays):
        raise LodError(f"feed {name!r}: not every job carries it with rows")
    first = arrays[0]
    if any(a.dtype != first.dtype or a.shape[1:] != first.shape[1:] for a in arrays):
        raise LodError(f"feed {name!r}: the jobs' dtypes or per-row shapes differ "
                       f"({sorted({(str(a.dtype), a.shape[1:]) for a in arrays})})")
    shape = (sum(a.shape[0] for a in arrays), *first.shape[1:])
    if math.prod(d for d in shape if d) > MAX_MERGED_ELEMENTS:
        raise LodError(f"feed {name!r}: merged shape {list(shape)} is too large for one batch "
                       f"(its non-zero dimensions multiply past {MAX_MERGED_ELEMENTS})")


def split_outputs(outputs: Mapping[str, tuple[np.ndarray, list]], counts: Sequence[int]) -> Optional[list[dict]]:
    """Each request's share of a merged run's ``{name: (array, lod)}``, by sample counts; None when an output is
    neither one row per sample nor LoD over the samples (the caller then runs the requests one by one)."""
    total = sum(counts)
    shares: list[dict] = [{} for _ in counts]
    for name, (array, lod) in outputs.items():
        if lod and len(lod) == total + 1:
            start = 0
            for share, count in zip(shares, counts):
                first, last = lod[start], lod[start + count]
                share[name] = (array[first:last], [x - first for x in lod[start:start + count + 1]])
                start += count
        elif not lod and array.ndim and array.shape[0] == total:
            start = 0
            for share, count in zip(shares, counts):
                share[name] = (array[start:start + count], [])
                start += count
        else:
            return None
    return shares
