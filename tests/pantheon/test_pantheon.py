"""Pantheon toy example as real processes (offline, online, hybrid), merging, re-batching, passes and fp16."""
import ast
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from distill_reader.pantheon import PantheonError, Student
from tests.support.procs import REPO_ROOT, ProcessGuard, free_port

TOY = os.path.join(REPO_ROOT, "examples", "pantheon_toy")
TOKEN = "toy-token-for-tests"
ENV = {"DISTILL_PANTHEON_TOKEN": TOKEN}
MAX_N = 1000

# A float32 teacher for the fp16 test: x -> x / 3, one batch of 50 per reader step.
FLOAT_TEACHER = textwrap.dedent("""
    import sys
    import numpy as np
    import paddle
    from distill_reader.pantheon import Teacher

    port, use_fp16 = int(sys.argv[1]), sys.argv[2] == "1"
    paddle.enable_static()
    startup, program = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(program, startup):
        x = paddle.static.data(name="x", shape=[-1, 4], dtype="float32")
        y = x / 3.0
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)

    def batches():
        for start in range(0, 200, 50):
            yield [np.arange(start * 4, (start + 50) * 4, dtype="float32").reshape(50, 4) + 0.1]

    teacher = Teacher(out_port=port, out_host="127.0.0.1", timeout=20)
    teacher.start()
    teacher.start_knowledge_service(feed_list=[x], schema={"x": x, "y": y}, program=program,
                                    reader_config={"batch_generator": batches}, exe=exe, use_fp16=use_fp16)
""")


def _toy(guard, script, *args, out=None, env=ENV):
    return guard.python(os.path.join(TOY, script), *args, "--timeout", "30", env=env, stdout=out,
                        stderr=subprocess.STDOUT if out else None)


def _wait_ok(proc, log_path, timeout=60):
    code = proc.wait(timeout=timeout)
    with open(log_path) as f:
        text = f.read()
    assert code == 0, f"{proc.args} exited with {code}:\n{text[-3000:]}"
    return text


def _samples(student_output):
    return [ast.literal_eval(line) for line in student_output.splitlines() if line.startswith("{'x': [")]


def _check_toy(samples, strategy, passes=1, per_pass=MAX_N):
    assert len(samples) == passes * per_pass
    factor = {"mean": 2, "sum": 4}[strategy]
    for i, sample in enumerate(samples):
        x = i % per_pass
        assert sample == {"x": [x], "2x-1": [2 * x - 1], "result": [factor * x], "2x+1": [2 * x + 1]}, (i, sample)


@pytest.fixture(scope="module")
def offline_knowledge(tmp_path_factory):
    """Both toy teachers in offline mode, with different readers and batch sizes."""
    root = tmp_path_factory.mktemp("pantheon_offline")
    paths = [str(root / "teacher1"), str(root / "teacher2")]
    with ProcessGuard() as guard:
        logs = [open(root / f"teacher{i}.log", "w") for i in (1, 2)]
        procs = [
            _toy(guard, "run_teacher1.py", "--out_path", paths[0], "--batch_size", "32", out=logs[0]),
            _toy(guard, "run_teacher2.py", "--out_path", paths[1], "--generator_type", "sample_generator",
                 "--batch_size", "7", out=logs[1]),
        ]
        for proc, log in zip(procs, logs):
            log.close()
            _wait_ok(proc, log.name)
    return paths


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["mean", "sum"])
def test_toy_offline(offline_knowledge, tmp_path, strategy):
    log = tmp_path / "student.log"
    with ProcessGuard() as guard, open(log, "w") as out:
        proc = _toy(guard, "run_student.py", "--in_path0", offline_knowledge[0], "--in_path1", offline_knowledge[1],
                    "--merge_strategy", strategy, out=out)
        text = _wait_ok(proc, log)
    _check_toy(_samples(text), strategy)


