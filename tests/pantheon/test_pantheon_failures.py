"""Pantheon failure paths: wrong token, a teacher or student dying mid-stream, conflicting knowledge, bad frames."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from distill_reader.pantheon import (
    AuthenticationError,
    KnowledgeMismatch,
    PantheonError,
    Student,
    Teacher,
    TeacherDisconnected,
)
from distill_reader.pantheon.knowledge_files import OfflineKnowledgeWriter
from distill_reader.pantheon.knowledge_merge import merge_descs, merged_stream
from distill_reader.pantheon.transport import Connection, encode_frame
from tests.support.procs import ProcessGuard, free_port, pid_alive, wait_for

TOKEN = "failure-tests-token"
KEYS = (b"a" * 32, b"b" * 32)  # per-direction frame keys of a socketpair connection (normally from the handshake)

# A teacher that streams slowly: 200 batches of 10 x 100 float32, one every 50 ms.
SLOW_TEACHER = textwrap.dedent("""
    import sys
    import time
    import numpy as np
    import paddle
    from distill_reader.pantheon import Teacher

    port = int(sys.argv[1])
    paddle.enable_static()
    startup, program = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(program, startup):
        x = paddle.static.data(name="x", shape=[-1, 100], dtype="float32")
        logits = x * 2.0
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)

    def batches():
        for i in range(200):
            time.sleep(0.05)
            yield [np.full((10, 100), i, dtype="float32")]

    teacher = Teacher(out_port=port, out_host="127.0.0.1", timeout=30)
    teacher.start()
    teacher.start_knowledge_service(feed_list=[x], schema={"logits": logits}, program=program,
                                    reader_config={"batch_generator": batches}, exe=exe)
""")

# A student that reads slowly and reports what it got.
SLOW_STUDENT = textwrap.dedent("""
    import sys
    import time
    from distill_reader.pantheon import Student

    student = Student(timeout=30)
    student.register_teacher(in_address=sys.argv[1])
    student.start()
    for i, batch in enumerate(student.get_knowledge_generator(batch_size=10)()):
        print("got", i, float(batch["logits"][0, 0]), flush=True)
        time.sleep(0.1)
