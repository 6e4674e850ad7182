"""A plain grpcio server with DEFAULT options (no ping policy of ours, no health service) that implements
Paddle Serving's GeneralModelService: what a student meets behind someone else's server or proxy.

It answers every request after ``--delay`` seconds with a ``prediction`` fetch of ``(batch, 10)`` float32 in
Paddle Serving's typed fields: each row is the sum of that sample's input, so answers can be checked. Run as a
subprocess (its own grpc-core, like a real foreign server)::

    with PlainGrpcServer(delay=6.0) as server:
        TeacherClient(server.endpoint, conf).predict({"img": images})
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from concurrent import futures
from typing import Optional, Sequence

import numpy as np

from tests.support.procs import ProcessGuard, free_port, port_is_open, wait_for


def write_client_conf(folder: str) -> str:
    """A serving client config for this server (feed ``img`` float32 (1, 28, 28), fetch ``prediction`` float32
    (10,)), written without paddle; returns its path."""
    from distill_base.serving_config import ServingConfig, VarSpec

    config = ServingConfig(feeds=(VarSpec("img", "img", 1, (1, 28, 28)),),
                           fetches=(VarSpec("prediction", "prediction", 1, (10,)),))
    return config.save(folder, "serving_client_conf.prototxt")


def expected_answer(images: np.ndarray) -> np.ndarray:
    """What the plain server answers for ``images``: each sample's sum, repeated over 10 columns."""
    sums = images.reshape(len(images), -1).astype(np.float32).sum(axis=1)
    return np.repeat(sums[:, None], 10, axis=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import grpc

    from distill_base.proto import general_model_service_pb2 as service_pb2
    from distill_base.proto import general_model_service_pb2_grpc as service_grpc
    from distill_base.tensor_codec import decode_tensor, encode_tensor

    parser = argparse.ArgumentParser(description="plain grpcio GeneralModelService (default server options)")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--delay", type=float, default=6.0, help="seconds before each answer (default: 6)")
    args = parser.parse_args(argv)

    class Service(service_grpc.GeneralModelServiceServicer):
        def inference(self, request, context):
            images = decode_tensor(request.tensor[0])
            time.sleep(args.delay)
            answer = service_pb2.Response(err_no=0)
            model = answer.outputs.add(engine_name="plain")
            encode_tensor(expected_answer(images), name="prediction", alias_name="prediction", raw=False,
                          out=model.tensor.add())
            return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))   # default options: grpc-core's ping policy
    service_grpc.add_GeneralModelServiceServicer_to_server(Service(), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()
    return 0


class PlainGrpcServer:
    """``python -m tests.support.plain_grpc`` on a free port; ``.endpoint``; stopped on exit, even on failure."""

    def __init__(self, delay: float = 6.0):
        self.port = free_port()
        self.delay = delay
        self._guard = ProcessGuard()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> PlainGrpcServer:
        try:
            self._guard.python("-m", "tests.support.plain_grpc", "--port", str(self.port), "--delay", str(self.delay))
            wait_for(lambda: port_is_open(self.port), 30, f"plain gRPC server on port {self.port}")
        except BaseException:
            self._guard.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._guard.close()


if __name__ == "__main__":
    sys.exit(main())
