"""Faults fuzzing found (issue 26) seen where they hurt: the teacher's batcher, the request handler's answer and
the knowledge CLI. The inputs themselves live in tests/fuzz/corpus/*/fault-* and run through their harnesses
in tests/test_fuzz.py; these tests show the whole path: a server that keeps serving, an error that names the
feed, a CLI that exits as documented.

The run function stands in for the predictor (not under test); the batcher's threads are real.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.status_codes import ErrNo
from distill_base.tensor_codec import encode_tensor
from distill_reader.knowledge import KnowledgeWriter
from teachers.batcher import DynamicBatcher
from teachers.inference import InferenceHandler
from tests.fuzz.harnesses import DENSE_CONFIG
from tests.support.procs import REPO_ROOT

ROOT = REPO_ROOT


def _run(feeds, fetch, lods):
    w = feeds["w"]
    return {"y": (np.zeros((w.shape[0], 1), "float32"), [])}


def test_jobs_that_cannot_be_merged_never_stop_the_batcher():
    """Two LoD jobs of 0 elements whose other dimensions overflow when concatenated (issue 26): each is answered
    on its own, and a valid job after them still runs (before the fix the runner thread died in merge_jobs and
    every later request timed out while health said SERVING)."""
    batcher = DynamicBatcher(_run, max_batch_size=64, timeout_ms=300, runners=1, predict_timeout=10)
    try:
        huge = np.empty((2, 0, 1 << 29, 1 << 29), "int64")
        jobs = [batcher.submit_async({"w": huge}, ["y"], {"w": [0, 1, 2]}) for _ in range(2)]
        for job in jobs:
            assert job.result(timeout=10)["y"][0].shape == (2, 1)
        good = batcher.submit({"w": np.ones((3, 1), "int64")}, ["y"], {"w": [0, 1, 2, 3]})
        assert good["y"][0].shape == (3, 1)
        assert all(t.is_alive() for t in batcher._threads)
    finally:
        batcher.close(timeout=5)


def test_a_shape_past_what_numpy_holds_is_refused_naming_the_feed():
    """Before the fix such a request reached numpy's reshape and was answered by the catch-all
    ("malformed request: array is too big"), not by the check that names the feed."""
    request = service_pb2.Request(fetch_var_names=["prob"])
    encode_tensor(np.ones((2, 2, 3), "float32"), "x", out=request.tensor.add())
    request.tensor.add(name="ids", elem_type=0, shape=[2, 0, 1 << 30, 1 << 30, 1 << 30])
    encode_tensor(np.ones((2, 4), bool), "mask", out=request.tensor.add())
    answer = InferenceHandler(DENSE_CONFIG, run=_run).handle(request)
    assert answer.err_no == ErrNo.INPUT
    assert "feed 'ids'" in answer.err_msg and "shape [2, 0, 1073741824" in answer.err_msg
    assert "malformed request" not in answer.err_msg


@pytest.mark.parametrize("change", [{"dtype": ",f2"}, {"k": float("inf")}, {"fill": int("9" * 401)}],
                         ids=["dtype-literal", "k-infinity", "fill-401-digits"])
def test_inspect_exits_3_without_a_traceback_for_a_bad_manifest(tmp_path, change):
    path = tmp_path / "cache"
    with KnowledgeWriter(str(path), {"logits": ((4,), "float32")}, storage="topk:2:-inf") as writer:
        writer.append({"logits": np.arange(8, dtype="float32").reshape(2, 4)})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["fields"][0].update(change)
    (path / "manifest.json").write_text(json.dumps(manifest))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "distill_reader.knowledge", "inspect", str(path)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "field 'logits'" in result.stderr
