"""gRPC side of the teacher server: Paddle Serving's ``GeneralModelService`` (inference, debug) plus the
standard ``grpc.health.v1.Health`` service (service names ``""`` and ``SERVING_SERVICE``).

Requests arrive as bytes so that a malformed body or one over ``max_body_size`` gets INVALID_ARGUMENT
with a clear message instead of a generic deserialization failure.

Example::

    server = GrpcTeacherServer(handler, host="127.0.0.1", port=9292, max_body_size=1 << 29)
    server.start(); ...; server.stop(grace=30)
"""
from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import Callable, Optional

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from distill_reader.proto import general_model_service_pb2 as service_pb2

from .inference import InferenceHandler

logger = logging.getLogger(__name__)

SERVING_SERVICE = "baidu.paddle_serving.predictor.general_model.GeneralModelService"

Observer = Callable[[float, int, bool], None]  # (seconds, samples, ok)


class GrpcTeacherServer:
    """Serve one InferenceHandler over gRPC on ``host:port``."""

    def __init__(self, handler: InferenceHandler, host: str, port: int, max_body_size: int,
                 workers: int = 16, observe: Optional[Observer] = None):
        self.handler = handler
        self.max_body_size = int(max_body_size)
        self._observe = observe
        # Let messages up to twice the limit through so that our own check can explain the refusal.
        grpc_limit = min(2 * self.max_body_size + 1024, 2**31 - 1)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", grpc_limit),
                     ("grpc.max_send_message_length", 2**31 - 1),
                     ("grpc.so_reuseport", 0),
                     # students ping every second while a request is out (DistillReader's keepalive_time) to
                     # notice a frozen teacher: allow it instead of answering GOAWAY "too_many_pings"
                     ("grpc.http2.min_ping_interval_without_data_ms", 500),
                     ("grpc.http2.max_ping_strikes", 0)])
        methods = {
            "inference": grpc.unary_unary_rpc_method_handler(
                self._inference, request_deserializer=None, response_serializer=_serialize),
            "debug": grpc.unary_unary_rpc_method_handler(
                self._inference, request_deserializer=None, response_serializer=_serialize),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVING_SERVICE, methods),))
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {address}")
        self.address = address

    def start(self) -> None:
        self._server.start()
        for service in ("", SERVING_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def set_not_serving(self) -> None:
        """Tell health checkers to look elsewhere (first step of a drain)."""
        for service in ("", SERVING_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds."""
        self._server.stop(grace).wait()

    def _inference(self, body: bytes, context: grpc.ServicerContext) -> service_pb2.Response:
        start = time.perf_counter()
        if len(body) > self.max_body_size:
            self._record(start, 0, False)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request of {len(body)} bytes is over --max_body_size {self.max_body_size}")
        request = service_pb2.Request()
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            self._record(start, 0, False)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a general_model Request: {exc}")
        response = self.handler.handle(request)
        self._record(start, _samples(request), response.err_no == 0)
        return response

    def _record(self, start: float, samples: int, ok: bool) -> None:
        if self._observe is not None:
            self._observe(time.perf_counter() - start, samples, ok)


def _serialize(response: service_pb2.Response) -> bytes:
    return response.SerializeToString()


def _samples(request: service_pb2.Request) -> int:
    return int(request.tensor[0].shape[0]) if request.tensor and request.tensor[0].shape else 0
