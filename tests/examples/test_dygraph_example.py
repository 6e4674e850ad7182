"""examples/dygraph end to end on a small slice of Fashion-MNIST, on the running paddle line: a dygraph teacher saved
with paddle.jit.save (PIR .json on paddle 3), exported and served by a real teachers.serve process; dygraph students
fed by a shuffled paddle.io.DataLoader through DistillReader (online, and offline cache), and in-process."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.procs import MNIST_DIR, REPO_ROOT, ProcessGuard, pid_alive

EXAMPLE = os.path.join(REPO_ROOT, "examples", "dygraph", "run.py")
TRAIN, BATCH = 1280, 64
TEACHER_BATCH = 32   # DistillReader's default teacher_batch_size: each batch of 64 is two requests


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dygraph_example"))
    args = [EXAMPLE, "--data_dir", MNIST_DIR, "--train_samples", str(TRAIN), "--test_samples", "500", "--epochs", "2",
            "--teacher_epochs", "2", "--batch_size", str(BATCH), "--workdir", workdir]
    with ProcessGuard() as guard:
        proc = guard.python(*args, env={"PYTHONPATH": REPO_ROOT, "GLOG_minloglevel": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=400)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        data = json.load(f)
    data["workdir"] = workdir
    return data


def _runs(results) -> dict:
    return {run["mode"]: run for run in results["students"]}


def test_the_teacher_is_saved_the_default_way_of_the_line(results):
    import paddle

    from distill_base.paddle_compat import paddle_major

    assert results["paddle"] == paddle.__version__
    extension = ".json" if paddle_major(paddle) >= 3 else ".pdmodel"
    assert os.path.isfile(os.path.join(results["workdir"], "teacher", "inference" + extension))
    assert results["teacher_accuracy"] > 0.6   # Fashion-MNIST, 2 epochs on 1280 images; chance is 0.1


def test_every_soft_label_is_the_teachers_own_prediction(results):
    runs = _runs(results)
    assert set(runs) == {"alone", "service", "offline", "in_process"}
    for mode in ("service", "offline", "in_process"):
        assert runs[mode]["max_soft_label_error"] < 1e-4, mode   # shuffled batches: each sample its own logits


def test_served_online_then_offline_cache_without_requests(results):
    runs = _runs(results)
    per_epoch = -(-TRAIN // BATCH) * -(-BATCH // TEACHER_BATCH)
    assert [e["requests"] for e in runs["service"]["epochs"]] == [per_epoch, per_epoch]
    offline = runs["offline"]["epochs"]
    assert [e["cache"] for e in offline] == ["write", "read"]
    assert [e["requests"] for e in offline] == [per_epoch, 0] and offline[1]["cache_served"] == TRAIN
    assert not pid_alive(results["server_pid"])   # the example stopped its server


def test_students_learn(results):
    for mode, run in _runs(results).items():
        assert run["accuracy"] > 0.6, (mode, run["accuracy"])
        assert run["epochs"][-1]["loss"] < run["epochs"][0]["loss"], mode
