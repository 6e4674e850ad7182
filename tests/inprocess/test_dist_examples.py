"""The seed's five dist examples (fluid -> paddle.static) run as scripts: as written, and with one real batch."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.support.procs import REPO_ROOT

EXAMPLES = os.path.join(REPO_ROOT, "examples", "dist_seed")


def run_example(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_merge_example():
    as_written = run_example("merge_example.py", "--as-written")
    assert as_written == {"teacher_ops": 5}  # 2 student convs + 3 teacher convs in one program
    result = run_example("merge_example.py")
    assert result["shape"] == [2, 64, 28, 28]
    assert result["max_abs_diff"] == 0.0  # merged teacher == teacher alone, on the same batch


@pytest.mark.parametrize("script", ["fsp_loss_example.py", "l2_loss_example.py", "soft_label_loss_example.py",
                                    "loss_example.py"])
def test_loss_examples(script):
    as_written = run_example(script, "--as-written")
    assert as_written["loss_shape"] == []  # a scalar loss variable
    result = run_example(script)
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert math.isclose(result["loss"], result["numpy"], rel_tol=1e-5)
