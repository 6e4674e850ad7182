"""distill_reader.client against our teacher server (raw fast path) and against stand-ins for real Paddle
Serving (no health service: typed fields)."""
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest

from distill_base.proto import general_model_service_pb2 as pb
from distill_base.proto import general_model_service_pb2_grpc as pb_grpc
from distill_base.serving_config import ConfigError
from distill_base.tensor_codec import decode_tensor, encode_tensor, is_raw
from distill_reader import channel_options
from distill_reader.client import TeacherAnswerError, TeacherClient, TeacherUnavailable
from distill_reader.feeds import FeedError
from tests.support.procs import free_port
from tests.support.teacher import mnist_like_images, reference_predict


class TypedOnlyTeacher:
    """Stand-in for a real Paddle Serving 0.9 server: only GeneralModelService, no health service, typed fields
    only (a float32 tensor sent in tensor_content is refused, as real Paddle Serving would not read it). It
    answers with the local Paddle Inference predictor. Real Paddle Serving cannot be installed on Python 3.11."""

    def __init__(self, server_dir: str, slow_s: float = 0.0):
        self.server_dir = server_dir
        self.slow_s = slow_s
        self.requests = []

    def answer(self, request: pb.Request) -> pb.Response:
        self.requests.append(request)
        time.sleep(self.slow_s)
        tensor = request.tensor[0]
        if is_raw(tensor):
            return pb.Response(err_no=-1, err_msg="float32 tensor without float_data")
        out = reference_predict(self.server_dir, decode_tensor(tensor))
        response = pb.Response(log_id=request.log_id)
        response.outputs.add(engine_name="general_infer_0").tensor.append(
            encode_tensor(out, name="save_infer_model/scale_0.tmp_0", alias_name="prediction", raw=False))
        return response


@pytest.fixture
def typed_grpc_teacher(teacher_model):
    teacher = TypedOnlyTeacher(teacher_model.server_dir)

    class Servicer(pb_grpc.GeneralModelServiceServicer):
        def inference(self, request, context):
            return teacher.answer(request)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GeneralModelServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield teacher, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@pytest.fixture
def typed_http_teacher(teacher_model):
    teacher = TypedOnlyTeacher(teacher_model.server_dir)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            request = pb.Request.FromString(self.rfile.read(int(self.headers["Content-Length"])))
            body = teacher.answer(request).SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/proto")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - no /health on real Paddle Serving
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield teacher, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_auto_wire_is_raw_against_our_server(teacher_server, teacher_model):
    for protocol, endpoint in (("grpc", teacher_server.endpoint), ("http", teacher_server.http_endpoint)):
        with TeacherClient(endpoint, teacher_model.client_conf, protocol=protocol) as client:
            images = mnist_like_images(5, seed=21)
            out = client.predict({"img": images})
            np.testing.assert_allclose(out["prediction"], reference_predict(teacher_model.server_dir, images),
                                       atol=1e-5)
            assert client._wire_is_raw() is True
            assert client.health() is True
            request = client.build_request({"img": images}, ["prediction"], 5)
            assert is_raw(request.tensor[0])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_auto_wire_falls_back_to_typed(request, teacher_model, protocol):
    teacher, endpoint = request.getfixturevalue(f"typed_{protocol}_teacher")
    with TeacherClient(endpoint, teacher_model.client_conf, protocol=protocol) as client:
        for batch in (1, 32):
            images = mnist_like_images(batch, seed=batch + 40)
            out = client.predict({"img": images})
            np.testing.assert_allclose(out["prediction"], reference_predict(teacher_model.server_dir, images),
                                       atol=1e-5)
        assert client._wire_is_raw() is False
    assert len(teacher.requests) == 2 and all(not is_raw(r.tensor[0]) for r in teacher.requests)
    assert list(teacher.requests[1].tensor[0].shape) == [32, 1, 28, 28]


