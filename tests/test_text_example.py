"""The text example (examples/text/run.py) end to end, shortened: fortunes corpus (3 classes, 60 texts each),
the LoD CNN teacher trained, exported and served by a real teachers.serve process, BOW students over 3 seeds
alone and distilled through DistillReader's batch generator with ragged word-id slots; results and plot written,
the server stopped afterwards."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.lod_models import skip_without_lod
from tests.support.procs import REPO_ROOT, ProcessGuard, pid_alive

FORTUNES = "/usr/share/games/fortunes"


def test_text_example_shortened(tmp_path):
    skip_without_lod()   # the example's teacher is a LoD model
    assert os.path.isfile(os.path.join(FORTUNES, "computers")), \
        "Debian's 'fortunes' package is missing: run bash scripts/setup.sh"
    workdir = str(tmp_path / "text")
    args = [os.path.join(REPO_ROOT, "examples", "text", "run.py"), "--categories", "computers,politics,zippy",
            "--limit_per_category", "60", "--seeds", "1,2,3", "--epochs", "2", "--teacher_epochs", "1",
            "--workdir", workdir]
    with ProcessGuard() as guard:
        proc = guard.python(*args, env={"PYTHONPATH": REPO_ROOT, "GLOG_minloglevel": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=300)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["categories"] == ["computers", "politics", "zippy"]
    assert (results["train_texts"], results["test_texts"]) == (144, 36)
    for mode in ("alone", "distilled"):
        assert len(results[mode]["curves"]) == 3 and all(len(c) == 2 for c in results[mode]["curves"])
        assert all(0.0 <= a <= 1.0 for c in results[mode]["curves"] for a in c)
        assert results[mode]["final_mean"] == pytest.approx(sum(results[mode]["finals"]) / 3)
    assert 0.0 <= results["teacher_accuracy"] <= 1.0
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 10_000
    assert "student distilled through DistillReader" in open(os.path.join(workdir, "results.md")).read()
    assert not pid_alive(results["server_pid"]), "the teacher server outlived the example"
