"""Serve a Paddle Serving model folder on Paddle Inference, speaking Paddle Serving's protocol.

Command line of ``python -m paddle_serving_server(_gpu).serve``::

    python -m teachers.serve --model serving_server --port 9292 --thread 4 --mem_optim True --gpu_ids 0

gRPC ``GeneralModelService`` + ``grpc.health.v1.Health`` on ``--port``; HTTP on ``--http_port`` when given;
Prometheus metrics on ``--prometheus_port`` with ``--enable_prometheus``. Everything network-facing runs in one
asyncio event loop (grpc.aio + aiohttp); predictors run in ``--thread`` worker processes (``teachers.worker_pool``),
fed by the same loop (``--worker_io loop``, the default: ``teachers.batcher.LoopBatcher``, jobs written to the
workers' sockets, answers read with ``loop.add_reader``; no thread hand-off on a request's path) or by the
batcher's runner threads (``--worker_io threads``).
SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new requests are refused, in-flight ones finish within
``--drain_timeout`` (then are cut off), exit 0 (3 when a predictor run is stuck). A flag that cannot be honoured
on this machine is named in a WARNING (or an error when it was explicit); an unknown flag is an error (exit 2),
except Paddle Serving's own flags that this server has no use for: those are accepted, named in a warning and
listed in ``--help``.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import gzip  # noqa: F401  (gzip/zlib and numpy before paddle: paddle 2.6.2 exports zlib symbols)
import logging
import math
import os
import signal
import socket
import sys
import time
import zlib  # noqa: F401
from typing import Optional, Sequence

import numpy as np

from discovery.register import add_zk_arguments, registration_from_args
from distill_base.cli_help import DefaultsHelpFormatter
from distill_base.serving_config import SERVER_CONF, ConfigError, ServingConfig

logger = logging.getLogger("teachers.serve")

DEFAULT_MAX_BODY_SIZE = 128 * 1024 * 1024
_WATCH_S = 0.1     # how often health follows the predictor workers

# Flags of Paddle Serving 0.9's ``serve`` that have no meaning here: accepted (any number of values) and ignored.
IGNORED_SERVING_FLAGS = (
    "runtime_thread_num", "batch_infer_size", "op", "use_calib", "use_encryption_model", "encryption_rpc_port",
    "use_ascend_cl", "product_name", "container_id", "gpu_multi_stream", "request_cache_size", "use_dist_model",
    "dist_carrier_id", "dist_cfg_file", "dist_endpoints", "dist_nranks", "dist_subgraph_index",
    "dist_worker_serving_endpoints", "dist_master_serving", "min_subgraph_size", "trt_workspace_size",
    "trt_use_static",
)


def _fd_limit() -> int:
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft > 0 else 1024


def port_number(value: str) -> int:
    """argparse type: a TCP port 0-65535 (0: any free port).

    Raises:
        argparse.ArgumentTypeError: not an integer in 0-65535.
    """
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


def at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (``--thread 0`` is an error, not silently 1)."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{number} is less than {minimum}")
        return number
    parse.__name__ = f"integer >= {minimum}"
    return parse


def seconds(value: str, allow_zero: bool = False) -> float:
    """argparse type: a finite number of seconds (or milliseconds, where the flag says so), > 0.

    Raises:
        argparse.ArgumentTypeError: not a finite number > 0 (>= 0 with ``allow_zero``).
    """
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"{value} is not a {'' if allow_zero else 'positive, '}finite number"
                                         f"{' >= 0' if allow_zero else ''}")
    return number


def wait_ms(value: str) -> float:
    """argparse type: a finite number of milliseconds >= 0."""
    return seconds(value, allow_zero=True)


def str2bool(value) -> bool:
    """``True/False/1/0/yes/no`` as Paddle Serving's flags take them (``--mem_optim True``).

    Raises:
        argparse.ArgumentTypeError: not one of the accepted spellings.
    """
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
        prog="python -m teachers.serve", allow_abbrev=False, formatter_class=DefaultsHelpFormatter,
        description="Serve a Paddle Serving model folder (written by teachers.export or paddle_serving_client) "
                    "with Paddle Inference, over Paddle Serving's gRPC and HTTP protocol. Boolean flags take "
                    "an optional True/False value (--mem_optim True, or just --ir_optim).")
    flag = {"type": str2bool, "nargs": "?", "const": True}
    g = p.add_argument_group("Paddle Serving flags")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="serving server folder (model files + serving_server_conf.prototxt); one model only "
                        "(Paddle Serving's model chaining, several DIRs, is refused)")
    g.add_argument("--port", type=port_number, default=9393, help="gRPC port (default: %(default)s)")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s; tests use 127.0.0.1)")
    g.add_argument("--thread", type=at_least(1), default=4,
                   help="number of predictor worker processes run in parallel, each a separate process loading its "
                        "own Paddle Inference predictor: a model's memory is paid once per worker "
                        "(default: %(default)s)")
    g.add_argument("--gpu_ids", default=[""], nargs="+", metavar="IDS",
                   help="GPU ids, comma and/or space separated (0,1 or 0 1); predictor workers are spread over them, "
                        "each seeing only its own GPU (CUDA_VISIBLE_DEVICES). Needs "
                        "the GPU wheel: with the CPU wheel a warning says they are ignored and the server runs on CPU")
    g.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="cpu or gpu (default: gpu when --gpu_ids is given and paddle has CUDA, else cpu); "
                        "--device gpu without CUDA is an error")
    g.add_argument("--workdir", default=None,
                   help="Paddle Serving's folder for generated C++ configs; accepted, nothing is written there")
    g.add_argument("--mem_optim", default=None, **flag,
                   help="Paddle Inference memory reuse between ops (default: on, where Paddle Inference offers it: "
                        "not for PIR models, model.json; asked for there, a warning says it is ignored)")
    g.add_argument("--mem_optim_off", action="store_true", help="same as --mem_optim False (0.9 spelling)")
    g.add_argument("--ir_optim", default=True, **flag,
                   help="Paddle Inference graph optimisation passes (default: True; oneDNN needs them)")
    g.add_argument("--use_mkl", default=True, **flag, help="oneDNN (MKL-DNN) kernels on CPU (default: True)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "bf16"],
                   help="inference precision; fp32 everywhere, bf16 on CPUs with oneDNN bf16 support; others "
                        "fall back to fp32 with a warning (default: %(default)s)")
    g.add_argument("--max_body_size", type=at_least(1), default=DEFAULT_MAX_BODY_SIZE,
                   help="largest request body in bytes, gRPC and HTTP, after gzip inflation (default: %(default)s "
                        "= 128 MiB; Paddle Serving's is 512 MiB)")
    g.add_argument("--enable_prometheus", default=False, **flag,
                   help="serve Prometheus metrics (distill_teacher_*) on GET /metrics at --prometheus_port")
    g.add_argument("--prometheus_port", type=port_number, default=19393, help="Prometheus port (default: %(default)s)")
    g.add_argument("--use_trt", default=False, **flag, help="TensorRT: not available here, warns when set")
    g.add_argument("--use_lite", default=False, **flag, help="Paddle Lite: not available here, warns when set")
    g.add_argument("--use_xpu", default=False, **flag, help="Kunlun XPU: not available here, warns when set")
    g.add_argument("--name", default=None, help="Paddle Serving web service name; accepted and logged")
    g.add_argument("--gpu_memory_mb", type=at_least(0), default=256,
                   help="GPU memory each predictor allocates at start, MB (default: %(default)s)")
    g.add_argument("--cpu_math_thread_num", type=at_least(1), default=1,
                   help="math library threads per predictor on CPU (default: %(default)s)")
    ig = p.add_argument_group(
        "Paddle Serving flags accepted and ignored",
        "These flags of paddle_serving_server.serve have no meaning for this server; they are accepted (with any "
        "values) so that Paddle Serving command lines keep working, and named in a warning: "
        + ", ".join(f"--{name}" for name in IGNORED_SERVING_FLAGS))
    for name in IGNORED_SERVING_FLAGS:
        ig.add_argument(f"--{name}", nargs="*", default=None, metavar="VALUE", help=argparse.SUPPRESS)

    o = p.add_argument_group("this server's flags")
    o.add_argument("--http_port", type=port_number, default=None,
                   help="also serve HTTP (POST /GeneralModelService/inference, GET /health) on this port")
    o.add_argument("--max_batch_size", type=at_least(0), default=64,
                   help="dynamic batching: merge concurrent requests up to this many samples per predictor run; "
                        "0 or 1 turns batching off (default: %(default)s). Only for batch-independent models: "
                        "see --merge_requests")
    o.add_argument("--merge_requests", choices=["auto", "yes", "no"], default="auto",
                   help="auto: at start, check that each output row depends on its own input row only (every row of "
                        "a random batch run alone equals the same row inside the batch) and merge requests only "
                        "then, logging why not; yes: merge without checking; no: never merge (Paddle Serving's "
                        "behaviour) (default: %(default)s)")
    o.add_argument("--predict_timeout", type=seconds, default=60.0,
                   help="seconds a request waits for its predictor run; then it gets err_no 6000, and a run taking "
                        "longer than this has its worker process killed and replaced; health says NOT_SERVING only "
                        "while no worker can serve (default: %(default)s)")
    o.add_argument("--worker_io", choices=["threads", "loop"], default="loop",
                   help="who talks to the predictor worker processes: 'loop', the event loop writes jobs to the "
                        "workers' sockets and reads their answers itself, no thread hand-off (about 100-200 us less "
                        "server CPU per request on 2 cores, the same or more samples/s: benchmarks/README.md, issue "
                        "20); 'threads', one runner thread per worker takes jobs from the event loop and hands "
                        "answers back (the server's design before issue 20) (default: %(default)s)")
    o.add_argument("--spare_worker", default=True, **flag,
                   help="keep one spare predictor worker process, its model loaded, that takes the place of a worker "
                        "that dies or is killed at once (a fresh start takes seconds); it costs one more copy of the "
                        "model's memory, on the first of --gpu_ids with GPUs (default: True)")
    o.add_argument("--http_max_connections", type=at_least(1), default=None,
                   help="most open HTTP connections; more are answered 503 and closed (default: a quarter of the "
                        "open-file limit, at most 256)")
    o.add_argument("--http_keepalive_timeout", type=seconds, default=15.0,
                   help="seconds an HTTP connection may stay without a complete request header, on connect and "
                        "between requests (default: %(default)s)")
    o.add_argument("--http_body_timeout", type=seconds, default=30.0,
                   help="seconds an HTTP request body may take to arrive (default: %(default)s)")
    o.add_argument("--batch_timeout_ms", type=wait_ms, default=2.0,
                   help="dynamic batching: wait at most this long after a request for others to join it "
                        "(default: %(default)s)")
    t = p.add_argument_group("transport security (docs/security.md)")
    t.add_argument("--tls_cert", default=None, metavar="FILE",
                   help="PEM certificate (chain) to serve gRPC and HTTP over TLS; with --tls_key")
    t.add_argument("--tls_key", default=None, metavar="FILE", help="PEM private key of --tls_cert")
    t.add_argument("--tls_client_ca", default=None, metavar="FILE",
                   help="PEM CA: require client certificates signed by it on gRPC and HTTP (mutual TLS)")
    t.add_argument("--token_file", default=None, metavar="FILE",
                   help="file holding a bearer token every request must carry (gRPC metadata 'authorization: "
                        "Bearer <token>', the HTTP Authorization header); health checks stay open. A file, never "
                        "the command line, where other users see it; students give it as DistillReader(token=) "
                        "or $DISTILL_TEACHER_TOKEN")
    o.add_argument("--drain_timeout", type=seconds, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM; the server exits within this "
                        "whatever its clients do: code 0, or 3 when a predictor run was still stuck "
                        "(default: %(default)s)")
    o.add_argument("--stats_interval", type=seconds, default=60.0,
                   help="seconds between request count / latency log lines (default: %(default)s)")
    o.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default: %(default)s)")

    add_zk_arguments(p, required=False)   # --zk, --service, --root/--zk_root, --zk_auth, --session_timeout, ...
    zk_group = next((grp for grp in p._action_groups if any(a.dest == "zk" for a in grp._group_actions)), p)
    zk_group.add_argument("--advertise_host", default=None,
                          help="host to register in ZooKeeper (default: --host, or this machine's address when "
                               "--host is 0.0.0.0)")
    return p



def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; an unknown (or abbreviated) flag exits with code 2 naming it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [x for x in extra if not x.startswith("-")]
        why = (" (--model takes one DIR: this server serves one model folder, Paddle Serving's model chaining is "
               "not supported)" if stray and len(stray) == len(extra) else "")
        parser.error(f"unrecognized arguments: {' '.join(extra)}{why}")
    args.model = [args.model]   # TeacherService takes the list Paddle Serving's --model gives
    args.gpu_ids = ",".join(str(v) for v in args.gpu_ids if str(v) != "")
    return args


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
    """GPU ids to use ([] = CPU), warning about every flag that cannot be honoured.

    Raises:
        ServeError: ``--device gpu`` on a CPU build of paddle, or a ``--gpu_ids`` entry this machine does not have.
    """
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


def warn_unsupported(args: argparse.Namespace, on_gpu: bool) -> str:
    """Log every flag that is accepted but cannot be honoured; returns the precision actually used."""
    for flag_name in ("use_trt", "use_lite", "use_xpu"):
        if getattr(args, flag_name):
            logger.warning("--%s: not available in this server (Paddle Inference CPU/GPU only); ignored", flag_name)
    ignored = [f"--{name}" for name in IGNORED_SERVING_FLAGS if getattr(args, name, None) is not None]
    if ignored:
        logger.warning("Paddle Serving flags without meaning for this server, ignored: %s", " ".join(ignored))
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


def _warn_mem_optim(args: argparse.Namespace, model_dir: str) -> None:
    """--mem_optim True given for a PIR model (model.json): Paddle Inference cannot memory-optimize it."""
    if not args.mem_optim or args.mem_optim_off:
        return
    from .predictor_pool import ModelFilesError, find_model_files

    try:
        model_file, _ = find_model_files(model_dir)
    except ModelFilesError:
        return  # reported when the predictors are created
    if model_file.endswith(".json"):
        logger.warning("--mem_optim: Paddle Inference cannot memory-optimize PIR model %s (paddle 3's model.json); "
                       "ignored", model_file)


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


# Seconds a start-up run (warm-up, batch-independence check) may take, whatever --predict_timeout says: a first
# run allocates and optimises and is slower than the runs the user's bound is meant for.
STARTUP_RUN_TIMEOUT = 300.0


def _startup_run(pool, predict_timeout: float):
    """``pool.run`` for the server's own start-up runs: bounded by the longer of STARTUP_RUN_TIMEOUT and
    --predict_timeout, never by a --predict_timeout shorter than a first run."""
    return functools.partial(pool.run, run_timeout=max(STARTUP_RUN_TIMEOUT, predict_timeout))


def _warm_up(run, config: ServingConfig) -> None:
    if any(s.is_lod_tensor or any(d < 0 for d in s.shape) for s in config.feeds):
        return
    feeds = {s.name: np.zeros((1, *s.shape), dtype=s.dtype) for s in config.feeds}
    run(feeds, [s.name for s in config.fetches])


def decide_merging(args: argparse.Namespace, run, config: ServingConfig) -> bool:
    """Whether concurrent requests may be merged into one predictor run (logged with the reason); ``run`` is
    ``pool.run`` (or ``_startup_run``'s form of it)."""
    from .batch_check import check_batch_independence

    if args.max_batch_size <= 1 or args.merge_requests == "no":
        logger.info("dynamic batching off (%s)", "--merge_requests no" if args.merge_requests == "no"
                    else f"--max_batch_size {args.max_batch_size}")
        return False
    if args.merge_requests == "yes":
        logger.info("dynamic batching on without checking the model (--merge_requests yes)")
        return True
    verdict = check_batch_independence(run, config)
    if verdict.independent:
        logger.info("dynamic batching on: the model is batch-independent (%s)", verdict.reason)
    else:
        logger.warning("dynamic batching off: merging requests could change answers of this model: %s "
                       "(--merge_requests yes forces merging)", verdict.reason)
    return verdict.independent


def _require_paddle() -> None:
    """ImportError naming the extras when paddle is not installed, without importing it: the server process
    itself never needs paddle on CPU (its workers load it), and paddle costs it ~300 MB."""
    import importlib.util

    try:
        found = importlib.util.find_spec("paddle") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        from distill_base.paddle_compat import import_paddle

        import_paddle("teachers.serve")   # raises the ImportError that names both extras


def _cuda_devices(args: argparse.Namespace) -> tuple[bool, int]:
    """(paddle has CUDA, GPU count); paddle is imported here only when the flags ask for a GPU."""
    if args.device != "gpu" and not _gpu_ids(args.gpu_ids):
        return False, 0
    from distill_base.paddle_compat import import_paddle

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    paddle = import_paddle("teachers.serve")
    root.setLevel(level)           # importing paddle sets the root logger to WARNING
    root.handlers[:] = handlers
    has_cuda = paddle.is_compiled_with_cuda()
    return has_cuda, paddle.device.cuda.device_count() if has_cuda else 0


class TeacherService:
    """Everything one ``teachers.serve`` process runs: ``load`` (blocking), then in the event loop ``start``,
    and ``drain`` at the end."""

    def __init__(self, args: argparse.Namespace):
        """Check the arguments.

        Raises:
            ServeError: more than one ``--model``, a bad serving config, or a bad option (the ValueError's message).
        """
        from .predictor_pool import PredictorOptions
        from .security import TransportSecurity

        self.args = args
        if len(args.model) != 1:
            raise ServeError(f"--model {' '.join(args.model)}: this server serves one model folder, "
                             f"got {len(args.model)} (Paddle Serving's model chaining is not supported)")
        self.model_dir = args.model[0]
        try:
            self.config = ServingConfig.load(os.path.join(self.model_dir, SERVER_CONF))
        except ConfigError as exc:
            raise ServeError(str(exc)) from None
        has_cuda, gpu_count = _cuda_devices(args)
        self.gpu_ids = resolve_device(args, has_cuda, gpu_count)
        precision = warn_unsupported(args, bool(self.gpu_ids))
        _warn_mem_optim(args, self.model_dir)
        self.options = PredictorOptions(
            model_dir=self.model_dir, size=args.thread, gpu_ids=self.gpu_ids, use_mkl=args.use_mkl,
            ir_optim=args.ir_optim, mem_optim=args.mem_optim is not False and not args.mem_optim_off,
            precision=precision,
            math_threads=args.cpu_math_thread_num, gpu_mem_mb=args.gpu_memory_mb)
        try:
            self.security = TransportSecurity.from_args(args)
        except ValueError as exc:
            raise ServeError(str(exc)) from None
        self.registration = None
        self.pool = None
        self.grpc = None
        self.stats = None
        self.batcher = None
        self.http = None
        self.metrics_front = None
        self.metrics = None
        self.serving = False
        self._wedged = False
        self._watchdog: Optional[asyncio.Task] = None

    @property
    def device(self) -> str:
        if self.gpu_ids:
            return f"gpu {','.join(map(str, self.gpu_ids))}"
        return "cpu (oneDNN)" if self.options.use_mkl else "cpu"

    def load(self) -> None:
        """Start the predictor worker processes, check the model, decide on merging (blocking; before the loop
        serves).

        Raises:
            ServeError: a worker cannot load the model, or the config names inputs/outputs the model does not have.
        """
        from .batcher import DynamicBatcher, LoopBatcher
        from .errors import WorkerLoadError
        from .metrics import TeacherMetrics
        from .stats import RequestStats
        from .worker_pool import WorkerPool

        args = self.args
        self._started = time.monotonic()
        self.metrics = TeacherMetrics()
        self.pool = WorkerPool(self.options, predict_timeout=args.predict_timeout, on_run=self.metrics.observe_run,
                               spare=args.spare_worker)
        try:
            self.pool.start()
        except WorkerLoadError as exc:
            raise ServeError(str(exc)) from None
        missing = [s.name for s in self.config.feeds if s.name not in self.pool.input_names] + \
                  [s.name for s in self.config.fetches if s.name not in self.pool.output_names]
        if missing:
            raise ServeError(f"{self.model_dir}: config names {missing} are not inputs/outputs of the model "
                             f"(inputs {self.pool.input_names}, outputs {self.pool.output_names})")
        startup_run = _startup_run(self.pool, args.predict_timeout)
        _warm_up(startup_run, self.config)
        merge = decide_merging(args, startup_run, self.config)
        self.stats = RequestStats(args.stats_interval)
        if args.worker_io == "loop":
            self.batcher = LoopBatcher(self.pool, args.max_batch_size if merge else 1, args.batch_timeout_ms,
                                       predict_timeout=args.predict_timeout)
        else:
            self.batcher = DynamicBatcher(self.pool.run, args.max_batch_size if merge else 1, args.batch_timeout_ms,
                                          runners=self.pool.size, predict_timeout=args.predict_timeout)
        self.metrics.track_queue(lambda: self.batcher.queue_depth)
        self.metrics.track_runs(self.pool.runs_in_progress)

    def observe(self, transport: str, err_no: str, seconds: float, samples: int) -> None:
        self.stats.observe(seconds, samples, err_no == "0")
        self.metrics.observe_request(transport, err_no, seconds, samples)

    async def start(self) -> None:
        from .grpc_front import GrpcTeacherServer
        from .http_front import HttpFront
        from .inference import InferenceHandler

        args = self.args
        if hasattr(self.batcher, "bind"):   # --worker_io loop: runs driven from this loop from now on
            self.batcher.bind(asyncio.get_running_loop())
        handler = InferenceHandler(self.config, run=self.batcher.submit, submit=self.batcher.submit_to_loop,
                                   predict_timeout=args.predict_timeout)
        self.grpc = GrpcTeacherServer(handler, args.host, args.port, args.max_body_size, observe=self.observe,
                                      security=self.security, max_concurrent_rpcs=max(64, 16 * self.pool.size))
        max_connections = args.http_max_connections or max(16, min(256, _fd_limit() // 4))
        if args.http_port is not None:
            self.http = HttpFront(handler, args.host, args.http_port, args.max_body_size, metrics=self.metrics,
                                  observe=self.observe, security=self.security, max_connections=max_connections,
                                  keepalive_timeout=args.http_keepalive_timeout, body_timeout=args.http_body_timeout,
                                  request_timeout=args.predict_timeout + args.http_body_timeout + 30)
        if args.enable_prometheus:
            self.metrics_front = HttpFront(None, args.host, args.prometheus_port, 1024, metrics=self.metrics,
                                           security=self.security, max_connections=16)
        await self.grpc.start()
        for front in (self.http, self.metrics_front):
            if front is not None:
                await front.start()
        self._set_serving_flag(True)
        self.stats.start_logging()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_predictors())
        batching = (f"dynamic batching up to {args.max_batch_size} samples, {args.batch_timeout_ms} ms"
                    if self.batcher.merging else "dynamic batching off")
        logger.info("serving model %s (feeds %s, fetches %s) on %s:%d gRPC%s%s (%s); device %s, %d predictor(s), "
                    "%s; ready in %.2fs", os.path.abspath(self.model_dir), self.config.feed_names,
                    self.config.fetch_names, args.host, self.grpc.port,
                    f", HTTP :{self.http.port}" if self.http else "",
                    f", Prometheus :{self.metrics_front.port}/metrics" if self.metrics_front else "",
                    self.security.describe(), self.device, self.pool.size, batching,
                    time.monotonic() - self._started)
        if args.zk:
            self._register()

    def _set_serving_flag(self, serving: bool) -> None:
        self.serving = serving
        self.metrics.serving.set(1 if serving else 0)
        for front in (self.http, self.metrics_front):
            if front is not None:
                front.set_serving(serving)

    async def _set_serving(self, serving: bool) -> None:
        self._set_serving_flag(serving)
        await self.grpc.set_serving(serving)

    async def _watch_predictors(self) -> None:
        """Health NOT_SERVING while no predictor worker can serve (all dead, restarting or past
        --predict_timeout); SERVING again as soon as one can."""
        while True:
            await asyncio.sleep(_WATCH_S)
            try:
                ready = self.pool.ready_workers()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one bad reading
                logger.exception("cannot count the ready predictor workers")
                continue
            if ready == 0 and not self._wedged:
                self._wedged = True
                logger.error("no predictor worker can serve (all %d dead, restarting or running past "
                             "--predict_timeout %gs): health NOT_SERVING until one can", self.pool.size,
                             self.args.predict_timeout)
                await self._set_serving(False)
            elif ready > 0 and self._wedged:
                self._wedged = False
                logger.warning("%d of %d predictor worker(s) ready: health SERVING again", ready, self.pool.size)
                await self._set_serving(True)

    def _register(self) -> None:
        args = self.args
        if not args.service:
            raise ServeError("--zk needs --service NAME (the teacher service to register under)")
        endpoint = f"{_advertise_host(args)}:{self.grpc.port}"
        meta = {"model": os.path.basename(os.path.abspath(self.model_dir)), "device": self.device,
                "thread": self.pool.size, "max_batch_size": args.max_batch_size if self.batcher.merging else 1,
                "feeds": self.config.feed_names, "fetches": self.config.fetch_names, "pid": os.getpid()}
        if self.http is not None:
            meta["http_port"] = self.http.port
        if self.security.tls:
            meta["tls"] = True       # students connect with TLS (discovery.student leaves it out otherwise)
        try:
            # the process knows whether it serves: no probe through its own (possibly TLS-only) port
            self.registration = registration_from_args(args, endpoint, meta, health_check=lambda: self.serving)
        except ValueError as exc:     # e.g. no ZooKeeper identity and no --allow_open_acl
            raise ServeError(str(exc)) from None
        logger.info("registering %s as service %r in ZooKeeper %s%s in the background (a 'registered' line "
                    "follows once the node exists)", endpoint, args.service, args.zk, args.root)
        self.registration.start()

    async def drain(self, quiet: bool = False) -> bool:
        """Deregister, refuse new requests, let in-flight ones finish, stop everything, all within
        --drain_timeout. Returns False when a predictor run was still stuck at the end. ``quiet``: after a failed
        start, no "draining" / "stopped after" lines (nothing was served)."""
        started = time.monotonic()
        deadline = started + max(0.0, self.args.drain_timeout)
        left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        loop = asyncio.get_running_loop()
        if not quiet:
            logger.info("draining: no new requests, waiting up to %.0fs for in-flight ones",
                        self.args.drain_timeout)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.registration is not None:
            try:
                await asyncio.wait_for(loop.run_in_executor(None, self.registration.stop), min(5.0, left()))
            except Exception:  # noqa: BLE001 - ZooKeeper trouble must not block the drain
                logger.exception("ZooKeeper deregistration failed")
        clean = True
        if self.grpc is not None:
            await self._set_serving(False)
            # Health says NOT_SERVING now; give requests already on the wire a moment to reach their handler
            # (a busy event loop may not have started them yet) before gRPC stops taking new ones.
            await asyncio.sleep(min(0.5, left() / 4))
            stops = [self.grpc.stop(left())]
            if self.http is not None:
                stops.append(self.http.stop(left()))
            try:
                await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), left() + 1.0)
            except asyncio.TimeoutError:
                logger.warning("transports did not stop within --drain_timeout")
        if self.batcher is not None:
            if hasattr(self.batcher, "aclose"):
                clean = await self.batcher.aclose(left())
            else:
                clean = await loop.run_in_executor(None, self.batcher.close, left())
            if not clean:
                logger.error("a predictor run is still stuck after --drain_timeout; its worker is killed")
        if self.pool is not None:
            await loop.run_in_executor(None, self.pool.close, min(2.0, left()))
        if self.metrics_front is not None:
            await self.metrics_front.stop(1.0)
        if self.stats is not None and quiet:
            self.stats.stop()
        elif self.stats is not None:
            self.stats.stop()
            batched = (f"; {self.batcher.runs} predictor runs for {self.stats.total_requests} requests"
                       if self.batcher is not None and self.batcher.merging else "")
            logger.info("stopped after %d requests (%d errors) in total%s; drain took %.2fs",
                        self.stats.total_requests, self.stats.total_errors, batched, time.monotonic() - started)
        return clean


async def _serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    service = None
    try:
        service = TeacherService(args)   # imports paddle when a GPU is asked for: paddle installs its own
        for sig in (signal.SIGTERM, signal.SIGINT):    # SIGTERM handler then, so ours go in after it
            loop.add_signal_handler(sig, stop.set)
        service.load()
        await service.start()
    except Exception as exc:  # noqa: BLE001 - every start failure is logged and exits 2
        if isinstance(exc, (ServeError, OSError)):
            logger.error("%s", exc)
        else:
            logger.exception("cannot start the teacher server")
        if service is not None:
            await service.drain(quiet=True)   # nothing was served: stop what started, without drain lines
        return 2
    await stop.wait()
    return 0 if await service.drain() else 3


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    _require_paddle()

    logging.basicConfig(level=getattr(logging, args.log_level), force=True,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    # With --worker_io threads the event loop hands work to batch runners and back: switch the GIL faster than 5 ms.
    sys.setswitchinterval(0.0005)
    code = asyncio.run(_serve(args))
    if code == 3:  # a predictor thread is stuck in native code: do not wait for it at interpreter exit
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
