"""gRPC side of the teacher server: Paddle Serving's ``GeneralModelService`` (inference, debug) plus the
standard ``grpc.health.v1.Health`` service (service names ``""`` and ``SERVING_SERVICE``), on grpcio's asyncio
server (``grpc.aio``): a request costs a coroutine on the event loop, not a thread hand-off through grpcio's
synchronous server machinery; the predictor runs on the batcher's threads meanwhile.

Requests arrive as bytes so that a malformed body or one over ``max_body_size`` gets INVALID_ARGUMENT
with a clear message instead of a generic deserialization failure; grpc itself refuses messages more than
64 KiB over the limit before reading them whole. At most ``max_concurrent_rpcs`` calls are handled at once
(RESOURCE_EXHAUSTED beyond), so at most that many bodies of ``max_body_size`` are held at once.

Example (inside a running event loop)::

    server = GrpcTeacherServer(handler, host="127.0.0.1", port=9292, max_body_size=1 << 29)
    await server.start(); ...; await server.stop(grace=30)
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.status_codes import ErrNo
from distill_base.wire_size import DEFAULT_ALLOWANCE, SLACK, DecodedSizeError, WireFormatError, check_decoded_size

from .inference import InferenceHandler, error_response
from .security import TransportSecurity

logger = logging.getLogger(__name__)

SERVING_SERVICE = "baidu.paddle_serving.predictor.general_model.GeneralModelService"

Observer = Callable[[str, str, float, int], None]  # (transport, err_no or "bad_request", seconds, samples)


class GrpcTeacherServer:
    """Serve one InferenceHandler over gRPC on ``host:port``; create it inside the event loop that runs it."""

    def __init__(self, handler: InferenceHandler, host: str, port: int, max_body_size: int,
                 observe: Optional[Observer] = None, security: Optional[TransportSecurity] = None,
                 max_concurrent_rpcs: int = 1024, max_decoded_allowance: Optional[int] = None):
        """Check the arguments.

        Raises:
            OSError: the gRPC port cannot be bound.
        """
        self.handler = handler
        self.max_body_size = int(max_body_size)
        self.max_decoded_allowance = decoded_allowance(self.max_body_size, max_decoded_allowance)  # read_request
        self._observe = observe
        security = security or TransportSecurity()
        # grpc receives a whole message before the handler sees it: its limit is the real bound. A little slack
        # lets bodies just over the limit reach our own check, whose refusal names --max_body_size; bigger ones
        # get grpc's RESOURCE_EXHAUSTED ("Received message larger than max").
        grpc_limit = min(self.max_body_size + 65536, 2**31 - 1)
        self._server = grpc.aio.server(
            interceptors=security.grpc_interceptors(),
            options=[("grpc.max_receive_message_length", grpc_limit),
                     ("grpc.max_send_message_length", 2**31 - 1),
                     ("grpc.so_reuseport", 0),
                     # students ping every second while a request is out (DistillReader's keepalive_time) to
                     # notice a frozen teacher: allow it instead of answering GOAWAY "too_many_pings"
                     ("grpc.http2.min_ping_interval_without_data_ms", 500),
                     ("grpc.http2.max_ping_strikes", 0)],
            maximum_concurrent_rpcs=max_concurrent_rpcs)
        # bytes both ways: the handler parses (its own error for a malformed body) and serializes itself
        methods = {
            "inference": grpc.unary_unary_rpc_method_handler(self._inference),
            "debug": grpc.unary_unary_rpc_method_handler(self._inference),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVING_SERVICE, methods),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = security.bind_grpc(self._server, address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {address}")
        self.address = address

    async def start(self) -> None:
        await self._server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING for health checkers (a drain, a wedged predictor)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVING_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, cancel the rest."""
        await self._server.stop(grace)

    async def _inference(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        start = time.perf_counter()
        if len(body) > self.max_body_size:
            self._record("bad_request", start, 0)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request of {len(body)} bytes is over --max_body_size {self.max_body_size}")
        try:
            request = read_request(body, self.max_decoded_allowance)
        except (DecodeError, WireFormatError) as exc:
            self._record("bad_request", start, 0)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a general_model Request: {exc}")
        except DecodedSizeError as exc:
            self._record(str(int(ErrNo.INPUT)), start, 0)
            return error_response(ErrNo.INPUT, str(exc)).SerializeToString()
        # a client's deadline shorter than --predict_timeout bounds the wait: past it nobody reads the answer,
        # and a request given up before its run starts never reaches a worker
        remaining = context.time_remaining()
        response = await self.handler.handle_async(request, timeout=remaining)
        self._record(str(response.err_no), start, request_samples(request))
        return response.SerializeToString()

    def _record(self, err_no: str, start: float, samples: int) -> None:
        if self._observe is not None:
            self._observe("grpc", err_no, time.perf_counter() - start, samples)


def decoded_allowance(max_body_size: int, allowance: Optional[int] = None) -> int:
    """Decoded bytes any request may take whatever its body (``read_request``): ``allowance`` if given, else
    16 MiB or 3x ``max_body_size`` when that is less."""
    return int(allowance) if allowance is not None else min(DEFAULT_ALLOWANCE, 3 * int(max_body_size))


def read_request(body: bytes, allowance: int = DEFAULT_ALLOWANCE, slack: int = SLACK) -> service_pb2.Request:
    """Parse a ``Request`` body after bounding what parsing it costs (``distill_base.wire_size``): a body whose
    typed values take more than ``max(len(body) + 64 KiB, allowance)`` bytes once decoded raises ``DecodedSizeError``
    (err_no 5000, naming the feed) before protobuf allocates them; a malformed one raises ``WireFormatError`` or
    ``DecodeError``."""
    check_decoded_size(body, "request", allowance, slack)
    request = service_pb2.Request()
    request.ParseFromString(body)
    return request


def request_samples(request: service_pb2.Request) -> int:
    """Samples in a request: the first tensor's batch dimension (0 when it has none)."""
    return int(request.tensor[0].shape[0]) if request.tensor and request.tensor[0].shape else 0
