"""The text example (examples/text/run.py) end to end, shortened: fortunes corpus (3 classes, 60 texts each),
the CNN teacher trained, exported and served by a real teachers.serve process, BOW students over 3 seeds alone and
distilled through DistillReader's batch generator with ragged word-id slots; results and plot written, the server
stopped afterwards. Two teachers: the LoD one (paddle 2.x only: PIR has no LoD tensors) and the padded one with a
length feed (paddle 2.6 and 3.x; the reader's ``pad_value`` and ``lengths_feeds``). The logits fed to the first
distilled batch equal a local Paddle Inference run of the exported teacher on each text alone (unpadded), so
wrong padding or lengths would show. ``--teacher lod`` on paddle 3 is the example's own error, not Paddle's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_base.serving_config import ServingConfig
from tests.support.lod_models import local_predict, lod_available
from tests.support.procs import REPO_ROOT, ProcessGuard, pid_alive

FORTUNES = "/usr/share/games/fortunes"
RUN = os.path.join(REPO_ROOT, "examples", "text", "run.py")
TEACHERS = ["lod", "padded"] if lod_available() else ["padded"]


def _local_logits(workdir: str, teacher: str, words: list) -> np.ndarray:
    """The exported teacher's logits for each text alone, from a local Paddle Inference predictor."""
    server_dir = os.path.join(workdir, "serving_server")
    config = ServingConfig.load(os.path.join(workdir, "serving_client", "serving_client_conf.prototxt"))
    name = config.fetch("logits").name
    rows = []
    for w in words:
        if teacher == "lod":
            out = local_predict(server_dir, {"words": w.reshape(-1, 1)}, {"words": [0, len(w)]})
        else:
            out = local_predict(server_dir, {"words": w[None], "length": np.array([[len(w)]], np.int64)})
        rows.append(out[name][0][0])
    return np.stack(rows)


@pytest.mark.parametrize("teacher", TEACHERS)
def test_text_example_shortened(tmp_path, teacher):
    assert os.path.isfile(os.path.join(FORTUNES, "computers")), \
        "Debian's 'fortunes' package is missing: run bash scripts/setup.sh"
    workdir = str(tmp_path / "text")
    args = [RUN, "--categories", "computers,politics,zippy", "--limit_per_category", "60", "--seeds", "1,2,3",
            "--epochs", "2", "--teacher_epochs", "1", "--teacher", teacher, "--workdir", workdir]
    with ProcessGuard() as guard:
        proc = guard.python(*args, env={"PYTHONPATH": REPO_ROOT, "GLOG_minloglevel": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=300)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["teacher"] == teacher
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

    fed = np.load(os.path.join(workdir, "first_distilled_batch.npz"))
    words = np.split(fed["rows"], fed["offsets"][1:-1])
    assert len(words) == 64 and len({len(w) for w in words}) > 1, "a batch of texts of different lengths"
    np.testing.assert_allclose(fed["logits"], _local_logits(workdir, teacher, words), rtol=1e-4, atol=1e-4)


def test_lod_teacher_on_paddle_3_is_the_examples_own_error(tmp_path):
    """``--teacher lod`` on paddle 3 exits 2 with the example's message before anything runs, never Paddle's
    TypeError. On paddle 3 the real command; on paddle 2.x the version the example reads is patched to 3."""
    args = [RUN, "--teacher", "lod", "--workdir", str(tmp_path / "never")]
    if lod_available():
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(RUN)!r}); sys.argv = {args!r}; import run; "
                f"run.paddle_major = lambda: 3; run.main()")
        args = ["-c", code]
    proc = subprocess.run([sys.executable, *args], env={**os.environ, "PYTHONPATH": REPO_ROOT},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--teacher lod needs paddle 2.x" in proc.stderr and "Use --teacher padded" in proc.stderr
    assert "Traceback" not in proc.stderr and "TypeError" not in proc.stderr
    assert not os.path.exists(tmp_path / "never")