@pytest.mark.timeout(90)
def test_toy_online_student_first_with_messages(tmp_path):
    ports = [free_port(), free_port()]
    logs = {name: tmp_path / f"{name}.log" for name in ("student", "teacher1", "teacher2")}
    with ProcessGuard() as guard:
        files = {name: open(path, "w") for name, path in logs.items()}
        student = _toy(guard, "run_student.py", "--in_address0", f"127.0.0.1:{ports[0]}", "--in_address1",
                       f"127.0.0.1:{ports[1]}", "--merge_strategy", "mean", "--test_send_recv", "true",
                       out=files["student"])
        teachers = [
            _toy(guard, "run_teacher1.py", "--out_port", str(ports[0]), "--out_host", "127.0.0.1",
                 "--test_send_recv", "true", "--generator_type", "sample_list_generator", "--batch_size", "50",
                 out=files["teacher1"]),
            _toy(guard, "run_teacher2.py", "--out_port", str(ports[1]), "--out_host", "127.0.0.1",
                 "--test_send_recv", "true", "--batch_size", "64", out=files["teacher2"]),
        ]
        for f in files.values():
            f.close()
        text = _wait_ok(student, logs["student"])
        teacher_logs = [_wait_ok(t, logs[f"teacher{i + 1}"]) for i, t in enumerate(teachers)]
    lines = text.splitlines()
    for message in ["greetings from teacher1", "{'x': 1, 'y': 2}", "{3, 5}", "greetings from teacher2", "[1]",
                    "{1, 2, 3}"]:
        assert message in lines
    assert lines.index("greetings from teacher1") < lines.index("{3, 5}") < lines.index("greetings from teacher2")
    for teacher_log in teacher_logs:
        assert "recved message from student!" in teacher_log
        assert "served 1000 samples" in teacher_log
    _check_toy(_samples(text), "mean")


@pytest.mark.timeout(90)
def test_toy_hybrid_two_passes_drop_last(offline_knowledge, tmp_path):
    port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("student", "teacher1")}
    token_file = tmp_path / "token"
    token_file.write_text("the token from a file\n")
    env = {"DISTILL_PANTHEON_TOKEN": "not-this-one"}  # --token_file wins over the environment
    with ProcessGuard() as guard:
        files = {name: open(path, "w") for name, path in logs.items()}
        teacher = _toy(guard, "run_teacher1.py", "--out_port", str(port), "--out_host", "127.0.0.1",
                       "--serving_times", "2", "--generator_type", "sample_generator", "--batch_size", "10",
                       "--use_cuda", "true", "--token_file", str(token_file), out=files["teacher1"], env=env)
        student = _toy(guard, "run_student.py", "--in_address0", f"127.0.0.1:{port}", "--in_path1",
                       offline_knowledge[1], "--merge_strategy", "sum", "--passes", "2", "--batch_size", "64",
                       "--drop_last", "true", "--token_file", str(token_file), out=files["student"],
                       env={"DISTILL_PANTHEON_TOKEN": "nor-this-one"})
        for f in files.values():
            f.close()
        text = _wait_ok(student, logs["student"])
        teacher_log = _wait_ok(teacher, logs["teacher1"])
    assert "pass 2 of 2: served 1000 samples" in teacher_log
    assert "--use_cuda true, but this paddle build has no CUDA support: predicting on the CPU" in teacher_log
    samples = _samples(text)
    # 1000 samples in batches of 64: 15 full batches per pass, the last 40 samples dropped
    _check_toy(samples, "sum", passes=2, per_pass=15 * 64)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("drop_last", [False, True])
