"""The test suite's own teacher-server starter (tests/support/teacher.TeacherServer) against a port taken between
drawing it and the server binding it: what another run of the suite beside this one, or any process's outgoing
connection, can do. A port the starter drew is drawn again; a port the test named is the test's error."""
from __future__ import annotations

import socket

import numpy as np  # noqa: F401,I001  (numpy before paddle)
import pytest

from tests.support.teacher import TeacherServer, grpc_health


def _squat(port: int) -> socket.socket:
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("0.0.0.0", port))
    squatter.listen()
    return squatter


def test_a_drawn_port_taken_before_the_server_binds_it_is_drawn_again(teacher_model):
    server = TeacherServer(teacher_model.server_dir, http=True)
    taken = server.port
    with _squat(taken):
        with server:
            assert server.port != taken
            assert server.args[server.args.index("--port") + 1] == str(server.port)
            assert grpc_health(server.endpoint) == "SERVING"
            assert f"cannot bind gRPC port 127.0.0.1:{taken}" in server.log()


def test_a_port_the_test_named_that_is_taken_fails_the_start_with_the_servers_words(teacher_model):
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("0.0.0.0", 0))
    port = probe.getsockname()[1]
    probe.listen()
    with probe:
        server = TeacherServer(teacher_model.server_dir, port=port)
        with pytest.raises(AssertionError, match=f"cannot bind gRPC port 127.0.0.1:{port}"):
            server.start()
        server.stop()
        assert server.port == port
