"""Objects that hold a connection, used in a child after ``os.fork()`` and in the parent at the same time: each
process gets its own connection (never a shared socket), so no process receives another's answers.

Real forks, a real teacher (gRPC and HTTP), a real ZooKeeper and a real Pantheon connection.
"""
from __future__ import annotations

import json
import os
import traceback

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest

from distill_reader.client import TeacherClient
from tests.support.teacher import mnist_like_images, reference_predict

CHILDREN, CALLS = 3, 40


def _calls(client, images, expected, calls):
    """(foreign answers, error texts) of ``calls`` predictions of ``images`` (a different batch each call)."""
    foreign, errors = 0, []
    for k in range(calls):
        index = k % len(images)
        try:
            out = client.predict({"img": images[index:index + 1]}, fetch=["prediction"])["prediction"]
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        foreign += not np.allclose(out[0], expected[index], rtol=1e-5, atol=1e-6)
    return foreign, errors


def _fork_children(run_in_child, count):
    """Fork ``count`` children; each runs ``run_in_child(i)`` -> JSON-able result, sent back through a pipe."""
    children = []
    for i in range(count):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: never returns into pytest
            code = 0
            try:
                os.close(read_fd)
                payload = json.dumps(run_in_child(i)).encode()
            except BaseException:  # noqa: BLE001
                payload, code = json.dumps({"crash": traceback.format_exc()}).encode(), 1
            try:
                os.write(write_fd, payload)
            finally:
                os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd))
    return children


def _collect(children, timeout=120):
    results = []
    for pid, read_fd in children:
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        result = json.loads(data or b'{"crash": "no answer"}')
        assert "crash" not in result, result["crash"]
        assert os.waitstatus_to_exitcode(status) == 0
        results.append(result)
    return results


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_teacher_client_used_before_and_after_fork(teacher_model, teacher_server, protocol):
    endpoint = teacher_server.endpoint if protocol == "grpc" else teacher_server.http_endpoint
    sets = [mnist_like_images(8, seed=100 + i) for i in range(CHILDREN + 1)]
    expected = [reference_predict(teacher_model.server_dir, images) for images in sets]
    with TeacherClient(endpoint, teacher_model.client_conf, protocol=protocol, timeout=20) as client:
        assert _calls(client, sets[0], expected[0], 4) == (0, [])   # the connection is open before the fork

        def child(i):
            foreign, errors = _calls(client, sets[i + 1], expected[i + 1], CALLS)
            return {"foreign": foreign, "errors": errors}

        children = _fork_children(child, CHILDREN)
        parent_foreign, parent_errors = _calls(client, sets[0], expected[0], CALLS)
        results = _collect(children)
    assert (parent_foreign, parent_errors) == (0, [])
    assert [(r["foreign"], r["errors"]) for r in results] == [(0, [])] * CHILDREN


def test_pantheon_connection_in_a_forked_child_raises_and_leaves_the_parent_alone():
    """A Pantheon connection (real TCP, authenticated) used in a forked child: ForkedConnectionError for send and
    recv; the child's close() does not shut the parent's connection down, which keeps working both ways."""
    import threading

    from distill_reader.pantheon import ForkedConnectionError
    from distill_reader.pantheon.transport import Listener, connect

    token = b"fork-test-token"
    listener = Listener("127.0.0.1", 0, token=token)
    got: dict = {}
    thread = threading.Thread(target=lambda: got.update(conn=listener.accept(timeout=20)))
    thread.start()
    student = connect(f"127.0.0.1:{listener.address[1]}", token, 10)
    thread.join(30)
    listener.close()
    teacher = got["conn"]
    try:
        teacher.send("knowledge", np.arange(3, dtype=np.float32))
        assert student.recv()[0] == "knowledge"

        def child(_):
            raised = []
            for use in (lambda: student.send("message", "from the child"), student.recv):
                try:
                    use()
                    raised.append(None)
                except ForkedConnectionError as exc:
                    raised.append(str(exc))
            student.close()
            return {"raised": raised}

        result, = _collect(_fork_children(child, 1))
        assert all(text and "forked child" in text for text in result["raised"]), result
        teacher.send("knowledge", np.arange(4, dtype=np.float32))   # the parent's connection still works
        kind, value, _ = student.recv()
        assert kind == "knowledge"
        np.testing.assert_array_equal(value, np.arange(4, dtype=np.float32))
        student.send("message", "from the parent")
        assert teacher.recv()[:2] == ("message", "from the parent")
    finally:
        student.close()
        teacher.close()


def test_reader_closed_in_a_forked_child_leaves_the_parents_zookeeper_session(teacher_model, zookeeper, zk_root):
    """A DistillReader with teachers from ZooKeeper, closed in a forked child (a child that exits normally does so
    at exit): the child returns at once and never touches the parent's ZooKeeper session, whose student node stays
    registered and whose session stays the same."""
    import time

    from kazoo.client import KazooClient

    from distill_reader import DistillReader
    from tests.support.procs import wait_for

    dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
    dr.set_serving_conf_file(teacher_model.client_conf)
    dr.set_dynamic_teacher(zookeeper.hosts, "fork_service", root=zk_root, session_timeout=4.0)
    subscription = dr._resources.subscription
    try:
        wait_for(lambda: subscription.connected and subscription.node.path is not None, 30, "student registered")
        session_id, node = subscription.session.session_id, subscription.node.path

        def child(_):
            started = time.monotonic()
            dr.close()
            return {"seconds": time.monotonic() - started}

        result, = _collect(_fork_children(child, 1))
        assert result["seconds"] < 1.0, result
        time.sleep(1.0)
        assert subscription.connected and subscription.session.session_id == session_id
        checker = KazooClient(hosts=zookeeper.hosts)
        checker.start(timeout=15)
        try:
            assert checker.exists(node) is not None, f"the parent's student node {node} was removed"
        finally:
            checker.stop()
            checker.close()
    finally:
        dr.close()
