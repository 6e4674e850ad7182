"""Shared fixtures for real teacher servers (``python -m teachers.serve`` subprocesses on Paddle Inference).

- ``save_static_model(dirname)`` / ``save_jit_model(dirname)``: a small deterministic MNIST-shaped CNN
  (input ``img`` [N, 1, 28, 28] float32, softmax output [N, 10]) saved with
  ``paddle.static.save_inference_model`` / ``paddle.jit.save``.
- ``export_teacher(src_dir, out_dir)``: the Paddle Serving folders (fetch alias ``prediction``).
- fixtures ``teacher_model`` / ``teacher_model_jit`` (session): an ``ExportedTeacher``.
- ``TeacherServer``: a real server subprocess on a free loopback port, ready when gRPC health says SERVING.
- fixture ``teacher_server`` (session): a running TeacherServer of ``teacher_model`` with HTTP enabled.
- ``reference_predict(server_dir, images)``: local Paddle Inference predictions to compare with.
- ``mnist_like_images(n, seed)``: deterministic float32 inputs.

Example::

    def test_x(teacher_model, tmp_path):
        with TeacherServer(teacher_model.server_dir) as server:
            client = TeacherClient(server.endpoint, teacher_model.client_conf)
            out = client.predict({"img": mnist_like_images(4)})
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np  # (numpy before paddle: paddle 2.6.2 exports zlib symbols)
import pytest

from tests.support.procs import REPO_ROOT, ProcessGuard, free_port, pid_alive, port_is_open, wait_for

FEED = "img"
FETCH = "prediction"
IMAGE_SHAPE = (1, 28, 28)
SERVER_START_TIMEOUT = 60.0


# -- model ----------------------------------------------------------------------------------------------
def build_mnist_cnn(seed: int = 0, width: int = 1):
    """(main_program, startup_program, img_var, prediction_var) of a small static-graph CNN.

    ``width`` multiplies the conv filters (8 and 16): a heavier teacher for benchmarks. Built with ``paddle.nn``
    layers, which work in both static modes: a legacy program on paddle 2.6 (or paddle 3 with
    FLAGS_enable_pir_api=0), a PIR program on paddle 3."""
    import paddle

    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    main.random_seed = startup.random_seed = 1000 + seed  # random_seed 0 would mean "not fixed"
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        relu, pool = paddle.nn.functional.relu, paddle.nn.functional.max_pool2d
        img = paddle.static.data(FEED, [None, *IMAGE_SHAPE], "float32")
        x = pool(relu(paddle.nn.Conv2D(1, 8 * width, 5)(img)), kernel_size=2, stride=2)
        x = pool(relu(paddle.nn.Conv2D(8 * width, 16 * width, 5)(x)), kernel_size=2, stride=2)
        logits = paddle.nn.Linear(16 * width * 4 * 4, 10)(paddle.flatten(x, 1))
        prediction = paddle.nn.functional.softmax(logits)
    return main, startup, img, prediction


def save_static_model(dirname: str, seed: int = 0, width: int = 1) -> str:
    """Save the CNN with ``paddle.static.save_inference_model`` as ``dirname/model.pdmodel`` (+ .pdiparams), or
    ``dirname/model.json`` (+ .pdiparams) on paddle 3 in PIR mode."""
    import paddle

    main, startup, img, prediction = build_mnist_cnn(seed, width)
    scope = paddle.static.Scope()
    exe = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(scope):
        exe.run(startup)
        paddle.static.save_inference_model(os.path.join(dirname, "model"), [img], [prediction], exe, program=main)
    paddle.disable_static()
    return dirname


def save_jit_model(dirname: str, seed: int = 0) -> str:
    """Save the same architecture with ``paddle.jit.save`` as ``dirname/inference.pdmodel`` (+ .pdiparams), or
    ``dirname/inference.json`` (+ .pdiparams) on paddle 3 in PIR mode."""
    import paddle

    paddle.disable_static()
    paddle.seed(seed)

    class MnistCnn(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv1 = paddle.nn.Conv2D(1, 8, 5)
            self.conv2 = paddle.nn.Conv2D(8, 16, 5)
            self.fc = paddle.nn.Linear(16 * 4 * 4, 10)

        def forward(self, img):
            x = paddle.nn.functional.max_pool2d(paddle.nn.functional.relu(self.conv1(img)), 2, 2)
            x = paddle.nn.functional.max_pool2d(paddle.nn.functional.relu(self.conv2(x)), 2, 2)
            return paddle.nn.functional.softmax(self.fc(paddle.flatten(x, 1)))

    layer = MnistCnn()
    layer.eval()
    spec = [paddle.static.InputSpec([None, *IMAGE_SHAPE], "float32", name=FEED)]
    paddle.jit.save(layer, os.path.join(dirname, "inference"), input_spec=spec)
    return dirname


@dataclass(frozen=True)
class ExportedTeacher:
    """Paddle Serving folders of one exported model."""

    server_dir: str     # model files + serving_server_conf.prototxt: pass to TeacherServer / --model
    client_dir: str
    client_conf: str    # serving_client_conf.prototxt: pass to TeacherClient
    route: str          # "static" or "jit"


def export_teacher(src_dir: str, out_dir: str, route: str) -> ExportedTeacher:
    """Convert an inference model folder with ``teachers.export.inference_model_to_serving``."""
    from teachers.export import inference_model_to_serving

    server_dir, client_dir = os.path.join(out_dir, "serving_server"), os.path.join(out_dir, "serving_client")
    inference_model_to_serving(src_dir, server_dir, client_dir, fetch_alias_names=FETCH)
    return ExportedTeacher(server_dir, client_dir, os.path.join(client_dir, "serving_client_conf.prototxt"), route)


def save_counting_model(dirname: str) -> tuple[str, str]:
    """y = x (float32, [N, 1]) after a while loop counting (in float32) up to max(x): a prediction as long as the
    caller asks, and x >= 2**24 never ends (a wedged predictor). Saved as Paddle Serving folders under ``dirname``;
    returns (server_dir, client_dir)."""
    import paddle

    from teachers.export import save_model

    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        x = paddle.static.data("x", [None, 1], "float32")
        limit = paddle.max(x)
        (count,) = paddle.static.nn.while_loop(lambda i: i < limit, lambda i: [i + 1.0],
                                               [paddle.full([1], 0.0, "float32")])
        y = x + count * 0.0
    server_dir, client_dir = os.path.join(dirname, "server"), os.path.join(dirname, "client")
    save_model(server_dir, client_dir, {"x": x}, {"y": y}, main)
    paddle.disable_static()
    return server_dir, client_dir


def mnist_like_images(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic float32 images [n, 1, 28, 28] in [0, 1]."""
    return np.random.default_rng(seed).random((n, *IMAGE_SHAPE), dtype=np.float32)