def test_errors_name_the_endpoint(teacher_model, typed_grpc_teacher):
    closed = f"127.0.0.1:{free_port()}"
    for protocol in ("grpc", "http"):
        with TeacherClient(closed, teacher_model.client_conf, protocol=protocol, wire="raw", timeout=2) as client:
            with pytest.raises(TeacherUnavailable, match=closed) as info:
                client.predict({"img": mnist_like_images(1)})
            assert info.value.endpoint == closed
            assert client.health(timeout=0.5) is False
    teacher, endpoint = typed_grpc_teacher
    with TeacherClient(endpoint, teacher_model.client_conf, wire="raw") as client:
        with pytest.raises(TeacherAnswerError, match=rf"teacher {endpoint}: err_no -1 \(broken\): float32 tensor"):
            client.predict({"img": mnist_like_images(1)})
    teacher.slow_s = 1.0
    with TeacherClient(endpoint, teacher_model.client_conf, wire="typed", timeout=0.2) as client:
        with pytest.raises(TeacherUnavailable, match="DEADLINE_EXCEEDED"):
            client.predict({"img": mnist_like_images(1)})


def test_feed_errors_before_sending(teacher_server, teacher_model):
    with TeacherClient(teacher_server.endpoint, teacher_model.client_conf) as client:
        with pytest.raises(FeedError, match=r"feed 'img'.*\[1, 28, 28\] per sample"):
            client.predict({"img": np.zeros((2, 27, 28), "float32")})
        with pytest.raises(FeedError, match="missing feed"):
            client.predict({}, batch_size=1)
        with pytest.raises(FeedError, match=r"missing feed\(s\) \['img'\]"):  # not "cannot tell the batch size"
            client.predict({})
        with pytest.raises(FeedError, match=r"batch of 784 .*without its batch dimension: give it shape "
                                            r"\[1, 1, 28, 28\]"):
            client.predict({"img": np.zeros(784, "float32")})
        with pytest.raises(ConfigError, match="unknown fetch 'logits'"):
            client.predict({"img": mnist_like_images(1)}, fetch=["logits"])
        flat = mnist_like_images(2).reshape(2, 784)  # same elements per sample: reshaped by the client
        np.testing.assert_allclose(client.predict({"img": flat})["prediction"],
                                   reference_predict(teacher_model.server_dir, mnist_like_images(2)), atol=1e-5)


def test_not_serving_at_first_contact_is_unavailable_then_probed_again(teacher_model):
    """A draining or starting server (health NOT_SERVING) is retried later; the wire form is not guessed from it."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        with TeacherClient(f"127.0.0.1:{port}", teacher_model.client_conf) as client:
            with pytest.raises(TeacherUnavailable, match=rf"teacher 127.0.0.1:{port}: .*NOT_SERVING"):
                client.predict({"img": mnist_like_images(1)})
            assert client.health() is False
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            assert client._wire_is_raw() is True and client.health() is True
    finally:
        server.stop(0)


def test_public_names_are_exported_from_the_package():
    import distill_reader
    from distill_base import client_security, serving_config
    from distill_reader import client, feeds
    from distill_reader import distill_reader as reader_module

    modules = (reader_module, client, feeds, client_security, serving_config)
    for name in distill_reader.__all__:
        if name != "__version__":
            assert any(getattr(m, name, None) is getattr(distill_reader, name) for m in modules), name
    assert distill_reader.TeacherClient is TeacherClient and distill_reader.FeedError is FeedError
    assert issubclass(distill_reader.TeacherTlsError, distill_reader.TeacherAuthError)


def test_our_server_gets_keepalive_pings(teacher_model, teacher_server):
    with TeacherClient(teacher_server.endpoint, teacher_model.client_conf, keepalive_time=1.0) as client:
        client.predict({"img": mnist_like_images(2)})
        assert client.keepalive_active is True
    with TeacherClient(teacher_server.endpoint, teacher_model.client_conf, keepalive_time=0) as client:
        client.predict({"img": mnist_like_images(2)})
        assert client.keepalive_active is False


def _connectivity(channel) -> grpc.ChannelConnectivity:
    """``channel``'s state now, without asking it to connect."""
    seen, told = [], threading.Event()

    def on_state(state):
        seen.append(state)
        told.set()

    channel.subscribe(on_state, try_to_connect=False)
    try:
        assert told.wait(5.0), "grpc never told the channel's state"
    finally:
        channel.unsubscribe(on_state)
    return seen[0]


