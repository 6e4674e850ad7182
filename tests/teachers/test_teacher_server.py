"""teachers.serve: real server processes on Paddle Inference, every transport and wire form, bad requests,
SIGTERM drain, flags and logs."""
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import requests
from google.protobuf import json_format

from distill_base.proto import general_model_service_pb2 as pb
from distill_base.serving_config import ServingConfig
from distill_base.tensor_codec import decode_tensor, encode_tensor
from distill_reader.client import TeacherClient, TeacherUnavailable
from teachers.export import save_model
from teachers.serve import IGNORED_SERVING_FLAGS, parse_args
from tests.support.procs import REPO_ROOT, free_port, port_is_open, wait_for
from tests.support.teacher import TeacherServer, grpc_health, mnist_like_images, reference_predict

SERVICE = "baidu.paddle_serving.predictor.general_model.GeneralModelService"
HTTP_PATH = "/GeneralModelService/inference"


def _raw_call(endpoint: str, body: bytes, timeout: float = 30):
    """Send ``body`` bytes as-is to the inference rpc; returns the Response."""
    with grpc.insecure_channel(endpoint, options=[("grpc.max_send_message_length", 1 << 30)]) as channel:
        call = channel.unary_unary(f"/{SERVICE}/inference", request_serializer=None,
                                   response_deserializer=pb.Response.FromString)
        return call(body, timeout=timeout)


def _request(images, raw=True, fetch=("prediction",), name="img", log_id=1) -> pb.Request:
    req = pb.Request(fetch_var_names=list(fetch), log_id=log_id)
    req.tensor.append(encode_tensor(np.asarray(images), name=name, alias_name=name, raw=raw))
    return req


# -- answers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol,http_format", [("grpc", "proto"), ("http", "proto"), ("http", "json")])
@pytest.mark.parametrize("wire", ["raw", "typed"])
def test_answers_match_local_predictor(teacher_server, teacher_model, protocol, http_format, wire):
    endpoint = teacher_server.endpoint if protocol == "grpc" else teacher_server.http_endpoint
    with TeacherClient(endpoint, teacher_model.client_conf, protocol=protocol, http_format=http_format,
                       wire=wire, compress=True) as client:
        for batch in (1, 32):
            images = mnist_like_images(batch, seed=batch)
            out = client.predict({"img": images})
            assert out["prediction"].shape == (batch, 10)
            np.testing.assert_allclose(out["prediction"], reference_predict(teacher_model.server_dir, images),
                                       atol=1e-5, rtol=0)


def test_eight_concurrent_clients(teacher_server, teacher_model):
    errors, checked = [], []

    def worker(i: int) -> None:
        protocol = ["grpc", "http"][i % 2]
        endpoint = teacher_server.endpoint if protocol == "grpc" else teacher_server.http_endpoint
        try:
            with TeacherClient(endpoint, teacher_model.client_conf, protocol=protocol) as client:
                for j in range(6):
                    images = mnist_like_images([1, 32, 5][j % 3], seed=100 * i + j)
                    got = client.predict({"img": images})["prediction"]
                    np.testing.assert_allclose(got, reference_predict(teacher_model.server_dir, images), atol=1e-5)
                    checked.append(len(images))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(checked) == 48


def test_answer_uses_the_request_wire_form(teacher_server):
    images = mnist_like_images(2)
    raw = _raw_call(teacher_server.endpoint, _request(images, raw=True).SerializeToString())
    typed = _raw_call(teacher_server.endpoint, _request(images, raw=False).SerializeToString())
    raw_t, typed_t = raw.outputs[0].tensor[0], typed.outputs[0].tensor[0]
    assert raw_t.tensor_content and not raw_t.float_data
    assert list(typed_t.float_data) and not typed_t.tensor_content
    assert raw_t.alias_name == typed_t.alias_name == "prediction" and list(raw_t.shape) == [2, 10]
    np.testing.assert_array_equal(decode_tensor(raw_t), decode_tensor(typed_t))
    assert raw.log_id == 1 and raw.err_no == 0 and raw.outputs[0].engine_name


