"""Serve a Paddle Serving model folder on Paddle Inference, speaking Paddle Serving's protocol.

Command line of ``python -m paddle_serving_server(_gpu).serve``::

    python -m teachers.serve --model serving_server --port 9292 --thread 4 --mem_optim True --gpu_ids 0

gRPC ``GeneralModelService`` + ``grpc.health.v1.Health`` on ``--port``; HTTP on ``--http_port`` when given.
SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new requests are refused, in-flight ones finish, exit 0.
A flag that cannot be honoured on this machine is named in a WARNING (or an error when it was explicit).
"""
from __future__ import annotations

import argparse
import gzip  # noqa: F401  (gzip/zlib and numpy before paddle: paddle 2.6.2 exports zlib symbols)
import logging
import os
import signal
import socket
import sys
import threading
import time
import zlib  # noqa: F401
from typing import Optional, Sequence

import numpy as np

from discovery.register import add_zk_arguments, registration_from_args
from distill_reader.serving_config import SERVER_CONF, ConfigError, ServingConfig

logger = logging.getLogger("teachers.serve")

DEFAULT_MAX_BODY_SIZE = 536870912


def str2bool(value) -> bool:
    """``True/False/1/0/yes/no`` as Paddle Serving's flags take them (``--mem_optim True``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m teachers.serve",
        description="Serve a Paddle Serving model folder (written by teachers.export or paddle_serving_client) "
                    "with Paddle Inference, over Paddle Serving's gRPC and HTTP protocol. Boolean flags take "
                    "an optional True/False value (--mem_optim True, or just --ir_optim).")
    flag = {"type": str2bool, "nargs": "?", "const": True}
    g = p.add_argument_group("Paddle Serving flags")
    g.add_argument("--model", nargs="+", required=True, metavar="DIR",
                   help="serving server folder (model files + serving_server_conf.prototxt); one model only")
    g.add_argument("--port", type=int, default=9393, help="gRPC port (default: %(default)s)")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s; tests use 127.0.0.1)")
    g.add_argument("--thread", type=int, default=4,
                   help="number of Paddle Inference predictors run in parallel (default: %(default)s)")
    g.add_argument("--gpu_ids", default="",
                   help="comma separated GPU ids; predictors are spread over them. Needs the GPU wheel: with the "
                        "CPU wheel a warning says they are ignored and the server runs on CPU")
    g.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="cpu or gpu (default: gpu when --gpu_ids is given and paddle has CUDA, else cpu); "
                        "--device gpu without CUDA is an error")
    g.add_argument("--workdir", default=None,
                   help="Paddle Serving's folder for generated C++ configs; accepted, nothing is written there")
    g.add_argument("--mem_optim", default=True, **flag,
                   help="Paddle Inference memory reuse between ops (default: True)")
    g.add_argument("--mem_optim_off", action="store_true", help="same as --mem_optim False (0.9 spelling)")
    g.add_argument("--ir_optim", default=True, **flag,
                   help="Paddle Inference graph optimisation passes (default: True; oneDNN needs them)")
    g.add_argument("--use_mkl", default=True, **flag, help="oneDNN (MKL-DNN) kernels on CPU (default: True)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "bf16"],
                   help="inference precision; fp32 everywhere, bf16 on CPUs with oneDNN bf16 support; others "
                        "fall back to fp32 with a warning (default: %(default)s)")
    g.add_argument("--max_body_size", type=int, default=DEFAULT_MAX_BODY_SIZE,
                   help="largest request body in bytes, gRPC and HTTP (default: %(default)s)")
    g.add_argument("--enable_prometheus", default=False, **flag,
                   help="serve Prometheus counters on GET /metrics at --prometheus_port")
    g.add_argument("--prometheus_port", type=int, default=19393, help="Prometheus port (default: %(default)s)")
    g.add_argument("--use_trt", default=False, **flag, help="TensorRT: not available here, warns when set")
    g.add_argument("--use_lite", default=False, **flag, help="Paddle Lite: not available here, warns when set")
    g.add_argument("--use_xpu", default=False, **flag, help="Kunlun XPU: not available here, warns when set")
    g.add_argument("--name", default=None, help="Paddle Serving web service name; accepted and logged")

    o = p.add_argument_group("this server's flags")
    o.add_argument("--http_port", type=int, default=None,
                   help="also serve HTTP (POST /GeneralModelService/inference, GET /health) on this port")
    o.add_argument("--max_batch_size", type=int, default=64,
                   help="dynamic batching: merge concurrent requests up to this many samples per predictor run; "
                        "0 or 1 turns batching off (default: %(default)s)")
    o.add_argument("--batch_timeout_ms", type=float, default=2.0,
                   help="dynamic batching: wait at most this long after a request for others to join it "
                        "(default: %(default)s)")
    o.add_argument("--drain_timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    o.add_argument("--stats_interval", type=float, default=60.0,
                   help="seconds between request count / latency log lines (default: %(default)s)")
    o.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default: %(default)s)")

    add_zk_arguments(p, required=False)   # --zk, --service, --root/--zk_root, --zk_auth, --session_timeout, ...
    p.add_argument("--advertise_host", default=None,
                   help="host to register in ZooKeeper (default: --host, or this machine's address when --host "
                        "is 0.0.0.0)")
    return p


class ServeError(RuntimeError):
    """A flag combination or model folder this server cannot serve; exit code 2."""


def _gpu_ids(text: str) -> list[int]:
    ids = []
    for part in str(text or "").replace(" ", "").split(","):
        if part == "":
            continue
        try:
            value = int(part)
        except ValueError:
            raise ServeError(f"--gpu_ids {text!r}: expected comma separated integers") from None
        if value >= 0:
            ids.append(value)
    return ids


def resolve_device(args: argparse.Namespace, has_cuda: bool, gpu_count: int) -> list[int]:
    """GPU ids to use ([] = CPU), warning about every flag that cannot be honoured."""
    ids = _gpu_ids(args.gpu_ids)
    if args.device == "gpu" and not has_cuda:
        raise ServeError("--device gpu: paddle is compiled without CUDA (CPU wheel); install paddlepaddle-gpu "
                         "(pip install -e .[gpu]) or use --device cpu")
    if args.device == "cpu":
        if ids:
            logger.warning("--device cpu: --gpu_ids %s ignored, serving on CPU", args.gpu_ids)
        return []
    if ids and not has_cuda:
        logger.warning("paddle is compiled without CUDA; --gpu_ids %s ignored, serving on CPU", args.gpu_ids)
        return []
    if args.device == "gpu" and not ids:
        ids = [0]
    bad = [i for i in ids if i >= gpu_count]
    if bad:
        raise ServeError(f"--gpu_ids {args.gpu_ids}: this machine has {gpu_count} GPU(s), no GPU {bad}")
    return ids


def warn_unsupported(args: argparse.Namespace, unknown: Sequence[str], on_gpu: bool) -> str:
    """Log every flag that is accepted but cannot be honoured; returns the precision actually used."""
    for flag_name in ("use_trt", "use_lite", "use_xpu"):
        if getattr(args, flag_name):
            logger.warning("--%s: not available in this server (Paddle Inference CPU/GPU only); ignored", flag_name)
    if unknown:
        logger.warning("flags not implemented by this server, ignored: %s", " ".join(unknown))
    if args.workdir:
        logger.info("--workdir %s: nothing to write there (this server generates no C++ config files)",
                    args.workdir)
    if args.name:
        logger.info("--name %s: service name noted (used only in logs)", args.name)
    precision = args.precision
    if precision == "bf16" and not on_gpu:
        from paddle.base import core

        if not args.use_mkl or not core.supports_bfloat16():
            logger.warning("--precision bf16: this CPU (or --use_mkl False) has no oneDNN bf16; serving fp32")
            precision = "fp32"
    elif precision != "fp32":
        logger.warning("--precision %s: needs TensorRT or a calibrated model, not available here; serving fp32",
                       precision)
        precision = "fp32"
    return precision


def _advertise_host(args: argparse.Namespace) -> str:
    if args.advertise_host:
        return args.advertise_host
    if args.host not in ("0.0.0.0", "::", ""):
        return args.host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _warm_up(pool, config: ServingConfig) -> None:
    if any(s.is_lod_tensor or any(d < 0 for d in s.shape) for s in config.feeds):
        return
    feeds = {s.name: np.zeros((1, *s.shape), dtype=s.dtype) for s in config.feeds}
    pool.run(feeds, [s.name for s in config.fetches])


class TeacherService:
    """Everything one ``teachers.serve`` process runs; ``start`` then ``drain``."""

    def __init__(self, args: argparse.Namespace, unknown: Sequence[str] = ()):
        from .predictor_pool import ModelFilesError, PredictorOptions

        self.args = args
        if len(args.model) != 1:
            raise ServeError(f"--model {' '.join(args.model)}: this server serves one model folder, "
                             f"got {len(args.model)} (Paddle Serving's model chaining is not supported)")
        self.model_dir = args.model[0]
        try:
            self.config = ServingConfig.load(os.path.join(self.model_dir, SERVER_CONF))
        except ConfigError as exc:
            raise ServeError(str(exc)) from None
        import paddle

        has_cuda = paddle.is_compiled_with_cuda()
        gpu_count = paddle.device.cuda.device_count() if has_cuda else 0
        self.gpu_ids = resolve_device(args, has_cuda, gpu_count)
        precision = warn_unsupported(args, unknown, bool(self.gpu_ids))
        self.options = PredictorOptions(
            model_dir=self.model_dir, size=max(1, args.thread), gpu_ids=self.gpu_ids, use_mkl=args.use_mkl,
            ir_optim=args.ir_optim, mem_optim=args.mem_optim and not args.mem_optim_off, precision=precision)
        self._ModelFilesError = ModelFilesError
        self.registration = None
        self.grpc = None
        self.stats = None
        self.batcher = None
        self.http = None
        self.metrics = None

    @property
    def device(self) -> str:
        if self.gpu_ids:
            return f"gpu {','.join(map(str, self.gpu_ids))}"
        return "cpu (oneDNN)" if self.options.use_mkl else "cpu"

    def start(self) -> None:
        from .batcher import DynamicBatcher
        from .http_front import HttpFront
        from .inference import InferenceHandler
        from .predictor_pool import PredictorPool
        from .server import GrpcTeacherServer
        from .stats import RequestStats

        args = self.args
        started = time.monotonic()
        try:
            self.pool = PredictorPool(self.options)
        except self._ModelFilesError as exc:
            raise ServeError(str(exc)) from None
        missing = [s.name for s in self.config.feeds if s.name not in self.pool.input_names] + \
                  [s.name for s in self.config.fetches if s.name not in self.pool.output_names]
        if missing:
            raise ServeError(f"{self.model_dir}: config names {missing} are not inputs/outputs of the model "
                             f"(inputs {self.pool.input_names}, outputs {self.pool.output_names})")
        _warm_up(self.pool, self.config)
        run = self.pool.run
        if args.max_batch_size > 1:
            self.batcher = DynamicBatcher(self.pool.run, args.max_batch_size, args.batch_timeout_ms,
                                          runners=self.pool.size)
            run = self.batcher.submit
        self.stats = RequestStats(args.stats_interval)
        handler = InferenceHandler(self.config, run)
        self.grpc = GrpcTeacherServer(handler, args.host, args.port, args.max_body_size,
                                      workers=max(16, 4 * self.pool.size), observe=self.stats.observe)
        if args.http_port is not None:
            self.http = HttpFront(handler, args.host, args.http_port, args.max_body_size, stats=self.stats)
        if args.enable_prometheus:
            self.metrics = HttpFront(None, args.host, args.prometheus_port, 1024, stats=self.stats)
        self.grpc.start()
        for front in (self.http, self.metrics):
            if front is not None:
                front.start()
        self.stats.start_logging()
        batching = (f"dynamic batching up to {args.max_batch_size} samples, {args.batch_timeout_ms} ms"
                    if self.batcher else "dynamic batching off")
        logger.info("serving model %s (feeds %s, fetches %s) on %s:%d gRPC%s%s; device %s, %d predictor(s), "
                    "%s; ready in %.2fs", os.path.abspath(self.model_dir), self.config.feed_names,
                    self.config.fetch_names, args.host, self.grpc.port,
                    f", HTTP :{self.http.port}" if self.http else "",
                    f", Prometheus :{self.metrics.port}/metrics" if self.metrics else "",
                    self.device, self.pool.size, batching, time.monotonic() - started)
        if args.zk:
            self._register()

    def _register(self) -> None:
        args = self.args
        if not args.service:
            raise ServeError("--zk needs --service NAME (the teacher service to register under)")
        endpoint = f"{_advertise_host(args)}:{self.grpc.port}"
        meta = {"model": os.path.basename(os.path.abspath(self.model_dir)), "device": self.device,
                "thread": self.pool.size, "max_batch_size": args.max_batch_size if self.batcher else 1,
                "feeds": self.config.feed_names, "fetches": self.config.fetch_names, "pid": os.getpid()}
        if self.http is not None:
            meta["http_port"] = self.http.port
        try:
            self.registration = registration_from_args(args, endpoint, meta)
        except ValueError as exc:     # e.g. no ZooKeeper identity and no --allow_open_acl
            raise ServeError(str(exc)) from None
        self.registration.start()
        logger.info("registered %s as service %r in ZooKeeper %s%s", endpoint, args.service, args.zk, args.root)

    def drain(self) -> None:
        """Deregister, refuse new requests, let in-flight ones finish, stop everything."""
        started = time.monotonic()
        logger.info("draining: no new requests, waiting up to %.0fs for in-flight ones", self.args.drain_timeout)
        if self.registration is not None:
            try:
                self.registration.stop()
            except Exception:  # noqa: BLE001 - ZooKeeper trouble must not block the drain
                logger.exception("ZooKeeper deregistration failed")
        if self.grpc is None:
            return
        self.grpc.set_not_serving()
        if self.http is not None:
            self.http.set_not_serving()
        stoppers = [threading.Thread(target=self.grpc.stop, args=(self.args.drain_timeout,))]
        if self.http is not None:
            stoppers.append(threading.Thread(target=self.http.stop))
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        if self.batcher is not None:
            self.batcher.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.stats.stop()
        batched = (f"; {self.batcher.runs} predictor runs for {self.stats.total_requests} requests"
                   if self.batcher is not None else "")
        logger.info("stopped after %d requests (%d errors) in total%s; drain took %.2fs", self.stats.total_requests,
                    self.stats.total_errors, batched, time.monotonic() - started)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    from distill_reader.paddle_compat import import_paddle

    import_paddle("teachers.serve")  # before logging setup: importing paddle sets the root logger to WARNING

    logging.basicConfig(level=getattr(logging, args.log_level), force=True,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    # Request threads hand work to batch runners and back: switch the GIL faster than the 5 ms default.
    sys.setswitchinterval(0.0005)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    service = None
    try:
        service = TeacherService(args, unknown)
        service.start()
    except Exception as exc:  # noqa: BLE001 - every start failure is logged and exits 2
        if isinstance(exc, (ServeError, OSError)):
            logger.error("%s", exc)
        else:
            logger.exception("cannot start the teacher server")
        if service is not None and service.grpc is not None:
            service.drain()
        return 2
    while not stop.wait(0.5):
        pass
    service.drain()
    return 0


if __name__ == "__main__":
    sys.exit(main())