@pytest.mark.parametrize("server", ["ours", "typed"])
def test_connect_makes_the_connection_a_request_would_and_ready_to_send_says_when_it_is_made(
        request, teacher_model, teacher_server, server):
    """``connect()`` does before a request what ``predict`` would do first (the first health check; a channel with
    pings for a teachers.serve, connected: its TCP and HTTP/2 handshakes made while the check ran, not in the
    first request's time), so that a caller timing requests (the reader's workers) does not count it; afterwards
    ``ready_to_send()`` is True and a request makes no new channel. A server without pings (typed, not ours) is
    ready once its wire form is known, and the channel with pings opened beside its check is closed unused."""
    endpoint = teacher_server.endpoint if server == "ours" else request.getfixturevalue("typed_grpc_teacher")[1]
    with TeacherClient(endpoint, teacher_model.client_conf, keepalive_time=1.0) as client:
        assert client.ready_to_send() is False
        client.connect()
        assert client.ready_to_send() is True
        assert client.keepalive_active is (server == "ours")
        channel = client._channel
        assert _connectivity(channel) is grpc.ChannelConnectivity.READY, "connected before the first request"
        assert client._early is None
        images = mnist_like_images(3, seed=8)
        np.testing.assert_allclose(client.predict({"img": images})["prediction"],
                                   reference_predict(teacher_model.server_dir, images), atol=1e-5)
        assert client._channel is channel and client.ready_to_send(), "no new connection for the request"
        client.connect()
        assert client._channel is channel, "a second connect() does nothing"


def test_a_new_client_of_a_frozen_teacher_says_its_first_health_check_went_unanswered(teacher_model):
    """A frozen server's kernel still accepts the connection, so a new client's first health check (wire form,
    keepalive) is what times out: the error says so, instead of a bare "gRPC DEADLINE_EXCEEDED" that reads like a
    slow prediction (seen in a reader test's retries when a worker first met a teacher frozen with SIGSTOP)."""
    import os
    import signal

    from tests.support.teacher import TeacherServer

    with TeacherServer(teacher_model.server_dir) as server:
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with TeacherClient(server.endpoint, teacher_model.client_conf, timeout=1.0) as client:
                started = time.monotonic()
                with pytest.raises(TeacherUnavailable,
                                   match="no answer to the first health check on a new connection within 1s"):
                    client.predict({"img": np.zeros((2, 1, 28, 28), np.float32)})
                assert time.monotonic() - started < 3.0
        finally:
            os.kill(server.pid, signal.SIGCONT)