def test_http_gzip_answer_and_health(teacher_server):
    body = _request(mnist_like_images(32), raw=False).SerializeToString()
    answer = requests.post(f"http://{teacher_server.http_endpoint}{HTTP_PATH}", data=gzip.compress(body),
                           headers={"Content-Type": "application/proto", "Content-Encoding": "gzip",
                                    "Accept-Encoding": "gzip"}, timeout=30)
    assert answer.status_code == 200 and answer.headers["Content-Encoding"] == "gzip"
    response = pb.Response.FromString(answer.content)
    assert response.err_no == 0 and list(response.outputs[0].tensor[0].shape) == [32, 10]
    plain = requests.post(f"http://{teacher_server.http_endpoint}{HTTP_PATH}", data=body,
                          headers={"Content-Type": "application/proto", "Accept-Encoding": "identity"}, timeout=30)
    assert "Content-Encoding" not in plain.headers
    assert pb.Response.FromString(plain.content) == response
    health = requests.get(f"http://{teacher_server.http_endpoint}/health", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "SERVING"}
    assert grpc_health(teacher_server.endpoint) == "SERVING"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(teacher_server.endpoint) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_json_answer_shape(teacher_server):
    request = {"fetch_var_names": ["prediction"], "log_id": 7,
               "tensor": [{"float_data": mnist_like_images(1).ravel().tolist(), "shape": [1, 1, 28, 28],
                           "elem_type": 1, "name": "img", "alias_name": "img"}]}
    answer = requests.post(f"http://{teacher_server.http_endpoint}{HTTP_PATH}", json=request, timeout=30).json()
    assert answer["err_no"] == 0 and answer["err_msg"] == "" and int(answer["log_id"]) == 7
    tensor = answer["outputs"][0]["tensor"][0]
    assert tensor["alias_name"] == "prediction" and tensor["shape"] == [1, 10] and tensor["elem_type"] == 1
    np.testing.assert_allclose(sum(tensor["float_data"]), 1.0, atol=1e-5)


# -- every numeric type ---------------------------------------------------------------------------------
TYPES = ["float32", "float64", "int32", "int64", "uint8", "float16", "bool"]  # paddle 2.6 has no int8/int16 cast


@pytest.fixture(scope="module")
def types_server(tmp_path_factory):
    """A parameter-free model: y_T = T(2 * x_T) for every numeric type paddle's cast supports."""
    import paddle

    root = tmp_path_factory.mktemp("types")
    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        feeds = {f"x_{t}": paddle.static.data(f"x_{t}", [None, 3], t) for t in TYPES}
        fetches = {f"y_{t}": paddle.cast(paddle.cast(feeds[f"x_{t}"], "float32") * 2.0, t) for t in TYPES}
    save_model(str(root / "server"), str(root / "client"), feeds, fetches, main)
    paddle.disable_static()
    with TeacherServer(str(root / "server"), http=True, thread=1) as server:
        yield server, ServingConfig.load(str(root / "client"))


@pytest.mark.parametrize("raw", [True, False], ids=["tensor_content", "typed"])
def test_every_numeric_type(types_server, raw):
    server, config = types_server
    inputs = {t: (np.arange(6).reshape(2, 3) % 2 if t == "bool" else np.arange(6).reshape(2, 3)).astype(t)
              for t in TYPES}
    with TeacherClient(server.endpoint, config, wire="raw" if raw else "typed") as client:
        out = client.predict({f"x_{t}": a for t, a in inputs.items()})
    for t, a in inputs.items():
        expected = (a.astype("float32") * 2).astype(t)
        assert out[f"y_{t}"].dtype == np.dtype(t)
        np.testing.assert_array_equal(out[f"y_{t}"], expected)


# -- bad requests ----------------------------------------------------------------------------------------
def _bad_requests():
    img = mnist_like_images(2)
    typed_short = _request(img, raw=False)
    del typed_short.tensor[0].float_data[-1]
    raw_short = _request(img)
    raw_short.tensor[0].tensor_content = raw_short.tensor[0].tensor_content[:-4]
    wrong_dtype = _request(img.astype("float64"))
    wrong_shape = _request(np.zeros((2, 1, 28, 27), "float32"))
    return {
        "unknown feed": (_request(img, name="image"), r"unknown feed 'image'.*img"),
        "missing feed": (pb.Request(fetch_var_names=["prediction"]), r"missing feed.*'img'.*float32 \[N, 1, 28, 28\]"),
        "wrong dtype": (wrong_dtype, r"feed 'img': elem_type 3 \(float64\).*float32"),
        "wrong shape": (wrong_shape, r"feed 'img': shape \[2, 1, 28, 27\].*\[N, 1, 28, 28\]"),
        "typed element count": (typed_short, r"feed 'img'.*1567"),
        "raw element count": (raw_short, r"feed 'img'.*needs 1568 elements.*1567"),
        "unknown fetch": (_request(img, fetch=["logits"]), r"unknown fetch 'logits'.*prediction"),
    }