""")


@pytest.fixture(autouse=True)
def no_processes_left(tmp_path):
    """After every test (whatever the order, or alone): no script it started from its folder is still running.

    Only the test's own scripts are matched (its ``tmp_path``): other modules' session-scoped servers also live
    under the same pytest base folder.
    """
    yield
    pattern = str(tmp_path) + r"/[^ ]*\.py"
    result = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    assert result.stdout.strip() == "", f"processes left running by the test: {result.stdout.split()}"


def test_the_leftover_check_sees_a_running_script(tmp_path):
    """The check above is not vacuous: the same pgrep finds a script of this test while it runs."""
    script = tmp_path / "slow_teacher.py"
    script.write_text("import time\ntime.sleep(60)\n")
    with ProcessGuard() as guard:
        proc = guard.python(str(script))
        wait_for(lambda: subprocess.run(["pgrep", "-f", str(tmp_path) + r"/[^ ]*\.py"], capture_output=True,
                                        text=True).stdout.split() == [str(proc.pid)], 10, "pgrep to see the script")


def _env():
    return {"DISTILL_PANTHEON_TOKEN": TOKEN}


@pytest.mark.timeout(60)
def test_wrong_token_refused_on_both_sides(tmp_path):
    port = free_port()
    err = tmp_path / "teacher.err"
    code = ("from distill_reader.pantheon import Teacher\n"
            f"t = Teacher(out_port={port}, out_host='127.0.0.1', token='the-right-token', timeout=4)\n"
            "t.start()\n")
    with ProcessGuard() as guard, open(err, "w") as stderr:
        teacher = guard.python("-c", code, stderr=stderr)
        student = Student(token="a-wrong-token", timeout=20)
        with pytest.raises(AuthenticationError, match=rf"teacher at 127.0.0.1:{port} refused our token"):
            student.register_teacher(in_address=f"127.0.0.1:{port}")
        assert teacher.wait(timeout=20) != 0
    text = err.read_text()
    assert "wrong Pantheon token" in text
    assert f"no student connected to port {port} within 4s; refused 1 connection(s) with a wrong token" in text


def test_online_mode_needs_a_token(monkeypatch):
    monkeypatch.delenv("DISTILL_PANTHEON_TOKEN", raising=False)
    with pytest.raises(ValueError, match="DISTILL_PANTHEON_TOKEN"):
        Teacher(out_port=free_port())
    student = Student()
    with pytest.raises(ValueError, match="DISTILL_PANTHEON_TOKEN"):
        student.register_teacher(in_address=f"127.0.0.1:{free_port()}")


@pytest.mark.timeout(30)
def test_unreachable_teacher_is_an_error_after_the_timeout():
    student = Student(token=TOKEN, timeout=1)
    started = time.monotonic()
    with pytest.raises(PantheonError, match="not reachable within 1s"):
        student.register_teacher(in_address=f"127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_teacher_killed_mid_stream(tmp_path):
    script = tmp_path / "slow_teacher.py"
    script.write_text(SLOW_TEACHER)
    port = free_port()
    with ProcessGuard() as guard:
        teacher = guard.python(str(script), str(port), env=_env())
        student = Student(token=TOKEN, timeout=30)
        student.register_teacher(in_address=f"127.0.0.1:{port}")
        student.start()
        generator = student.get_knowledge_generator(batch_size=10)()
        first = [next(generator) for _ in range(3)]
        for i, batch in enumerate(first):
            np.testing.assert_array_equal(batch["logits"], np.full((10, 100), 2.0 * i, dtype="float32"))
        os.killpg(teacher.pid, signal.SIGKILL)
        teacher.wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(TeacherDisconnected, match=rf"teacher 0 at 127.0.0.1:{port} disconnected in the middle "
                                                      r"of pass 1 .*did the teacher die\?"):
            for _ in generator:
                pass
        assert time.monotonic() - started < 5
        with pytest.raises(TeacherDisconnected):
            student.recv(0)
        student.close()


@pytest.mark.timeout(60)
def test_student_killed_mid_stream(tmp_path):
    teacher_script = tmp_path / "slow_teacher.py"
    teacher_script.write_text(SLOW_TEACHER)
    student_script = tmp_path / "slow_student.py"
    student_script.write_text(SLOW_STUDENT)
    port = free_port()
    teacher_err, student_out = tmp_path / "teacher.err", tmp_path / "student.out"
    with ProcessGuard() as guard, open(teacher_err, "w") as err, open(student_out, "w") as out:
        student = guard.python(str(student_script), f"127.0.0.1:{port}", env=_env(), stdout=out)
        teacher = guard.python(str(teacher_script), str(port), env=_env(), stderr=err)
        wait_for(lambda: "got 3 6.0" in student_out.read_text(), 40, "the student to read 4 batches")
        os.killpg(student.pid, signal.SIGKILL)
        student.wait(timeout=10)
        started = time.monotonic()
        assert teacher.wait(timeout=10) != 0
        assert time.monotonic() - started < 5
        assert not pid_alive(teacher.pid)
    text = teacher_err.read_text()
    assert "StudentDisconnected: the student disconnected in the middle of pass 1 of 1" in text, text[-2000:]


def _dump(path, batches):
    teacher = Teacher(out_path=str(path))
    teacher.start()
    for batch in batches:
        teacher.dump(batch)
    teacher.close()


def test_conflicting_keys_without_strategy(tmp_path):
    x = np.arange(20, dtype="int64").reshape(-1, 1)
    _dump(tmp_path / "t0", [{"x": x[:8], "result": x[:8] * 2 - 1}, {"x": x[8:], "result": x[8:] * 2 - 1}])
    _dump(tmp_path / "t1", [{"result": x * 2 + 1}])
    student = Student()
    student.register_teacher(in_path=str(tmp_path / "t0"))
    student.register_teacher(in_path=str(tmp_path / "t1"))
    student.start()
    with pytest.raises(KnowledgeMismatch, match=r"'result' is produced by teacher 0 .*, teacher 1 .* no merge "
                                                r"strategy"):
        student.get_knowledge_desc()
    # with a strategy the same files merge, values and dtype intact
    student = Student(merge_strategy={"result": "mean"})
    student.register_teacher(in_path=str(tmp_path / "t0"))
    student.register_teacher(in_path=str(tmp_path / "t1"))
    student.start()
    (batch,) = list(student.get_knowledge_generator(batch_size=32)())
    np.testing.assert_array_equal(batch["x"], x)
    np.testing.assert_array_equal(batch["result"], 2 * x)
    assert batch["result"].dtype == np.int64


def test_merge_checks_shapes_dtypes_and_sample_counts():
    a = {"p": {"shape": [-1, 10], "dtype": "float32", "lod_level": 0}}
    with pytest.raises(KnowledgeMismatch, match=r"'p' has shape \[-1, 10\] in teacher 0 but \[-1, 5\] in teacher 1"):
        merge_descs([a, {"p": {"shape": [-1, 5], "dtype": "float32", "lod_level": 0}}], {"p": "sum"})
    with pytest.raises(KnowledgeMismatch, match="'p' has dtype float32 in teacher 0 but float64 in teacher 1"):
        merge_descs([a, {"p": {"shape": [-1, 10], "dtype": "float64", "lod_level": 0}}], {"p": "sum"})
    desc = merge_descs([a, a], {"p": "sum"})
    short = [{"p": np.ones((4, 10), "float32")}]
    long = [{"p": np.ones((4, 10), "float32")}, {"p": np.ones((3, 10), "float32")}]
    with pytest.raises(KnowledgeMismatch, match="teacher 0 ended after 4 samples"):
        list(merged_stream([short, long], desc, {"p": "sum"}, batch_size=4))
    (merged,) = list(merged_stream([short, short], desc, {"p": "sum"}, batch_size=8))
    np.testing.assert_array_equal(merged["p"], np.full((4, 10), 2.0, "float32"))


def test_incomplete_offline_knowledge_is_refused(tmp_path):
    writer = OfflineKnowledgeWriter(str(tmp_path / "k"), {"p": {"shape": [-1, 3], "dtype": "float32",
                                                                "lod_level": 0}})
    writer.write({"p": np.ones((5, 3), "float32")})
    writer.abort()
    student = Student()
    with pytest.raises(PantheonError, match="is incomplete"):
        student.register_teacher(in_path=str(tmp_path / "k"))


DUMP_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from distill_reader.pantheon import Teacher

    def batches():
        yield {"p": np.arange(6, dtype="float32").reshape(3, 2)}
        yield {"p": np.arange(6, 10, dtype="float32").reshape(2, 2)}
        raise OSError("the input files went away")

    case = sys.argv[2]
    if case.startswith("with"):
        with Teacher(out_path=sys.argv[1]) as t:
            t.start()
            for i, batch in enumerate(batches()):
                t.dump(batch)
                if i == 0 and case == "with":
                    break
        sys.exit(0)
    t = Teacher(out_path=sys.argv[1])
    t.start()
    try:
        for batch in batches():
            t.dump(batch)
    except OSError as exc:
        print("error:", exc, file=sys.stderr)
        if case == "closed":
            t.close()           # the script says its knowledge is whole anyway
            sys.exit(0)
        sys.exit(1 if case == "exit1" else 0)   # "exit0": ends without close()
""")


