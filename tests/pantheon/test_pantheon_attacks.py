"""Pantheon online mode under attack (issue 15): each attack with real sockets or processes.

- silent TCP connections (no token) must not keep the real student out;
- an authenticated peer declaring a huge frame must not make the other side allocate it;
- a malformed frame must end the connection with ProtocolError in the waiting recv(), within its timeout;
- frames changed in flight (no token needed) are refused by the per-frame MAC.
"""
from __future__ import annotations

import socket
import struct
import subprocess
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest

from distill_reader.pantheon import PantheonError, ProtocolError, Student, Teacher, transport
from distill_reader.pantheon.transport import ConnectionLost, Listener, connect
from tests.support.procs import ProcessGuard, free_port, wait_for

TOKEN = "attack-tests-token"

# A teacher that only sends one message to its student, then says goodbye (no paddle needed).
GREETING_TEACHER = textwrap.dedent("""
    import sys
    from distill_reader.pantheon import Teacher

    teacher = Teacher(out_port=int(sys.argv[1]), out_host="127.0.0.1", timeout=40)
    teacher.start()
    teacher.send({"hello": "student"})
    print("sent", flush=True)
    teacher.recv()
""")


@pytest.fixture(autouse=True)
def no_processes_left(tmp_path):
    """After every test: no script it started from its own folder is still running."""
    yield
    result = subprocess.run(["pgrep", "-f", str(tmp_path) + r"/[^ ]*\.py"], capture_output=True, text=True)
    assert result.stdout.strip() == "", f"processes left running by the test: {result.stdout.split()}"


@pytest.mark.timeout(90)
def test_silent_connections_do_not_keep_the_student_out(tmp_path):
    """Attack: silent TCP connections (no token) before the student. Before: two were enough, the teacher served one
    handshake at a time (up to 10 s each) and the student timed out. Now: handshakes run side by side with a short
    deadline; 40 silent ones (more than the 32 handshakes kept at once: the oldest are dropped) do not matter."""
    script = tmp_path / "greeting_teacher.py"
    script.write_text(GREETING_TEACHER)
    port = free_port()
    silent = []
    with ProcessGuard() as guard:
        teacher = guard.python(str(script), str(port), env={"DISTILL_PANTHEON_TOKEN": TOKEN},
                               stdout=open(tmp_path / "teacher.out", "w"))
        wait_for(lambda: _port_open(port), 30, "the teacher to listen")
        try:
            for _ in range(2 + transport.MAX_PENDING_HANDSHAKES + 6):
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            student = Student(token=TOKEN, timeout=6)
            started = time.monotonic()
            student.register_teacher(in_address=f"127.0.0.1:{port}")
            connected_after = time.monotonic() - started
            student.start()
            assert student.recv(0) == {"hello": "student"}
            student.send("thanks")
            student.close()
            assert connected_after < 3, connected_after
            assert teacher.wait(timeout=30) == 0
        finally:
            for sock in silent:
                sock.close()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class _Pair:
    """A real TCP connection: an authenticated teacher-side and student-side ``Connection``."""

    def __init__(self, timeout: float = 5.0, **options) -> None:
        listener = Listener("127.0.0.1", 0, token=TOKEN.encode(), **options)
        port = listener.address[1]
        got: dict = {}
        thread = threading.Thread(target=lambda: got.update(conn=listener.accept(timeout=20)))
        thread.start()
        self.student = connect(f"127.0.0.1:{port}", TOKEN.encode(), timeout, **options)
        thread.join(30)
        listener.close()
        self.teacher = got["conn"]

    def close(self) -> None:
        self.student.close()
        self.teacher.close()