@pytest.mark.parametrize("transport", ["grpc", "http-proto", "http-json"])
def test_bad_requests_get_errors_and_server_keeps_serving(teacher_server, teacher_model, transport):
    from google.protobuf import json_format

    good = _request(mnist_like_images(3, seed=9))
    expected = reference_predict(teacher_model.server_dir, mnist_like_images(3, seed=9))
    url = f"http://{teacher_server.http_endpoint}{HTTP_PATH}"

    def send(request: pb.Request) -> pb.Response:
        if transport == "grpc":
            return _raw_call(teacher_server.endpoint, request.SerializeToString())
        if transport == "http-proto":
            answer = requests.post(url, data=request.SerializeToString(),
                                   headers={"Content-Type": "application/proto"}, timeout=30)
            return pb.Response.FromString(answer.content)
        doc = json_format.MessageToDict(request, preserving_proto_field_name=True)
        answer = requests.post(url, json=doc, timeout=30).json()
        return json_format.ParseDict(answer, pb.Response())

    for what, (request, pattern) in _bad_requests().items():
        response = send(request)
        assert response.err_no != 0, what
        assert re.search(pattern, response.err_msg), (what, response.err_msg)
        ok = send(good)
        assert ok.err_no == 0, (what, ok.err_msg)
        np.testing.assert_allclose(decode_tensor(ok.outputs[0].tensor[0]), expected, atol=1e-5)


def test_a_fetch_named_many_times_is_answered_once(teacher_server):
    request = _request(mnist_like_images(2), fetch=["prediction"] * 100000)
    assert request.ByteSize() > 1_000_000
    answer = _raw_call(teacher_server.endpoint, request.SerializeToString())
    assert answer.err_no == 0, answer.err_msg
    assert len(answer.outputs[0].tensor) == 1 and answer.ByteSize() < 1000
    assert answer.outputs[0].tensor[0].alias_name == "prediction"


def test_malformed_and_oversized_bodies(teacher_model):
    small = mnist_like_images(8)  # 8 * 784 * 4 = 25 kB: over a 20000-byte limit
    metrics_port = free_port()
    extra = ["--max_body_size", "20000", "--enable_prometheus", "--prometheus_port", str(metrics_port)]
    with TeacherServer(teacher_model.server_dir, http=True, thread=1, extra_args=extra) as server:
        url = f"http://{server.http_endpoint}{HTTP_PATH}"
        good = _request(mnist_like_images(1)).SerializeToString()
        checks = []
        with pytest.raises(grpc.RpcError) as info:
            _raw_call(server.endpoint, b"\xff\xff\xff garbage")
        checks.append((info.value.code(), info.value.details()))
        with pytest.raises(grpc.RpcError) as info:
            _raw_call(server.endpoint, _request(small).SerializeToString())
        checks.append((info.value.code(), info.value.details()))
        assert checks[0][0] == grpc.StatusCode.INVALID_ARGUMENT and "not a general_model Request" in checks[0][1]
        assert checks[1][0] == grpc.StatusCode.INVALID_ARGUMENT and "--max_body_size 20000" in checks[1][1]
        with pytest.raises(grpc.RpcError) as info:   # far over: refused by grpc before it is read whole
            _raw_call(server.endpoint, _request(mnist_like_images(64)).SerializeToString())
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in info.value.details()
        assert _raw_call(server.endpoint, good).err_no == 0

        cases = [
            (b"{not json", {"Content-Type": "application/json"}, 400, "not a general_model Request in JSON"),
            (b"\xff\xff\xff garbage", {"Content-Type": "application/proto"}, 400, "in protobuf"),
            (b"not gzip", {"Content-Type": "application/proto", "Content-Encoding": "gzip"}, 400, "not valid gzip"),
            (_request(small).SerializeToString(), {"Content-Type": "application/proto"}, 413, "--max_body_size"),
            (gzip.compress(_request(small).SerializeToString()),
             {"Content-Type": "application/proto", "Content-Encoding": "gzip"}, 413, "--max_body_size"),
        ]
        for body, headers, status, message in cases:
            answer = requests.post(url, data=body, headers=headers, timeout=30)
            assert answer.status_code == status, (message, answer.status_code)
            if headers["Content-Type"] == "application/json":
                err_no, err_msg = answer.json()["err_no"], answer.json()["err_msg"]
            else:
                response = pb.Response.FromString(answer.content)
                err_no, err_msg = response.err_no, response.err_msg
            assert err_no != 0 and message in err_msg, err_msg
            ok = requests.post(url, data=good, headers={"Content-Type": "application/proto"}, timeout=30)
            assert ok.status_code == 200 and pb.Response.FromString(ok.content).err_no == 0
        assert requests.get(f"http://{server.http_endpoint}/nowhere", timeout=5).status_code == 404
        families = _metrics(metrics_port)
        by_code = {(s.labels["transport"], s.labels["err_no"]): s.value
                   for s in families["distill_teacher_requests"].samples if s.name.endswith("_total")}
        assert by_code[("grpc", "bad_request")] == 2 and by_code[("grpc", "0")] == 1
        assert by_code[("http", "bad_request")] == 5 and by_code[("http", "0")] == 5
        latency = {s.labels["transport"]: s.value for s in families["distill_teacher_request_duration_seconds"].samples
                   if s.name.endswith("_count")}
        assert latency == {"grpc": 3, "http": 10}
        runs = [s.value for s in families["distill_teacher_batch_size"].samples if s.name.endswith("_count")]
        assert runs[0] >= 6  # warm-up and the batch check run the predictor too
        assert _sample(families, "distill_teacher_predictor_busy_seconds_total") > 0
        assert _sample(families, "distill_teacher_queue_depth") == 0
        assert _sample(families, "distill_teacher_serving") == 1
        assert _sample(families, "distill_teacher_samples_total") == 6


