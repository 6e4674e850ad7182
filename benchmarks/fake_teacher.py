"""A protocol-compatible fake teacher with a fixed latency, for benchmarks and reader development.

It serves Paddle Serving's ``GeneralModelService`` (gRPC) and the standard gRPC health service on one or more
ports, like ``teachers.serve`` does, but instead of running a model it answers each request after a fixed sleep
with a cheap deterministic function of the input: for every sample, ``prediction[j] = sum(x) * (j + 1)``
(``x`` the first feed, as float64, then cast to float32). Each port serves one request at a time, so one port
is a teacher with a known capacity of ``batch / latency`` samples per second.

Example::

    python benchmarks/fake_teacher.py --port 9300 --port 9301 --latency_ms 20 --write_conf /tmp/fake_conf
    # -> /tmp/fake_conf/serving_client_conf.prototxt: feed 'img' float32 [1, 28, 28], fetch 'prediction' [10]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Sequence

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill_base.proto import general_model_service_pb2 as service_pb2  # noqa: E402
from distill_base.proto import general_model_service_pb2_grpc as service_grpc  # noqa: E402
from distill_base.serving_config import CLIENT_CONF, ServingConfig, VarSpec  # noqa: E402
from distill_base.tensor_codec import decode_tensor, encode_tensor  # noqa: E402
from teachers.inference import profiled  # noqa: E402

logger = logging.getLogger("fake_teacher")


def fake_config(feed_shape: Sequence[int] = (1, 28, 28), classes: int = 10) -> ServingConfig:
    """The serving config the fake teacher answers to: feed 'img' float32, fetch 'prediction' float32."""
    return ServingConfig(
        feeds=(VarSpec("img", "img", 1, tuple(feed_shape)),),
        fetches=(VarSpec("save_infer_model/scale_0.tmp_0", "prediction", 1, (classes,)),))


def fake_predictions(x: np.ndarray, classes: int = 10) -> np.ndarray:
    """What the fake teacher answers for a batch ``x``: ``sum(sample) * (j + 1)`` for class ``j``."""
    x = np.asarray(x)
    sums = x.reshape(x.shape[0], -1).astype(np.float64).sum(axis=1)
    return (sums[:, None] * np.arange(1, classes + 1)[None, :]).astype(np.float32)


# --bad modes that fail every request the way a sick teacher does: Paddle Serving's err_no for a failed predictor
# (10000) or for an invalid request (5000), or gRPC RESOURCE_EXHAUSTED (out of memory)
FAILURES = {"predictor_failed": 10000, "refuse": 5000, "resource_exhausted": None}


class FakeTeacher(service_grpc.GeneralModelServiceServicer):
    """Answer after ``latency`` seconds, one request at a time; ``bad`` makes every answer wrong on purpose."""

    def __init__(self, latency: float, classes: int, bad: str = ""):
        self.latency = latency
        self.classes = classes
        self.bad = bad
        self.lock = threading.Lock()
        self.requests = 0

    def inference(self, request, context):
        return profiled(request, time.time_ns(), self._answer(request, context))   # as teachers.serve

    def _answer(self, request, context):
        feeds = [decode_tensor(t) for t in request.tensor]
        if not feeds:
            return service_pb2.Response(err_no=1, err_msg="no feed")
        if self.bad in FAILURES:
            return self._fail(context)
        with self.lock:
            start = time.monotonic()
            prediction = fake_predictions(feeds[0], self.classes)
            if self.bad == "batch":
                prediction = prediction[:-1] if len(prediction) > 1 else np.concatenate([prediction] * 2)
            self.requests += 1
            rest = self.latency - (time.monotonic() - start)
            if rest > 0:
                time.sleep(rest)
        output = service_pb2.ModelOutput(engine_name="fake")
        for name in request.fetch_var_names:
            if self.bad == "missing":
                continue
            if self.bad == "undecodable":   # 0 elements, other dimensions past int64 (issue 26)
                output.tensor.add(name="save_infer_model/scale_0.tmp_0", alias_name=name, elem_type=1,
                                  shape=[0, 1 << 30, 1 << 30, 1 << 30])
                continue
            output.tensor.append(encode_tensor(prediction, name="save_infer_model/scale_0.tmp_0",
                                               alias_name=name, raw=True))
        return service_pb2.Response(outputs=[output], log_id=request.log_id)

    def _fail(self, context):
        with self.lock:
            self.requests += 1
        err_no = FAILURES[self.bad]
        if err_no is None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "fake teacher: out of memory")
        return service_pb2.Response(err_no=err_no, err_msg=f"fake teacher: failing on purpose ({self.bad})")


def serve(ports: Sequence[int], latency: float, classes: int = 10, host: str = "127.0.0.1",
          bad: str = "", threads: int = 64) -> list[grpc.Server]:
    """Start one gRPC server per port (each with its own one-at-a-time teacher); returns the servers."""
    servers = []
    options = [("grpc.max_send_message_length", 512 * 1024 * 1024),
               ("grpc.max_receive_message_length", 512 * 1024 * 1024),
               # allow the students' keepalive pings (one a second while a request is out), as teachers.serve does
               ("grpc.http2.min_ping_interval_without_data_ms", 500), ("grpc.http2.max_ping_strikes", 0)]
    for port in ports:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options)
        service_grpc.add_GeneralModelServiceServicer_to_server(FakeTeacher(latency, classes, bad), server)
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if server.add_insecure_port(f"{host}:{port}") == 0:
            raise SystemExit(f"fake_teacher: cannot bind {host}:{port}")
        server.start()
        servers.append(server)
    return servers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Paddle Serving teacher that answers after a fixed latency.")
    parser.add_argument("--port", type=int, action="append", required=True,
                        help="port to serve a teacher on; repeat for several teachers in this process")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--latency_ms", type=float, default=20.0, help="time each request takes, in ms")
    parser.add_argument("--classes", type=int, default=10, help="length of each sample's 'prediction'")
    parser.add_argument("--feed_shape", default="1,28,28", help="per-sample shape of feed 'img' (for --write_conf)")
    parser.add_argument("--write_conf", default="", help="folder to write serving_client_conf.prototxt into")
    parser.add_argument("--bad", choices=["", "missing", "batch", "undecodable", *FAILURES], default="",
                        help="answer wrongly on purpose (for tests): 'missing' fetch, wrong 'batch' length or an "
                             "'undecodable' tensor (0 elements, dimensions past int64); or fail "
                             "every request: 'predictor_failed' (err_no 10000), 'refuse' (err_no 5000, invalid "
                             "request), 'resource_exhausted' (gRPC RESOURCE_EXHAUSTED)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fake_teacher %(message)s")
    if args.write_conf:
        shape = tuple(int(d) for d in args.feed_shape.split(","))
        fake_config(shape, args.classes).save(args.write_conf, CLIENT_CONF)
    servers = serve(args.port, args.latency_ms / 1000.0, args.classes, args.host, args.bad)
    logger.info("serving on %s with %.1f ms latency", args.port, args.latency_ms)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