def test_rebatching_offline_knowledge(offline_knowledge, drop_last):
    student = Student(merge_strategy={"result": "mean"})
    assert student.register_teacher(in_path=offline_knowledge[0]) == 0
    assert student.register_teacher(in_path=offline_knowledge[1]) == 1
    student.start()
    desc = student.get_knowledge_desc()
    assert list(desc) == ["x", "2x-1", "result", "2x+1"]
    assert desc["result"] == {"shape": [-1, 1], "dtype": "int64", "lod_level": 0}
    for _ in range(2):  # offline knowledge can be read any number of times
        batches = list(student.get_knowledge_generator(batch_size=96, drop_last=drop_last)())
        sizes = [len(b["x"]) for b in batches]
        assert sizes == [96] * 10 + ([] if drop_last else [40])
        x = np.concatenate([b["x"] for b in batches]).ravel()
        np.testing.assert_array_equal(x, np.arange(sum(sizes)))
        result = np.concatenate([b["result"] for b in batches]).ravel()
        assert result.dtype == np.int64
        np.testing.assert_array_equal(result, 2 * x)
    assert student.get_knowledge_qsize() == 0


@pytest.mark.timeout(60)
def test_fp16_knowledge_is_cast_back(tmp_path):
    script = tmp_path / "float_teacher.py"
    script.write_text(FLOAT_TEACHER)
    port = free_port()
    with ProcessGuard() as guard:
        # the student registers first: it waits for the teacher to come up
        guard.python(str(script), str(port), "1", env=ENV)
        student = Student(token=TOKEN, timeout=30)
        student.register_teacher(in_address=f"127.0.0.1:{port}")
        student.start()
        desc = student.get_knowledge_desc()
        assert desc["y"] == {"shape": [-1, 4], "dtype": "float32", "lod_level": 0}
        batches = list(student.get_knowledge_generator(batch_size=64)())
        with pytest.raises(PantheonError, match=rf"teacher 0 at 127.0.0.1:{port} .*times=1"):
            student.get_knowledge_generator(batch_size=64)  # a second pass from a teacher serving one
        student.close()
        assert guard.procs[0].wait(timeout=30) == 0
    assert [len(b["y"]) for b in batches] == [64, 64, 64, 8]
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches])
    assert x.dtype == np.float32 and y.dtype == np.float32
    exact_x = np.arange(800, dtype="float32").reshape(200, 4) + np.float32(0.1)
    exact_y = exact_x / np.float32(3.0)
    # the values went through float16 and came back as float32
    np.testing.assert_array_equal(x, exact_x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(y, exact_y.astype(np.float16).astype(np.float32))
    assert not np.array_equal(y, exact_y)
    np.testing.assert_allclose(y, exact_y, rtol=1e-3)


def test_toy_scripts_explain_their_flags():
    for script, flags in [("run_teacher1.py", ["--out_path", "--out_port", "--use_cuda", "--serving_times",
                                               "--token_file"]),
                          ("run_student.py", ["--in_path0", "--in_path1", "--in_address0", "--in_address1",
                                              "--merge_strategy", "--token_file"])]:
        result = subprocess.run([sys.executable, os.path.join(TOY, script), "--help"], capture_output=True,
                                text=True, timeout=60, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stderr
        for flag in flags:
            assert flag in result.stdout


def test_fp16_overflow_online_is_refused_with_the_offline_error(tmp_path):
    """Values above float16's 65504 sent with use_fp16 would arrive as inf: refused as the offline writer does."""
    script = tmp_path / "float_teacher.py"
    script.write_text(FLOAT_TEACHER.replace(" + 0.1]", " * 100.0]"))   # up to 79900: over float16's range
    port = free_port()
    with ProcessGuard() as guard:
        teacher = guard.python(str(script), str(port), "1", env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        student = Student(token=TOKEN, timeout=30)
        student.register_teacher(in_address=f"127.0.0.1:{port}")
        student.start()
        got = []
        with pytest.raises(PantheonError, match=r"value \d+ does not fit float16 \(max 65504\)"):
            for batch in student.get_knowledge_generator(batch_size=50)():
                got.append(batch)
        student.close()
        output = teacher.communicate(timeout=30)[0].decode()
        assert teacher.returncode != 0 and "does not fit float16" in output
    assert all(np.isfinite(b["y"]).all() and np.isfinite(b["x"]).all() for b in got)   # never inf
    assert sum(len(b["y"]) for b in got) < 200   # the batches with values over 65504 never arrived