@pytest.mark.parametrize("case, complete", [("exit1", False), ("exit0", False), ("with_error", False),
                                            ("closed", True), ("with", True)])
def test_offline_knowledge_is_complete_only_when_the_teacher_closed_it(tmp_path, case, complete):
    """Attack: a teacher script that catches an error and exits 1. Before: at interpreter exit the partial knowledge
    was marked complete (only ``sys.last_value`` said otherwise). Now: complete only after ``Teacher.close()``."""
    script = tmp_path / "dump_teacher.py"
    script.write_text(DUMP_SCRIPT)
    path = tmp_path / "knowledge"
    result = subprocess.run([sys.executable, str(script), str(path), case], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert result.returncode == (0 if case in ("exit0", "closed", "with") else 1), result.stderr
    student = Student()
    if not complete:
        if case != "with_error":  # the with block aborts the writer itself
            assert "left INCOMPLETE (5 samples committed)" in result.stderr and "Teacher.close()" in result.stderr
        with pytest.raises(PantheonError, match=r"is incomplete \(5 samples committed\)"):
            student.register_teacher(in_path=str(path))
        return
    student.register_teacher(in_path=str(path))
    student.start()
    (batch,) = list(student.get_knowledge_generator(batch_size=8)())
    rows = 5 if case == "closed" else 3
    np.testing.assert_array_equal(batch["p"], np.arange(2 * rows, dtype="float32").reshape(rows, 2))


def test_messages_round_trip_without_pickle():
    left, right = socket.socketpair()
    a, b = Connection(left, "a", timeout=5, keys=KEYS), Connection(right, "b", timeout=5, keys=KEYS[::-1])
    try:
        value = {"s": "text", 1: [1.5, None, True], (2, 3): {4, 5}, "arr": np.arange(6, dtype="int16").reshape(2, 3),
                 "empty": np.zeros((0, 4), "float32"), "scalar": np.float64(2.5), "raw": b"\x00\x01"}
        a.send("data", value)
        kind, got, _ = b.recv()
        assert kind == "data"
        assert got["s"] == "text" and got[1] == [1.5, None, True] and got[(2, 3)] == {4, 5}
        np.testing.assert_array_equal(got["arr"], value["arr"])
        assert got["arr"].dtype == np.int16 and got["empty"].shape == (0, 4)
        assert got["scalar"] == 2.5 and got["raw"] == b"\x00\x01"
        with pytest.raises(TypeError, match="cannot send a object"):
            a.send("data", object())
        with pytest.raises(TypeError, match="dtype object"):
            encode_frame("data", np.array([object()]))
    finally:
        a.close()
        b.close()


def test_timeout_when_the_peer_goes_silent():
    left, right = socket.socketpair()
    silent = right  # a raw socket: never sends heartbeats
    conn = Connection(left, "silent peer", timeout=0.5, keys=KEYS)
    try:
        started = time.monotonic()
        with pytest.raises(PantheonError, match="silent peer sent nothing .* for 0.5s"):
            conn.recv()
        assert time.monotonic() - started < 2
    finally:
        conn.close()
        silent.close()
