"""distill_base.wire_size (issue 26): the decoded size of a request read from its wire bytes, before protobuf
parses it, matches what protobuf parses; a request whose typed values would take more than
max(body + 64 KiB, 16 MiB) once decoded is refused with err_no 5000 naming the feed, on gRPC and HTTP, by a real
teacher server; valid MNIST requests pass."""
import grpc
import numpy as np
import pytest
import requests
from google.protobuf.message import DecodeError

from distill_base.proto import general_model_service_pb2 as pb
from distill_base.tensor_codec import encode_tensor
from distill_base.wire_size import (
    DEFAULT_ALLOWANCE,
    MAX_FIELDS,
    STRING_OVERHEAD,
    TENSOR_OVERHEAD,
    DecodedSizeError,
    WireFormatError,
    check_decoded_size,
    decoded_sizes,
)
from teachers.grpc_front import read_request
from tests.support.teacher import TeacherServer, mnist_like_images

SERVICE = "baidu.paddle_serving.predictor.general_model.GeneralModelService"
HTTP_PATH = "/GeneralModelService/inference"


def _request(array, name="img", raw=False, fetch=("prediction",)) -> pb.Request:
    request = pb.Request(fetch_var_names=list(fetch))
    encode_tensor(np.asarray(array), name, alias_name=name, raw=raw, out=request.tensor.add())
    return request


def _fetch_bytes(fetch=("prediction",)) -> int:
    return sum(len(name) + STRING_OVERHEAD for name in fetch)


@pytest.mark.parametrize("array,width", [
    (np.zeros((3, 5), np.int64), 8), (np.full((2, 7), 1 << 40, np.int64), 8), (np.arange(-4, 4, dtype=np.int32), 4),
    (np.ones((4, 3), bool), 1), (np.ones((2, 3), np.float32), 4), (np.ones(5, np.float64), 8),
    (np.ones(3, np.complex64), 8), (np.ones(2, np.complex128), 16)])
def test_decoded_size_is_what_protobuf_decodes(array, width):
    request = _request(array, name="feed_a")
    [tensor, fetch] = decoded_sizes(request.SerializeToString(), "request")
    shape_values = array.ndim
    per_value = 2 if array.dtype.kind == "c" else 1
    assert tensor.name == "feed_a" and tensor.values == array.size * per_value + shape_values
    assert tensor.decoded == TENSOR_OVERHEAD + array.size * width + 4 * shape_values
    assert (fetch.name, fetch.decoded) == ("fetch_var_names", _fetch_bytes())


def test_unpacked_values_strings_and_responses_are_counted():
    tensor = pb.Tensor(name="s", data=[b"ab", b""], shape=[2])
    # int64_data unpacked: tag 0x08 + one varint per value (proto3 parsers accept both forms)
    body = pb.Request(tensor=[tensor]).SerializeToString()
    unpacked = b"".join(b"\x08" + bytes([v]) for v in range(5))
    body = b"\x0a" + bytes([len(tensor.SerializeToString()) + len(unpacked)]) + tensor.SerializeToString() + unpacked
    parsed = pb.Request.FromString(body)
    assert list(parsed.tensor[0].int64_data) == [0, 1, 2, 3, 4]
    [sizes] = decoded_sizes(body, "request")
    assert sizes.values == 2 + 1 + 5
    assert sizes.decoded == TENSOR_OVERHEAD + (2 + STRING_OVERHEAD) + STRING_OVERHEAD + 4 + 5 * 8
    response = pb.Response(err_no=0, profile_time=[1, 2, 3])
    response.outputs.add().tensor.append(encode_tensor(np.zeros((2, 3), np.int64), "prob", raw=False))
    [answer, profile, outputs] = decoded_sizes(response.SerializeToString(), "response")
    assert (answer.name, answer.values, answer.decoded) == ("prob", 8, TENSOR_OVERHEAD + 6 * 8 + 2 * 4)
    assert (profile.name, profile.values, profile.decoded) == ("profile_time", 3, 24)
    assert (outputs.name, outputs.values, outputs.decoded) == ("outputs", 1, TENSOR_OVERHEAD)