def _metrics(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(answer.text)}


def _sample(families: dict, name: str) -> float:
    for family in families.values():
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no metric {name}")


# -- SIGTERM, flags, logs --------------------------------------------------------------------------------
def test_sigterm_during_load_drains_and_exits_zero(teacher_model):
    extra = ["--gpu_ids", "0", "--mem_optim", "True", "--stats_interval", "0.5"]
    server = TeacherServer(teacher_model.server_dir, http=False, thread=1, max_batch_size=0, extra_args=extra)
    with server:
        # 1024 images per request and 8 clients on one predictor: each request waits ~8 runs (hundreds of ms),
        # so requests sent well before the signal are surely still in flight when it arrives.
        images = mnist_like_images(1024, seed=11)
        expected = reference_predict(teacher_model.server_dir, images)
        records, stop = [], threading.Event()

        def load() -> None:
            with TeacherClient(server.endpoint, teacher_model.client_conf, timeout=30) as client:
                client.predict({"img": images[:1]})
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        out = client.predict({"img": images})["prediction"]
                        records.append((start, time.monotonic(), np.abs(out - expected).max()))
                    except TeacherUnavailable as exc:
                        records.append((start, time.monotonic(), exc))
                        return

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        wait_for(lambda: len(records) >= 8, 60, "load running")
        signalled = time.monotonic()
        server.kill(signal.SIGTERM)
        code = server.wait_exit(timeout=60)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        log = server.log()
    assert code == 0, log[-2000:]
    assert not port_is_open(server.port)
    with socket.socket() as s:  # the port is free again for a new server (which sets SO_REUSEADDR as servers do)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
    in_flight = [r for r in records if r[0] < signalled - 0.05 and r[1] > signalled]
    assert in_flight, "no request was in flight at SIGTERM"
    for start, _end, result in records:
        if start < signalled - 0.05:  # sent well before the signal: must have been answered, correctly
            assert not isinstance(result, Exception), result
        if not isinstance(result, Exception):
            assert result <= 1e-5
    assert "draining" in log and "stopped after" in log
    if _has_cuda():   # the GPU wheel serves on GPU 0 as asked
        assert "device gpu 0" in log
    else:
        assert "paddle is compiled without CUDA; --gpu_ids 0 ignored, serving on CPU" in log and "device cpu" in log
    assert f"127.0.0.1:{server.port}" in log and "serving model" in log
    assert "requests (" in log and "latency ms" in log


def test_restart_on_same_port(teacher_model):
    with TeacherServer(teacher_model.server_dir, thread=1) as server:
        first_pid, port = server.pid, server.port
        server.restart()
        assert server.pid != first_pid and server.port == port
        with TeacherClient(server.endpoint, teacher_model.client_conf) as client:
            assert client.predict({"img": mnist_like_images(1)})["prediction"].shape == (1, 10)


def _has_cuda() -> bool:
    import paddle

    return paddle.is_compiled_with_cuda()