def test_a_link_whose_round_trip_moved_gets_a_new_connection_once_that_is_connected(teacher_model, monkeypatch):
    """Two link probes that read a round trip of 300 ms where the connection was made at ~0: a new TCP connection
    (TCP's congestion state fits the old link: BBR held a 1.5 s link at 0.6 answers/s on its old connection), to
    any server, not only a teachers.serve with keepalive; requests keep being answered meanwhile, and a further
    probe at the same round trip makes no other. The handshakes the probes time are what is not under test."""
    teacher = TypedOnlyTeacher(teacher_model.server_dir)
    peers = []

    class Servicer(pb_grpc.GeneralModelServiceServicer):
        def inference(self, request, context):
            peers.append(context.peer())   # "ipv4:127.0.0.1:<the client's port>": one per TCP connection
            return teacher.answer(request)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GeneralModelServiceServicer_to_server(Servicer(), server)
    endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    images = mnist_like_images(2)
    try:
        with TeacherClient(endpoint, teacher_model.client_conf) as client:
            client.predict({"img": images})
            first = peers[-1]
            monkeypatch.setattr(channel_options, "_time_handshake", lambda endpoint, timeout: 0.3)
            assert client.network_round_trip(1.0, handshakes=3) == 0.3
            client.predict({"img": images})
            assert peers[-1] == first, "one probe alone (a retransmitted SYN) is no link change"
            assert client.network_round_trip(1.0, handshakes=3) == 0.3
            deadline = time.monotonic() + 10.0
            while peers[-1] == first and time.monotonic() < deadline:
                np.testing.assert_allclose(client.predict({"img": images})["prediction"],
                                           reference_predict(teacher_model.server_dir, images), rtol=1e-5)
            assert peers[-1] != first, "no new connection for the longer link"
            second = peers[-1]
            assert client.network_round_trip(1.0, handshakes=3) == 0.3
            for _ in range(5):
                client.predict({"img": images})
            time.sleep(0.5)
            client.predict({"img": images})
            assert peers[-1] == second, "a probe at the same round trip made another connection"
    finally:
        server.stop(0).wait()


def test_round_trips_measured_while_the_first_connection_is_made_do_not_replace_it(teacher_model, teacher_server,
                                                                                  monkeypatch):
    """A worker's first connection is made after the round trip is timed, so it fits the link; a link probe's
    round trip that comes meanwhile (the reader probes a teacher as soon as requests are out, and tells every
    worker) must not replace it with a connection "for the longer link" against the channel made at construction
    (for no round trip): 1.5 s from the start both workers made a third connection per teacher that way, without
    pings, which then replaced the one with pings (issue 25's bench, --far_from_start)."""
    monkeypatch.setattr(channel_options, "_round_trips", {})   # this test's own measurements
    with TeacherClient(teacher_server.endpoint, teacher_model.client_conf, keepalive_time=1.0) as client:
        for _ in range(3):
            client.round_trip_measured(0.3)   # another worker's probes: the link is 300 ms long
        assert client._pending is None, "a new connection before the first one was made"
        client.connect()
        assert client.keepalive_active and client._channel_round_trip == pytest.approx(0.3)
        channel = client._channel
        client.round_trip_measured(0.3)
        images = mnist_like_images(2)
        np.testing.assert_allclose(client.predict({"img": images})["prediction"],
                                   reference_predict(teacher_model.server_dir, images), rtol=1e-5)
        assert client._pending is None and client._channel is channel and client.keepalive_active


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_teachers_own_time_per_request_comes_back_when_asked(request, teacher_model, protocol):
    """Paddle Serving's ``profile_server`` / ``profile_time``: asked for it (``timing``), teachers.serve answers with
    its own timestamps, so the student can tell what a request spent at the teacher from what it spent on the link;
    a server that sends none (real Paddle Serving without it, this stand-in) gives None, and the answer is the same."""
    images = mnist_like_images(4)
    expected = reference_predict(teacher_model.server_dir, images)
    server = request.getfixturevalue("teacher_server")
    endpoint = server.endpoint if protocol == "grpc" else server.http_endpoint
    with TeacherClient(endpoint, teacher_model.client_conf, protocol=protocol) as client:
        client.predict({"img": images})
        timing: dict = {}
        started = time.monotonic()
        out = client.predict({"img": images}, timing=timing)
        latency = time.monotonic() - started
        np.testing.assert_allclose(out["prediction"], expected, rtol=1e-5)
        assert 0.0 <= timing["server_seconds"] <= latency, (timing, latency)
    if protocol == "grpc":
        _, endpoint = request.getfixturevalue("typed_grpc_teacher")
        with TeacherClient(endpoint, teacher_model.client_conf) as client:
            timing = {}
            np.testing.assert_allclose(client.predict({"img": images}, timing=timing)["prediction"], expected,
                                       rtol=1e-5)
            assert timing == {"server_seconds": None}