def test_a_long_unpacked_run_is_bounded_not_walked():
    body = b"".join(b"\x08\x01" for _ in range(MAX_FIELDS + 1000))
    body = b"\x0a" + _varint(len(body)) + body
    [sizes] = decoded_sizes(body, "request")
    actual = TENSOR_OVERHEAD + (MAX_FIELDS + 1000) * 8
    assert sizes.bounded and sizes.decoded >= actual
    assert len(pb.Request.FromString(body).tensor[0].int64_data) == MAX_FIELDS + 1000


def test_many_tiny_tensors_or_unknown_fields_are_bounded_quickly_and_refused():
    """Half a million empty tensors (1 MB; 128 MB for protobuf's messages) or unknown fields: the walk stops after
    MAX_FIELDS fields and bounds the rest (the whole walk used to take seconds); fetch names are walked (the
    handler loops over them itself), so a request naming one fetch 100000 times still passes."""
    import time

    for body in (b"\x0a\x00" * 500_000, b"\x28\x01" * 500_000):
        start = time.perf_counter()
        sizes = decoded_sizes(body, "request")
        assert time.perf_counter() - start < 1.0
        assert sizes[-1].bounded and sum(t.decoded for t in sizes) > DEFAULT_ALLOWANCE
        with pytest.raises(DecodedSizeError):
            check_decoded_size(body)
    names = pb.Request(fetch_var_names=["prediction"] * 100_000).SerializeToString()
    assert check_decoded_size(names) == 100_000 * (len("prediction") + STRING_OVERHEAD)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def test_small_int_request_over_the_bound_is_refused_naming_the_feed_mnist_passes():
    over = _request(np.zeros((DEFAULT_ALLOWANCE // 8 + 1000, 1), np.int64), name="ids").SerializeToString()
    with pytest.raises(DecodedSizeError, match=r"feed 'ids': 2098154 values take \d+ bytes once decoded .* over "
                                               r"the bound of 16777216 bytes for a body of \d+ bytes"):
        read_request(over)
    for raw in (True, False):   # MNIST: batch 32 of 784 floats, both wire forms; small bodies are not walked
        body = _request(mnist_like_images(32), raw=raw).SerializeToString()
        assert check_decoded_size(body) == -1 and len(read_request(body).tensor) == 1
        assert check_decoded_size(body, allowance=1) > 0
    # large float bodies pass at any size: they decode to their own size
    big = _request(np.zeros((5_000_000,), np.float32)).SerializeToString()
    assert check_decoded_size(big) > DEFAULT_ALLOWANCE


def test_malformed_wire_is_a_wire_format_error():
    for body in (b"\x0a\x05\x08", b"\x0f", b"\x0a\x02\x0b\x00", b"\x0a\x01\xff"):
        with pytest.raises(WireFormatError):
            decoded_sizes(body * 1, "request")
        with pytest.raises(DecodeError):
            pb.Request.FromString(body)


def test_real_server_refuses_on_grpc_and_http_with_err_no_5000(teacher_model):
    """A real teacher server (subprocess, Paddle Inference): grpc and HTTP clients get the documented error for a
    2.1 MB body of 1-byte int64 varints (16.8 MB once decoded); MNIST requests pass on both."""
    over = _request(np.zeros((DEFAULT_ALLOWANCE // 8 + 1000, 1), np.int64)).SerializeToString()
    good = _request(mnist_like_images(32), raw=False).SerializeToString()
    with TeacherServer(teacher_model.server_dir, http=True, thread=1) as server:
        with grpc.insecure_channel(server.endpoint, options=[("grpc.max_send_message_length", 1 << 30)]) as channel:
            call = channel.unary_unary(f"/{SERVICE}/inference", request_serializer=None,
                                       response_deserializer=pb.Response.FromString)
            refused = call(over, timeout=60)
            assert refused.err_no == 5000 and "feed 'img'" in refused.err_msg, refused.err_msg
            assert "once decoded" in refused.err_msg and "over the bound of 16777216 bytes" in refused.err_msg
            assert call(good, timeout=60).err_no == 0
        url = f"http://{server.http_endpoint}{HTTP_PATH}"
        answer = requests.post(url, data=over, headers={"Content-Type": "application/proto"}, timeout=60)
        assert answer.status_code == 400
        response = pb.Response.FromString(answer.content)
        assert response.err_no == 5000 and "feed 'img'" in response.err_msg and "once decoded" in response.err_msg
        ok = requests.post(url, data=good, headers={"Content-Type": "application/proto"}, timeout=60)
        assert ok.status_code == 200 and pb.Response.FromString(ok.content).err_no == 0


class _AnsweringTeacher:
    """A gRPC server (grpcio, in process) and an HTTP server (http.server, a thread) that answer every inference
    request with the same serialized Response bytes: a teacher as hostile as it likes."""

    def __init__(self, answer: bytes):
        import http.server
        import threading
        from concurrent import futures

        self._grpc = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_send_message_length", 1 << 30)])
        handler = grpc.unary_unary_rpc_method_handler(lambda body, context: answer)
        self._grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"inference": handler}),))
        self.grpc_endpoint = f"127.0.0.1:{self._grpc.add_insecure_port('127.0.0.1:0')}"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):   # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/proto")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_endpoint = f"127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self):
        self._grpc.start()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(10)


def test_client_refuses_an_answer_over_the_bound_before_parsing_it():
    """A teacher's answer of 2.1 MB of 1-byte int64 varints (16.8 MB once decoded): TeacherAnswerError naming the
    fetch, on gRPC and HTTP, before protobuf parses it; a normal answer still decodes."""
    from distill_base.serving_config import ServingConfig, VarSpec
    from distill_reader.client import TeacherAnswerError, TeacherClient

    config = ServingConfig(feeds=(VarSpec("x", "x", 1, (3,)),), fetches=(VarSpec("ids", "ids", 0, (-1,)),))
    big = pb.Response(err_no=0)
    big.outputs.add().tensor.append(encode_tensor(np.zeros((2, DEFAULT_ALLOWANCE // 16 + 1000), np.int64), "ids",
                                                  raw=False))
    small = pb.Response(err_no=0)
    small.outputs.add().tensor.append(encode_tensor(np.arange(6, dtype=np.int64).reshape(2, 3), "ids", raw=False))
    for answer, refused in ((big.SerializeToString(), True), (small.SerializeToString(), False)):
        with _AnsweringTeacher(answer) as teacher:
            for protocol, endpoint in (("grpc", teacher.grpc_endpoint), ("http", teacher.http_endpoint)):
                with TeacherClient(endpoint, config, protocol=protocol, wire="raw", timeout=30) as client:
                    if refused:
                        with pytest.raises(TeacherAnswerError, match=r"answer of \d+ bytes refused: fetch 'ids': "
                                                                     r"\d+ values take \d+ bytes once decoded"):
                            client.predict({"x": np.zeros((2, 3), np.float32)})
                    else:
                        out = client.predict({"x": np.zeros((2, 3), np.float32)})
                        np.testing.assert_array_equal(out["ids"], np.arange(6).reshape(2, 3))


def test_allowance_follows_a_small_body_limit():
    """16 MiB, or 3x --max_body_size when that is less: a server with small bodies refuses amplifying ones early."""
    from teachers.grpc_front import decoded_allowance

    assert decoded_allowance(128 << 20) == DEFAULT_ALLOWANCE and decoded_allowance(20000) == 60000
    assert decoded_allowance(20000, 5) == 5
    body = _request(np.zeros((10000, 1), np.int64), name="ids").SerializeToString()   # 10 kB, 80 kB decoded
    assert len(read_request(body, decoded_allowance(128 << 20)).tensor[0].int64_data) == 10000
    with pytest.raises(DecodedSizeError, match="feed 'ids'"):
        read_request(body, decoded_allowance(20000))