def test_paddle_serving_flags_without_meaning_are_accepted_and_named(teacher_model):
    extra = ["--use_calib", "--request_cache_size", "0", "--runtime_thread_num", "2", "2", "--product_name", "p",
             "--cpu_math_thread_num", "1", "--gpu_memory_mb", "100"]
    with TeacherServer(teacher_model.server_dir, thread=1, extra_args=extra) as server:
        with TeacherClient(server.endpoint, teacher_model.client_conf) as client:
            assert client.predict({"img": mnist_like_images(1)})["prediction"].shape == (1, 10)
        log = server.log()
    assert ("Paddle Serving flags without meaning for this server, ignored: --runtime_thread_num --use_calib "
            "--product_name --request_cache_size") in log


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "teachers.serve", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_help_and_refusals(teacher_model):
    helped = _serve("--help")
    assert helped.returncode == 0
    for flag in ("--model", "--port", "--host", "--thread", "--gpu_ids", "--device", "--workdir", "--mem_optim",
                 "--mem_optim_off", "--ir_optim", "--use_mkl", "--precision", "--max_body_size", "--http_port",
                 "--max_batch_size", "--batch_timeout_ms", "--enable_prometheus", "--zk", "--service"):
        assert flag in helped.stdout, flag
    for name in IGNORED_SERVING_FLAGS:
        assert f"--{name}" in helped.stdout, name
    port = str(free_port())
    if not _has_cuda():   # (the GPU wheel would start serving on the GPU)
        gpu = _serve("--model", teacher_model.server_dir, "--device", "gpu", "--port", port, "--host", "127.0.0.1")
        assert gpu.returncode == 2 and "--device gpu: paddle is compiled without CUDA" in gpu.stderr
    typo = _serve("--model", teacher_model.server_dir, "--port", port, "--max_batch_sise", "8")
    assert typo.returncode == 2 and "unrecognized arguments: --max_batch_sise 8" in typo.stderr
    two = _serve("--model", teacher_model.server_dir, teacher_model.server_dir, "--port", port)
    assert two.returncode == 2 and "serves one model folder" in two.stderr
    missing = _serve("--model", os.path.dirname(teacher_model.client_dir), "--port", port)
    assert missing.returncode == 2 and "serving_server_conf.prototxt" in missing.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--thread", "0", "argument --thread: 0 is less than 1"),
    ("--cpu_math_thread_num", "-2", "argument --cpu_math_thread_num: -2 is less than 1"),
    ("--max_batch_size", "-1", "argument --max_batch_size: -1 is less than 0"),
    ("--max_body_size", "0", "argument --max_body_size: 0 is less than 1"),
    ("--http_max_connections", "many", "argument --http_max_connections: 'many' is not an integer"),
    ("--predict_timeout", "nan", "argument --predict_timeout: nan is not a positive, finite number"),
    ("--drain_timeout", "0", "argument --drain_timeout: 0 is not a positive, finite number"),
    ("--batch_timeout_ms", "-1", "argument --batch_timeout_ms: -1 is not a finite number >= 0"),
])
def test_out_of_range_numbers_are_refused_not_clamped(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--model", "m", flag, value])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    args = parse_args(["--model", "m", "--thread", "3", "--max_batch_size", "0", "--batch_timeout_ms", "0"])
    assert (args.thread, args.max_batch_size, args.batch_timeout_ms) == (3, 0, 0.0)


def test_busy_prometheus_port_is_named_as_such(teacher_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        run = _serve("--model", teacher_model.server_dir, "--host", "127.0.0.1", "--port", str(free_port()),
                     "--enable_prometheus", "--prometheus_port", busy)
    assert run.returncode == 2
    assert f"cannot bind the Prometheus port (--prometheus_port) 127.0.0.1:{busy}" in run.stderr


def test_http_answers_json_errors_in_json(teacher_server):
    answer = requests.post(f"http://{teacher_server.http_endpoint}{HTTP_PATH}",
                           data=json.dumps({"tensor": [{"name": "img", "elem_type": 1, "shape": [1, 2],
                                                        "float_data": [1, 2]}]}),
                           headers={"Content-Type": "application/json"}, timeout=30)
    doc = answer.json()
    assert doc["err_no"] != 0 and "feed 'img'" in doc["err_msg"] and "[N, 1, 28, 28]" in doc["err_msg"]


# -- what the client sends (gzip) ------------------------------------------------------------------------
class _RecordingProxy:
    """A plain HTTP forwarder between a client and the real teacher's HTTP port that records what the client
    sent (headers and body as received), so a test can check the client's own encoding."""

    def __init__(self, target: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the client's health check
                self._forward(requests.get(f"http://{target}{self.path}", timeout=30))

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seen.append((dict(self.headers), body))
                self._forward(requests.post(f"http://{target}{self.path}", data=body, timeout=30,
                                            headers={k: v for k, v in self.headers.items() if k.lower() != "host"}))

            def _forward(self, answer):
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers["Content-Type"])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.parametrize("http_format", ["proto", "json"])
def test_client_compress_really_gzips_the_body(teacher_server, teacher_model, http_format):
    images = mnist_like_images(32, seed=5)
    with _RecordingProxy(teacher_server.http_endpoint) as proxy, \
            TeacherClient(proxy.endpoint, teacher_model.client_conf, protocol="http", http_format=http_format,
                          compress=True) as client:
        out = client.predict({"img": images})["prediction"]
    np.testing.assert_allclose(out, reference_predict(teacher_model.server_dir, images), atol=1e-5)
    headers, body = proxy.seen[-1]
    assert headers.get("Content-Encoding") == "gzip" and body[:2] == b"\x1f\x8b"
    inflated = gzip.decompress(body)
    assert len(body) < len(inflated)
    request = json_format.Parse(inflated, pb.Request()) if http_format == "json" else pb.Request.FromString(inflated)
    assert list(request.tensor[0].shape) == [32, 1, 28, 28]


# -- Paddle Serving 0.9's documented HTTP calls ------------------------------------------------------------
def test_documented_curl_call_with_form_content_type_and_unnamed_tensor(teacher_server, teacher_model):
    """curl -XPOST -d '<json>' sends application/x-www-form-urlencoded; the documented tensor has no name."""
    images = mnist_like_images(2, seed=4)
    doc = {"tensor": [{"float_data": images.ravel().tolist(), "shape": [2, 1, 28, 28], "elem_type": 1}],
           "fetch_var_names": ["prediction"], "log_id": 12345678901}
    url = f"http://{teacher_server.http_endpoint}{HTTP_PATH}"
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        raw = requests.post(url, data=json.dumps(doc), headers=headers, timeout=30)
        assert raw.status_code == 200 and raw.headers["Content-Type"].startswith("application/json"), raw.text[:300]
        answer = raw.json()
        assert answer["err_no"] == 0 and answer["err_msg"] == "", answer
        assert answer["log_id"] == 12345678901 and isinstance(answer["log_id"], int)  # a number, as brpc writes it
        tensor = answer["outputs"][0]["tensor"][0]
        assert tensor["alias_name"] == "prediction" and tensor["shape"] == [2, 10] and tensor["elem_type"] == 1
        np.testing.assert_allclose(np.array(tensor["float_data"]).reshape(2, 10),
                                   reference_predict(teacher_model.server_dir, images), atol=1e-5)


def test_json_answers_write_64_bit_integers_as_numbers(types_server):
    server, _config = types_server
    doc = {"tensor": [{"name": f"x_{t}", "elem_type": code, "shape": [1, 3], field: values}
                      for t, code, field, values in [
                          ("float32", 1, "float_data", [1, 2, 3]), ("float64", 3, "float64_data", [1, 2, 3]),
                          ("int32", 2, "int_data", [1, 2, 3]), ("int64", 0, "int64_data", [1, 2, 3]),
                          ("uint8", 7, "tensor_content", "AQID"), ("float16", 5, "tensor_content", "ADwAQABC"),
                          ("bool", 9, "bool_data", [True, False, True])]]}
    answer = requests.post(f"http://{server.http_endpoint}{HTTP_PATH}", json=doc, timeout=30).json()
    assert answer["err_no"] == 0, answer
    tensors = {t["alias_name"]: t for t in answer["outputs"][0]["tensor"]}
    assert tensors["y_int64"]["int64_data"] == [2, 4, 6]          # numbers, not protobuf-JSON strings
    assert tensors["y_int32"]["int_data"] == [2, 4, 6]
    assert tensors["y_float32"]["float_data"] == [2.0, 4.0, 6.0]
    assert tensors["y_float64"]["float64_data"] == [2.0, 4.0, 6.0]
    assert tensors["y_bool"]["bool_data"] == [True, False, True]
    assert tensors["y_int64"]["elem_type"] == 0 and tensors["y_int64"]["shape"] == [1, 3]
    assert isinstance(answer["log_id"], int) and isinstance(answer["err_no"], int)


# -- malformed requests: every one an error answer, and the server keeps serving ---------------------------
def _check_serving(server) -> None:
    good = _request(mnist_like_images(1))
    assert _raw_call(server.endpoint, good.SerializeToString()).err_no == 0
    ok = requests.post(f"http://{server.http_endpoint}{HTTP_PATH}", data=good.SerializeToString(),
                       headers={"Content-Type": "application/proto"}, timeout=30)
    assert ok.status_code == 200 and pb.Response.FromString(ok.content).err_no == 0


def _raw_http(endpoint: str, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    host, port = endpoint.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head + body)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
    return b"".join(chunks)


def test_impossible_shapes_get_err_no_5000_on_every_transport(teacher_server):
    url = f"http://{teacher_server.http_endpoint}{HTTP_PATH}"
    for shape, message in [([2**31 - 1] * 3, "needs 9903520300447984150353281023 elements"),
                           ([-1, -1, 28, 28], "negative dimension"), ([1, 1, 28, -28], "negative dimension")]:
        request = pb.Request(fetch_var_names=["prediction"])
        request.tensor.add(name="img", alias_name="img", elem_type=1, shape=shape, float_data=[0.5] * 784)
        answers = [_raw_call(teacher_server.endpoint, request.SerializeToString()),
                   pb.Response.FromString(requests.post(url, data=request.SerializeToString(), timeout=30,
                                                        headers={"Content-Type": "application/proto"}).content)]
        doc = json_format.MessageToDict(request, preserving_proto_field_name=True)
        answers.append(json_format.ParseDict(requests.post(url, json=doc, timeout=30).json(), pb.Response()))
        for answer in answers:
            assert answer.err_no == 5000 and "feed 'img'" in answer.err_msg and message in answer.err_msg, answer
        _check_serving(teacher_server)


def test_http_lengths_and_streams_never_read_past_max_body_size(teacher_model):
    with TeacherServer(teacher_model.server_dir, http=True, thread=1,
                       extra_args=["--max_body_size", "20000", "--http_body_timeout", "1"]) as server:
        path = HTTP_PATH.encode()
        t0 = time.monotonic()   # a slow client: 100 of 5000 bytes, then nothing
        answer = _raw_http(server.http_endpoint, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 5000\r\n\r\n", b"{" * 100)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"not received within 1s" in answer, answer[:300]
        assert time.monotonic() - t0 < 6
        for length in (b"-5", b"-1", b"abc", b"1e3"):
            answer = _raw_http(server.http_endpoint, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                               b"application/proto\r\nContent-Length: " + length + b"\r\n\r\n", b"x" * 100)
            assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), (length, answer[:200])
            assert b"Content-Length" in answer, answer[:300]   # the 400 names the bad header
        _check_serving(server)
        rss_before = _rss_mb(server.pid)
        host, port = server.http_endpoint.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:   # a chunked stream, never ending
            s.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/proto\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            sent, answer = 0, b""
            try:
                while sent < 200 << 20:
                    s.sendall(b"100000\r\n" + b"\0" * 0x100000 + b"\r\n")
                    sent += 0x100000
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.settimeout(5)
            try:
                answer = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                pass
        assert sent < 50 << 20, f"the server kept reading: {sent >> 20} MiB sent"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert _rss_mb(server.pid) - rss_before < 30
        _check_serving(server)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_http_connections_are_bounded_and_never_starve_grpc(teacher_model):
    extra = ["--http_max_connections", "20", "--http_keepalive_timeout", "2"]
    with TeacherServer(teacher_model.server_dir, http=True, thread=1, extra_args=extra) as server:
        host, port = server.http_endpoint.split(":")
        fds_before = _fd_count(server.pid)
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(60)]
        try:
            # 60 connections opened, at most 20 held once the refusals are closed (a few more fds: health probes)
            wait_for(lambda: _fd_count(server.pid) - fds_before <= 20 + 8, 5,
                     "the server holding at most 20 of 60 idle connections")
            refused = []
            for s in idle[20:]:   # over the limit: answered 503 and closed (or still in the listen backlog)
                s.settimeout(1)
                try:
                    refused.append(s.recv(200))
                except socket.timeout:
                    refused.append(b"")
            assert all(r == b"" or r.startswith(b"HTTP/1.1 503 ") for r in refused), refused
            assert sum(r.startswith(b"HTTP/1.1 503 ") for r in refused) >= 10
            with TeacherClient(server.endpoint, teacher_model.client_conf, timeout=10) as client:
                assert client.predict({"img": mnist_like_images(2)})["prediction"].shape == (2, 10)
            # idle (and half-sent header) connections are closed after --http_keepalive_timeout
            idle[0].sendall(b"POST " + HTTP_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            t0 = time.monotonic()
            assert idle[0].recv(100) == b"" and idle[1].recv(100) == b""
            assert time.monotonic() - t0 < 8
            wait_for(lambda: _fd_count(server.pid) <= fds_before + 1, 10, "idle HTTP connections closed")
        finally:
            for s in idle:
                s.close()
        _check_serving(server)


# -- batching never changes an answer ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch_dependent_model(tmp_path_factory):
    """y = fc(x) - mean over the batch of fc(x): each row depends on the others in its batch."""
    import paddle

    root = tmp_path_factory.mktemp("batch_dependent")
    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    main.random_seed = startup.random_seed = 7
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        x = paddle.static.data("x", [None, 4], "float32")
        h = paddle.static.nn.fc(x, size=3)
        y = h - paddle.mean(h, axis=0, keepdim=True)
    exe = paddle.static.Executor(paddle.CPUPlace())
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        exe.run(startup)
        save_model(str(root / "server"), str(root / "client"), {"x": x}, {"y": y}, main)
    paddle.disable_static()
    return str(root / "server"), str(root / "client")


def _concurrent_answers(endpoint: str, client_dir: str, inputs: list) -> list:
    answers = [None] * len(inputs)

    def ask(i: int) -> None:
        with TeacherClient(endpoint, client_dir) as client:
            answers[i] = client.predict({"x": inputs[i]})["y"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return answers


def test_batch_dependent_model_is_never_merged(batch_dependent_model):
    server_dir, client_dir = batch_dependent_model
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((2, 4)).astype("float32") for _ in range(20)]
    with TeacherServer(server_dir, thread=1, max_batch_size=64, batch_timeout_ms=20) as server:
        alone = []
        with TeacherClient(server.endpoint, client_dir) as client:
            for x in inputs:
                alone.append(client.predict({"x": x})["y"])
        answers = _concurrent_answers(server.endpoint, client_dir, inputs)
        log = server.log()
    assert "dynamic batching off: merging requests could change answers" in log
    assert "differs from the same row inside a random batch" in log
    for got, expected in zip(answers, alone):
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(got.sum(0), 0, atol=1e-5)   # centred over its own request only


def test_batch_independent_model_merges_and_flag_forces_either_way(teacher_model, batch_dependent_model):
    with TeacherServer(teacher_model.server_dir, thread=1) as server:
        assert "dynamic batching on: the model is batch-independent" in server.log()
    with TeacherServer(batch_dependent_model[0], thread=1, extra_args=["--merge_requests", "yes"]) as server:
        assert "dynamic batching on without checking the model (--merge_requests yes)" in server.log()
    with TeacherServer(teacher_model.server_dir, thread=1, extra_args=["--merge_requests", "no"]) as server:
        assert "dynamic batching off (--merge_requests no)" in server.log()


# -- SIGTERM whatever the clients do (a wedged predictor: tests/teachers/test_teacher_workers.py) ----------------------
def test_sigterm_with_a_stalled_http_client_exits_within_drain_timeout(teacher_model):
    with TeacherServer(teacher_model.server_dir, http=True, thread=1, extra_args=["--drain_timeout", "2"]) as server:
        host, port = server.http_endpoint.split(":")
        stalled = socket.create_connection((host, int(port)), timeout=30)
        try:
            stalled.sendall(b"POST " + HTTP_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                            b"application/proto\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 100)
            time.sleep(0.5)
            t0 = time.monotonic()
            server.kill(signal.SIGTERM)
            code = server.wait_exit(timeout=30)
            took = time.monotonic() - t0
        finally:
            stalled.close()
        log = server.log()
    assert code == 0 and took < 2 + 3, (code, took, log[-2000:])


def test_ports_out_of_range_or_in_use_are_refused_clearly(teacher_model):
    for flags in (["--port", "70000"], ["--port", "-5"], ["--http_port", "65536"]):
        proc = subprocess.run([sys.executable, "-m", "teachers.serve", "--model", teacher_model.server_dir, *flags],
                              capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        assert proc.returncode == 2 and "is not a port (0-65535)" in proc.stderr, (flags, proc.stderr[-500:])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "teachers.serve", "--model", teacher_model.server_dir,
                               "--host", "127.0.0.1", "--port", str(port), "--thread", "1"],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and f"cannot bind gRPC port 127.0.0.1:{port}" in proc.stderr, proc.stderr[-800:]
    assert "Traceback" not in proc.stderr
