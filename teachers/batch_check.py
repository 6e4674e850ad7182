"""Is a model batch-independent? Merging requests (dynamic batching) is only correct when each output row
depends on its own input row alone; a model that normalises over the batch (batch-norm in training mode, a
mean over the batch, ...) answers merged requests differently from lone ones.

``check_batch_independence`` runs the model on a random batch and on each of its rows alone, and compares
the rows. Inputs are random per dtype: floats ~ N(0, 1), integers in {0, 1} (safe ids for embeddings), bools
at random. Floating outputs may differ by rounding (kernels for batch 1 and batch N are not the same): they are
compared with ``rtol`` and ``atol`` relative to the output's magnitude.

Example::

    verdict = check_batch_independence(pool.run, config)
    if not verdict.independent:
        print(verdict.reason)   # e.g. "row 3 of 'prediction' alone differs from the same row in a batch of 8 ..."
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from distill_base.serving_config import ServingConfig

RunFn = Callable[..., dict]


@dataclass(frozen=True)
class BatchVerdict:
    """``independent``: merging keeps every answer; ``reason``: why not (or what was checked)."""

    independent: bool
    reason: str


def random_feeds(config: ServingConfig, batch: int, seed: int = 0) -> dict:
    """Random inputs [batch, *shape] for every feed, by real name; KeyError-free for fixed shapes only."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in config.feeds:
        shape = (batch, *spec.shape)
        dtype = spec.dtype
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "c":
            feeds[spec.name] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def check_batch_independence(run: RunFn, config: ServingConfig, batch: int = 8, rtol: float = 1e-3,
                             atol: float = 1e-4) -> BatchVerdict:
    """Compare each row of a random batch of ``batch`` run alone and inside the batch, for every fetch.

    ``run(feeds, fetch_names, lods)`` returns {name: (array, lod)}. Never raises: a model that cannot be
    checked (LoD or variable-size feeds, a failing run) is reported as not independent, with the reason."""
    variable = [s.alias_name for s in config.feeds if s.is_lod_tensor or any(d < 0 for d in s.shape)]
    if variable:
        return BatchVerdict(False, f"feeds {variable} are LoD or have variable dimensions: cannot check")
    fetch = [s.name for s in config.fetches]
    feeds = random_feeds(config, batch)
    try:
        together = run(feeds, fetch, None)
        alone = [run({n: a[i:i + 1] for n, a in feeds.items()}, fetch, None) for i in range(batch)]
    except Exception as exc:  # noqa: BLE001 - a model that fails on random inputs cannot be checked
        return BatchVerdict(False, f"the model failed on random inputs ({exc!r}): cannot check")
    for spec in config.fetches:
        merged, lod = together[spec.name]
        if lod or merged.shape[:1] != (batch,):
            return BatchVerdict(False, f"fetch {spec.alias_name!r} has shape {list(merged.shape)} for a batch of "
                                       f"{batch} (not one row per sample)")
        scale = float(np.abs(merged).max()) if merged.dtype.kind in "fc" and merged.size else 1.0
        for i in range(batch):
            single = alone[i][spec.name][0]
            if single.shape != merged[i:i + 1].shape:
                return BatchVerdict(False, f"fetch {spec.alias_name!r}: row {i} alone has shape "
                                           f"{list(single.shape)}, inside a batch {list(merged[i:i + 1].shape)}")
            if merged.dtype.kind in "fc":
                same = np.allclose(single, merged[i:i + 1], rtol=rtol, atol=atol * max(scale, 1.0))
            else:
                same = np.array_equal(single, merged[i:i + 1])
            if not same:
                diff = float(np.abs(single.astype(np.float64) - merged[i:i + 1].astype(np.float64)).max()) \
                    if merged.dtype.kind != "c" else float(np.abs(single - merged[i:i + 1]).max())
                return BatchVerdict(False, f"row {i} of fetch {spec.alias_name!r} alone differs from the same row "
                                           f"inside a random batch of {batch} (max difference {diff:.3g})")
    return BatchVerdict(True, f"each of {batch} random rows alone equals its row inside the batch "
                              f"(rtol {rtol:g}, atol {atol:g} x output scale), for every fetch")
