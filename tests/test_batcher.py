"""Dynamic batching: concurrent requests merge into fewer predictor runs and each caller gets its own rows.

The run function stands in for the predictor (not under test here); the batcher's threads are real.
"""
import threading
import time

import numpy as np
import pytest

from teachers.batcher import BatcherClosed, DynamicBatcher


def _recording_run(sizes: list, delay: float = 0.02):
    def run(feeds, fetch, lods):
        x = feeds["x"]
        sizes.append(x.shape[0])
        time.sleep(delay)  # a predictor run takes time, so requests pile up meanwhile
        return {"y": (x * 2.0 + 1.0, [])}
    return run


def _submit_concurrently(batcher: DynamicBatcher, jobs: int, rows: int = 1) -> dict:
    results, errors = {}, []

    def client(i: int) -> None:
        try:
            x = np.full((rows, 3), float(i), dtype="float32")
            results[i] = batcher.submit({"x": x}, ["y"])["y"][0]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return results


def test_concurrent_requests_are_merged_and_split_back():
    sizes: list = []
    batcher = DynamicBatcher(_recording_run(sizes), max_batch_size=64, timeout_ms=5, runners=1)
    try:
        results = _submit_concurrently(batcher, jobs=32)
    finally:
        batcher.close()
    assert sum(sizes) == 32                       # every sample ran exactly once
    assert len(sizes) < 32 and max(sizes) > 1     # ... in merged runs
    assert batcher.merged_jobs > 0
    for i, y in results.items():                  # each caller got its own rows back
        np.testing.assert_array_equal(y, np.full((1, 3), i * 2.0 + 1.0, dtype="float32"))


def test_merged_runs_never_exceed_max_batch_size():
    sizes: list = []
    batcher = DynamicBatcher(_recording_run(sizes), max_batch_size=8, timeout_ms=5, runners=2)
    try:
        results = _submit_concurrently(batcher, jobs=24, rows=3)
    finally:
        batcher.close()
    assert sum(sizes) == 72 and max(sizes) <= 8
    for i, y in results.items():
        assert y.shape == (3, 3) and (y == i * 2.0 + 1.0).all()


def test_batching_off_runs_each_request_alone():
    sizes: list = []
    batcher = DynamicBatcher(_recording_run(sizes, delay=0.005), max_batch_size=1, timeout_ms=5, runners=1)
    try:
        _submit_concurrently(batcher, jobs=10)
    finally:
        batcher.close()
    assert sizes == [1] * 10


def test_incompatible_requests_are_not_merged():
    seen: list = []

    def run(feeds, fetch, lods):
        seen.append((tuple(fetch), feeds["x"].shape))
        time.sleep(0.01)
        return {name: (feeds["x"].reshape(feeds["x"].shape[0], -1)[:, :1], []) for name in fetch}

    batcher = DynamicBatcher(run, max_batch_size=64, timeout_ms=20, runners=1)
    outs = {}
    try:
        threads = [threading.Thread(target=lambda k=k, shape=shape, fetch=fetch: outs.__setitem__(
            k, batcher.submit({"x": np.zeros(shape, "float32")}, fetch)))
            for k, shape, fetch in [(0, (2, 3), ["a"]), (1, (2, 4), ["a"]), (2, (2, 3), ["b"])]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        batcher.close()
    assert len(seen) == 3 and all(shape[0] == 2 for _, shape in seen)   # per-sample shape or fetch differ
    assert set(outs[0]) == {"a"} and set(outs[2]) == {"b"}


def test_errors_reach_every_merged_caller_and_closed_batcher_refuses():
    def run(feeds, fetch, lods):
        time.sleep(0.01)
        raise RuntimeError("predictor failed on purpose")

    batcher = DynamicBatcher(run, max_batch_size=64, timeout_ms=5, runners=1)
    errors = []

    def client() -> None:
        try:
            batcher.submit({"x": np.zeros((1, 3), "float32")}, ["y"])
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    batcher.close()
    assert errors == ["predictor failed on purpose"] * 6
    with pytest.raises(BatcherClosed):
        batcher.submit({"x": np.zeros((1, 3), "float32")}, ["y"])