_REFERENCE_PREDICTORS: dict = {}
# the tests' local predictors run on this one thread: a test's threads may ask for references at once, and a
# predictor run from many threads in turn failed in oneDNN ("could not execute a primitive", paddle 2.6.2)
REFERENCE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-predictor")


def reference_predict(server_dir: str, images: np.ndarray) -> np.ndarray:
    """Predictions of a local Paddle Inference predictor (oneDNN, as the server) for ``images`` (run on
    ``REFERENCE_THREAD``, whichever thread asks)."""
    return REFERENCE_THREAD.submit(_reference_predict, server_dir, images).result()


def _reference_predict(server_dir: str, images: np.ndarray) -> np.ndarray:
    from teachers.predictor_pool import PredictorOptions, PredictorPool

    key = os.path.abspath(server_dir)
    if key not in _REFERENCE_PREDICTORS:
        _REFERENCE_PREDICTORS[key] = PredictorPool(PredictorOptions(model_dir=server_dir, size=1))
    pool = _REFERENCE_PREDICTORS[key]
    out = pool.run({pool.input_names[0]: np.asarray(images, dtype=np.float32)}, pool.output_names[:1])
    return out[pool.output_names[0]][0]


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory) -> ExportedTeacher:
    """The CNN saved with paddle.static.save_inference_model and exported for serving."""
    root = tmp_path_factory.mktemp("teacher_static")
    src = save_static_model(str(root / "inference_model"))
    return export_teacher(src, str(root), "static")


@pytest.fixture(scope="session")
def teacher_model_jit(tmp_path_factory) -> ExportedTeacher:
    """The CNN saved with paddle.jit.save and exported for serving."""
    root = tmp_path_factory.mktemp("teacher_jit")
    src = save_jit_model(str(root / "jit_model"))
    return export_teacher(src, str(root), "jit")


