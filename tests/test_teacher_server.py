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

from distill_reader.client import TeacherClient, TeacherUnavailable
from distill_reader.proto import general_model_service_pb2 as pb
from distill_reader.serving_config import ServingConfig
from distill_reader.tensor_codec import decode_tensor, encode_tensor
from teachers.export import save_model
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
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        total = [line for line in metrics.splitlines() if line.startswith("distill_teacher_requests_total ")]
        assert total and int(total[0].split()[1]) >= 10


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
    assert "paddle is compiled without CUDA; --gpu_ids 0 ignored, serving on CPU" in log
    assert f"127.0.0.1:{server.port}" in log and "device cpu" in log and "serving model" in log
    assert "requests (" in log and "latency ms" in log


def test_restart_on_same_port(teacher_model):
    with TeacherServer(teacher_model.server_dir, thread=1) as server:
        first_pid, port = server.pid, server.port
        server.restart()
        assert server.pid != first_pid and server.port == port
        with TeacherClient(server.endpoint, teacher_model.client_conf) as client:
            assert client.predict({"img": mnist_like_images(1)})["prediction"].shape == (1, 10)


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
    port = str(free_port())
    gpu = _serve("--model", teacher_model.server_dir, "--device", "gpu", "--port", port, "--host", "127.0.0.1")
    assert gpu.returncode == 2 and "--device gpu: paddle is compiled without CUDA" in gpu.stderr
    two = _serve("--model", teacher_model.server_dir, teacher_model.server_dir, "--port", port)
    assert two.returncode == 2 and "serves one model folder" in two.stderr
    missing = _serve("--model", os.path.dirname(teacher_model.client_dir), "--port", port)
    assert missing.returncode == 2 and "serving_server_conf.prototxt" in missing.stderr


def test_http_answers_json_errors_in_json(teacher_server):
    answer = requests.post(f"http://{teacher_server.http_endpoint}{HTTP_PATH}",
                           data=json.dumps({"tensor": [{"name": "img", "elem_type": 1, "shape": [1, 2],
                                                        "float_data": [1, 2]}]}),
                           headers={"Content-Type": "application/json"}, timeout=30)
    doc = answer.json()
    assert doc["err_no"] != 0 and "feed 'img'" in doc["err_msg"] and "[N, 1, 28, 28]" in doc["err_msg"]