def _recv_in_thread(conn, timeout: float):
    """``conn.recv()`` in a thread: (exception or value, seconds), or fails when it does not return in time."""
    out: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["value"] = conn.recv()
        except BaseException as exc:  # noqa: B036  (inspected by the test)
            out["value"] = exc
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"recv() did not return within {timeout}s"
    return out["value"], out["seconds"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attacker", ["student", "teacher"])
def test_a_huge_declared_frame_is_refused_before_allocating(attacker):
    """Attack: after authentication, a 12-byte prefix declaring 1 GiB. Before: the peer allocated 1 GiB at once."""
    pair = _Pair()
    sender, victim = (pair.student, pair.teacher) if attacker == "student" else (pair.teacher, pair.student)
    try:
        tracemalloc.start()
        sender._sock.sendall(struct.pack("!IQ", 2, 1 << 30) + b"{}")
        error, seconds = _recv_in_thread(victim, 10)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(error, ProtocolError), error
        assert "exceeds the limit" in str(error) and "max_frame_bytes" in str(error)
        assert peak < 16 << 20, peak
        assert victim.closed
    finally:
        tracemalloc.stop()
        pair.close()


@pytest.mark.timeout(60)
def test_memory_follows_the_bytes_that_arrive():
    """A frame declared at 48 MiB (under the limit) of which 100 bytes arrive costs about nothing."""
    pair = _Pair(max_frame_bytes=64 << 20)
    try:
        tracemalloc.start()
        pair.student._sock.sendall(struct.pack("!IQ", 2, 48 << 20) + b"{}" + b"\0" * 100)
        time.sleep(0.5)
        threading.Timer(1.0, pair.student.close).start()
        error, _ = _recv_in_thread(pair.teacher, 10)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(error, ConnectionLost), error
        assert peak < 8 << 20, peak
    finally:
        tracemalloc.stop()
        pair.close()


MALFORMED = {
    "not json": b"{not json",
    "not an object": b"[1, 2]",
    "no kind": b'{"v": null, "b": []}',
    "unknown tag": b'{"k": "data", "v": {"__evil__": 1}, "b": []}',
    "buffer index out of range": b'{"k": "data", "v": {"__nd__": [5, "<f4", [1]]}, "b": []}',
    "object dtype": b'{"k": "data", "v": {"__nd__": [0, "|O", [1]]}, "b": [8]}',
    "shape does not fit": b'{"k": "data", "v": {"__nd__": [0, "<f4", [3]]}, "b": [8]}',
    "negative length": b'{"k": "data", "v": null, "b": [-8, 16]}',
    "lengths not a list": b'{"k": "data", "v": null, "b": "x"}',
    "deep nesting": b'{"k": "data", "v": ' + b"[" * 100000 + b"]" * 100000 + b', "b": []}',
    "bad dict entries": b'{"k": "data", "v": {"__dict__": [[1]]}, "b": []}',
    "unhashable set item": b'{"k": "data", "v": {"__set__": [[1]]}, "b": []}',
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_end_the_connection_with_protocol_error(case):
    """Attack: a malformed frame from an authenticated peer. Before: some killed the reader thread (recv() then
    blocked forever). Now: ProtocolError in the waiting recv(), the connection closed."""
    header = MALFORMED[case]
    body = b"\0" * 8 if b'"b": [8]' in header else b""
    if b"[-8, 16]" in header:
        body = b"\0" * 8
    pair = _Pair(timeout=5)
    try:
        pair.teacher._send_frame(header, [memoryview(body)])
        error, seconds = _recv_in_thread(pair.student, 10)
        assert isinstance(error, ProtocolError), (case, error)
        assert seconds < 5
        assert pair.student.closed
    finally:
        pair.close()


@pytest.mark.timeout(120)
def test_student_recv_gets_protocol_error_from_a_malformed_frame():
    """The Student's reader thread turns a malformed frame into ProtocolError for the waiting ``Student.recv``."""
    listener = Listener("127.0.0.1", 0, token=TOKEN.encode())
    port = listener.address[1]
    got: dict = {}
    thread = threading.Thread(target=lambda: got.update(conn=listener.accept(timeout=20)))
    thread.start()
    student = Student(token=TOKEN, timeout=5)
    student.register_teacher(in_address=f"127.0.0.1:{port}")
    student.start()
    thread.join(30)
    listener.close()
    teacher = got["conn"]
    try:
        teacher._send_frame(MALFORMED["buffer index out of range"], [])
        out: dict = {}
        waiter = threading.Thread(target=lambda: out.update(error=_raises(lambda: student.recv(0))), daemon=True)
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "Student.recv() blocked after a malformed frame"
        assert isinstance(out["error"], ProtocolError), out["error"]
        assert "buffer 5" in str(out["error"])
    finally:
        student.close()
        teacher.close()


def _raises(call):
    try:
        call()
    except BaseException as exc:  # noqa: B036  (inspected by the test)
        return exc
    return None


@pytest.mark.timeout(60)
def test_a_frame_changed_in_flight_is_refused():
    """Frames carry an HMAC keyed from the handshake: a flipped bit (or a replayed frame) is a ProtocolError."""
    pair = _Pair()
    try:
        with pair.teacher._send_lock:  # no heartbeat in between: it would take the frame counter
            frame = pair.teacher._seal(transport.encode_frame("data", np.arange(4, dtype="float32")))
            raw = bytearray(b"".join(bytes(b) for b in frame))
            raw[-40] ^= 1  # inside the body
            pair.teacher._sock.sendall(bytes(raw))
        error, _ = _recv_in_thread(pair.student, 10)
        assert isinstance(error, ProtocolError) and "integrity" in str(error), error
    finally:
        pair.close()
    pair = _Pair()
    try:
        with pair.teacher._send_lock:
            frame = b"".join(bytes(b) for b in pair.teacher._seal(transport.encode_frame("data", 1)))
            pair.teacher._sock.sendall(frame + frame)  # the same frame twice: the second is a replay
        kind, value, _ = pair.student.recv()
        assert (kind, value) == ("data", 1)
        error, _ = _recv_in_thread(pair.student, 10)
        assert isinstance(error, ProtocolError) and "integrity" in str(error), error
    finally:
        pair.close()


def test_frame_limit_is_sized_from_the_knowledge_description():
    desc = {"logits": {"shape": [-1, 1000], "dtype": "float32", "lod_level": 0},
            "x": {"shape": [-1, 3, 32, 32], "dtype": "float32", "lod_level": 0}}
    per_sample = 4 * 1000 + 4 * 3 * 32 * 32
    limit = transport.frame_limit(desc)
    assert limit == max(transport.DEFAULT_MAX_FRAME, per_sample * transport.MAX_BATCH_SAMPLES + transport.FRAME_SLACK)
    assert transport.frame_limit(desc, max_frame_bytes=1 << 40) == 1 << 40
    assert transport.frame_limit({"v": {"shape": [-1, -1], "dtype": "float32"}}) == transport.DEFAULT_MAX_FRAME
    with pytest.raises(ValueError, match="max_frame_bytes"):
        transport.frame_limit(desc, max_frame_bytes=0)


def test_teacher_binds_the_address_it_is_given():
    for host in ("127.0.0.1", "0.0.0.0"):
        listener = Listener(host, 0, token=b"t")
        try:
            assert listener.address[0] == host
        finally:
            listener.close()
    teacher = Teacher(out_port=free_port(), out_host="127.0.0.1", token=TOKEN, timeout=0.5)
    with pytest.raises(PantheonError, match=r"no student connected to port \d+ within 0.5s"):
        teacher.start()
    assert Teacher(out_port=1234, token=TOKEN)._out_host == "0.0.0.0"  # all interfaces by default, as Pantheon


@pytest.mark.parametrize("meta", [{"pantheon": "x"}, {"pantheon": {"desc": "x"}},
                                  {"pantheon": {"desc": {"p": {"shape": "x", "dtype": "float32"}}}}])
def test_offline_knowledge_with_a_malformed_description_is_refused(tmp_path, meta):
    from distill_reader.knowledge import KnowledgeWriter

    with KnowledgeWriter(tmp_path / "k", {"p": ((2,), "float32")}, meta=meta) as writer:
        writer.append({"p": np.zeros((3, 2), "float32")})
    with pytest.raises(PantheonError, match="malformed Pantheon description"):
        Student().register_teacher(in_path=str(tmp_path / "k"))


@pytest.mark.timeout(90)
def test_teacher_names_the_malformed_frame_that_ended_its_pass(tmp_path):
    """A student's malformed frame mid-pass: the teacher's reader closes the connection and the serving loop fails
    with StudentDisconnected naming the ProtocolError (not a bare "connection closed")."""
    from tests.pantheon.test_pantheon_failures import SLOW_TEACHER

    script = tmp_path / "slow_teacher.py"
    script.write_text(SLOW_TEACHER)
    port = free_port()
    err = tmp_path / "teacher.err"
    with ProcessGuard() as guard, open(err, "w") as stderr:
        teacher = guard.python(str(script), str(port), env={"DISTILL_PANTHEON_TOKEN": TOKEN}, stderr=stderr)
        student = Student(token=TOKEN, timeout=30)
        student.register_teacher(in_address=f"127.0.0.1:{port}")
        student.start()
        generator = student.get_knowledge_generator(batch_size=10)()
        next(generator)
        student._teachers[0].conn._send_frame(b'{"k": 1}', [])
        assert teacher.wait(timeout=30) != 0
        student.close()
    text = err.read_text()
    assert "StudentDisconnected" in text and "not an object with a message kind" in text, text[-2000:]


BIG_BATCH_TEACHER = textwrap.dedent("""
    import sys
    import numpy as np
    import paddle
    from distill_reader.pantheon import Teacher

    paddle.enable_static()
    startup, program = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(program, startup):
        x = paddle.static.data(name="x", shape=[-1, 100000], dtype="float32")
    exe = paddle.static.Executor(paddle.CPUPlace())

    def batches():  # one batch of 170 samples x 100000 float32: 68 MB, more than the 64 MiB floor
        yield [np.arange(170, dtype="float32")[:, None] * np.ones((1, 100000), "float32")]

    teacher = Teacher(out_port=int(sys.argv[1]), out_host="127.0.0.1", timeout=40)
    teacher.start()
    teacher.start_knowledge_service(feed_list=[x], schema={"x": x}, program=program,
                                    reader_config={"batch_generator": batches}, exe=exe)
""")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("max_frame_bytes", [None, 32 << 20])
def test_knowledge_frames_are_sized_from_the_description(tmp_path, max_frame_bytes):
    """A 68 MB knowledge batch passes the description-sized limit (400 KB/sample x 4096 samples); a student that
    sets max_frame_bytes=32 MiB refuses it with a ProtocolError naming the option."""
    script = tmp_path / "big_batch_teacher.py"
    script.write_text(BIG_BATCH_TEACHER)
    port = free_port()
    with ProcessGuard() as guard:
        guard.python(str(script), str(port), env={"DISTILL_PANTHEON_TOKEN": TOKEN})
        student = Student(token=TOKEN, timeout=60, max_frame_bytes=max_frame_bytes)
        try:
            student.register_teacher(in_address=f"127.0.0.1:{port}")
            student.start()
            generator = student.get_knowledge_generator(batch_size=170)()
            if max_frame_bytes is None:
                (batch,) = list(generator)
                assert batch["x"].shape == (170, 100000) and batch["x"][169, 99999] == 169.0
            else:
                with pytest.raises(ProtocolError, match=r"exceeds the limit of 33554432 bytes .*max_frame_bytes"):
                    list(generator)
        finally:
            student.close()