# -- server process ---------------------------------------------------------------------------------------
def grpc_health(endpoint: str, timeout: float = 0.5, security=None) -> Optional[str]:
    """The health status name ("SERVING", "NOT_SERVING", ...) of ``endpoint``, or None when unreachable.
    ``security``: a ``ClientSecurity`` for a server that serves TLS."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from distill_base.client_security import ClientSecurity

    with (security or ClientSecurity()).grpc_channel(endpoint, []) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout)
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


class _PortTaken(AssertionError):
    """The server could not bind the port drawn for it: another process took it after it was drawn."""


class TeacherServer:
    """A real ``python -m teachers.serve`` subprocess on 127.0.0.1; always stopped on exit.

    Args:
        model_dir: serving server folder.
        http: also serve HTTP on a second free port (``.http_endpoint``).
        thread, max_batch_size, batch_timeout_ms: passed as flags.
        extra_args: more command-line flags.
        spare: keep the server's spare predictor worker (``--spare_worker``, on by default in ``teachers.serve``).
            Off here unless a test replaces workers: each spare loads the model once more, a third of the suite's
            model loads on this machine's two cores.
        port: the gRPC port (default: a free one).
        health_security: ``ClientSecurity`` for the readiness check of a server started with ``--tls_cert``.

    ``.endpoint`` ("127.0.0.1:PORT"), ``.pid``, ``.worker_pids()`` (its predictor worker processes), ``.wait_spare()``,
    ``.kill(sig)``, ``.wait_exit(timeout) -> returncode``, ``.restart()`` (same ports), ``.stop()``, ``.log()``
    (the server's output so far).
    """

    def __init__(self, model_dir: str, http: bool = False, thread: int = 2, max_batch_size: int = 64,
                 batch_timeout_ms: float = 2.0, extra_args: Sequence[str] = (), port: Optional[int] = None,
                 spare: bool = False, start_timeout: float = SERVER_START_TIMEOUT, health_security=None):
        self.model_dir = model_dir
        self.health_security = health_security
        self._picked_port = port is None          # a port of our own choosing may be re-drawn if taken
        self.port = port or free_port()
        self.http_port = free_port() if http else None
        self.args = ["-m", "teachers.serve", "--model", model_dir, "--host", "127.0.0.1", "--port", str(self.port),
                     "--thread", str(thread), "--max_batch_size", str(max_batch_size),
                     "--batch_timeout_ms", str(batch_timeout_ms), "--spare_worker", str(spare), *extra_args]
        if self.http_port:
            self.args += ["--http_port", str(self.http_port)]
        self.start_timeout = start_timeout
        self._guard = ProcessGuard()
        self._logdir = tempfile.mkdtemp(prefix="teacher_server_")
        self._log_path = os.path.join(self._logdir, "server.log")
        self.proc: Optional[subprocess.Popen] = None
        self.start_seconds = 0.0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> Optional[str]:
        return f"127.0.0.1:{self.http_port}" if self.http_port else None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def start(self) -> TeacherServer:
        """Start the server and wait until it is SERVING. A port this object drew itself (no ``port=``) that
        another process took in the meantime is drawn again (up to 3 times); any other exit is an AssertionError
        with the server's log."""
        for attempt in range(3):
            try:
                return self._start_once()
            except _PortTaken:
                if attempt == 2:
                    raise
                self.port = free_port()
                self.args[self.args.index("--port") + 1] = str(self.port)
                if self.http_port:
                    self.http_port = free_port()
                    self.args[self.args.index("--http_port") + 1] = str(self.http_port)
        raise AssertionError("unreachable")

    def _start_once(self) -> TeacherServer:
        started = time.monotonic()
        logged_before = len(self.log())
        log = open(self._log_path, "ab")
        try:
            self.proc = self._guard.python(*self.args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        finally:
            log.close()
        deadline = started + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                problem = (f"teacher server exited with {self.proc.returncode} while starting:\n"
                           f"{self.log()[-3000:]}")
                if self._picked_port and "cannot bind" in self.log()[logged_before:]:
                    raise _PortTaken(problem)
                raise AssertionError(problem)
            if grpc_health(self.endpoint, timeout=0.5, security=self.health_security) == "SERVING":
                self.start_seconds = time.monotonic() - started
                return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"teacher server on {self.endpoint} not SERVING after {self.start_timeout}s:\n"
                             f"{self.log()[-3000:]}")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the server process."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end; returns its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> Optional[int]:
        """SIGTERM (then SIGKILL after 10 s); returns the exit code."""
        code = None
        if self.proc is not None:
            self._guard.close()
            code = self.proc.returncode
        return code

    def restart(self) -> TeacherServer:
        """Stop the server (if running) and start it again on the same ports."""
        self.stop()
        wait_for(lambda: not port_is_open(self.port), 10, f"port {self.port} released")
        return self.start()

    def worker_pids(self, spare: bool = False) -> list[int]:
        """Pids of the server's predictor worker processes (``python -m teachers.predictor_worker``), sorted;
        with ``spare``, of its spare worker instead (a worker is named ``dr-worker-N`` once told its model, a
        spare ``dr-spare``)."""
        found = []
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/children") as f:
                    children = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                continue
            for child in children:
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        if b"teachers.predictor_worker" not in f.read():
                            continue
                    with open(f"/proc/{child}/comm") as f:
                        if f.read().startswith("dr-worker") != spare:   # named so once it has its model
                            found.append(child)
                except FileNotFoundError:
                    pass
        return sorted(found)

    def wait_spare(self, timeout: float = 60.0) -> None:
        """Wait until the server's spare worker has loaded the model (its loading then takes no CPU from what
        follows: benchmarks, timed restarts)."""
        wait_for(lambda: "spare predictor worker loaded the model" in self.log(), timeout, "the spare worker ready",
                 interval=0.02)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and pid_alive(self.proc.pid)

    def log(self) -> str:
        try:
            with open(self._log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def __enter__(self) -> TeacherServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._logdir, ignore_errors=True)


@pytest.fixture(scope="session")
def teacher_server(teacher_model):
    """A running TeacherServer (gRPC + HTTP) of ``teacher_model``, shared by the session. Do not kill it."""
    with TeacherServer(teacher_model.server_dir, http=True) as server:
        yield server


__all__ = ["FEED", "FETCH", "ExportedTeacher", "TeacherServer", "build_mnist_cnn", "export_teacher", "grpc_health",
           "mnist_like_images", "reference_predict", "save_jit_model", "save_static_model"]


# -- a reader of the MNIST-like teacher and its epochs, checked sample by sample ---------------------------
def mnist_reader(teacher_model: ExportedTeacher, endpoints, batch: int, **options):
    """A ``DistillReader`` of ``teacher_model`` (ins img, label; predicts prediction) on the fixed ``endpoints``
    (None: set later, e.g. ``set_dynamic_teacher``), teacher batch size ``batch``."""
    from distill_reader import DistillReader

    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], **options)
    if endpoints is not None:
        dr.set_fixed_teacher(endpoints)
    dr.set_serving_conf_file(teacher_model.client_conf)
    dr.set_teacher_batch_size(batch)
    return dr


def image_batches(images: np.ndarray, size: int):
    """A batch generator factory over ``images``: (images, their indices as labels) ``size`` at a time."""
    return lambda: ((images[i:i + size], np.arange(i, min(i + size, len(images)))) for i in range(0, len(images), size))


def check_epoch(out: list, images: np.ndarray, ref: np.ndarray) -> None:
    """Every sample of an epoch of ``image_batches`` exactly once, in order, with the model's prediction
    ``ref``: checked sample by sample."""
    labels = np.concatenate([b[1] for b in out]).tolist()
    assert labels == list(range(len(images))), "each sample once, in order"
    predictions = np.concatenate([b[2] for b in out])
    for i in range(len(images)):
        np.testing.assert_allclose(predictions[i], ref[i], rtol=1e-5, atol=1e-6, err_msg=f"sample {i}")

@pytest.fixture(scope="session")
def teacher(teacher_model) -> Iterator[TeacherServer]:
    """One real teacher server of ``teacher_model``, shared by the test files that only send it requests.

    A test that stops, freezes, restarts or cuts off its teacher starts its own ``TeacherServer`` instead.
    """
    with TeacherServer(teacher_model.server_dir) as server:
        yield server

