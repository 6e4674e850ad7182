"""Teacher server throughput against the raw Paddle Inference predictor, measured side by side in one run.

1. batch 32, 8 concurrent gRPC clients: server samples/s vs the raw predictor's (goal >= 0.8; 0.9 for width 8);
2. batch 1, 8 concurrent clients: dynamic batching on vs off (goal >= 2x);
3. server CPU per request beyond the predictor (batching off, so each request is one predictor run): the CPU
   time (/proc/PID/stat) of the server process and its predictor worker processes during a measurement divided
   by the requests answered, minus the CPU time the predictor runs took meanwhile (the workers measure each run's
   CPU, all its threads: the server's distill_teacher_predictor_cpu_seconds_total metric)
   (goal <= 300 us); also minus the raw predictor's CPU per run measured alone in a tight loop, which is lower
   (warm caches) and so gives a larger "beyond".

Clients run in separate processes (so their Python work does not share the benchmark's GIL) on the same machine
as the server. The load generator (``--client raw``, the default for the goal figures) sends one request
encoded once with ``tensor_codec`` through a grpc channel's ``unary_unary`` with no (de)serializers, as
perf_analyzer or ghz do, and parses each answer only to check its ``err_no`` (the first answer of each client
is also compared with the raw predictor's values): the clients take as little of the shared cores as a gRPC
client can. ``--client teacher`` uses ``TeacherClient.predict`` (what a student pays); ``both`` (default) adds
TeacherClient runs of the batch-32 and batch-1 measurements as user-facing figures.

    python benchmarks/bench_teacher_server.py [--seconds 3] [--thread 2] [--clients 8] [--width 1]
        [--client both|raw|teacher] [--baseline DIR] [--worker_io threads|loop]   # DIR: another checkout,
        # measured in the same run, with its --worker_io from [--baseline_worker_io threads|loop]

The scaling part (raw predictor as N processes, --thread N vs 1, health during a long prediction) is
benchmarks/bench_teacher_scaling.py.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.procs import free_port  # noqa: E402
from tests.support.teacher import (  # noqa: E402
    ExportedTeacher,
    TeacherServer,
    export_teacher,
    mnist_like_images,
    reference_predict,
    save_static_model,
)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_predictor_rate(server_dir: str, batch: int, seconds: float, threads: int) -> tuple[float, float]:
    """(samples/s, CPU seconds per run) of ``threads`` predictors, each in its own thread, running ``batch``
    images back to back."""
    from teachers.predictor_pool import PredictorOptions, PredictorPool

    pool = PredictorPool(PredictorOptions(model_dir=server_dir, size=threads))
    images = mnist_like_images(batch)
    feed, fetch = pool.input_names[0], pool.output_names[:1]
    for _ in range(20):
        pool.run({feed: images}, fetch)
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            pool.run({feed: images}, fetch)
            counts[i] += batch

    start, cpu = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    runs = sum(counts) / batch
    return sum(counts) / (time.perf_counter() - start), (time.process_time() - cpu) / max(runs, 1)


GRPC_METHOD = "/baidu.paddle_serving.predictor.general_model.GeneralModelService/inference"


def _teacher_client(endpoint: str, conf: str, batch: int, seconds: float, start_at: float, out) -> None:
    """TeacherClient.predict back to back (what a student's request costs on the client side)."""
    sys.path.insert(0, ROOT)
    from distill_reader.client import TeacherClient

    images = mnist_like_images(batch)
    with TeacherClient(endpoint, conf) as client:
        client.predict({"img": images})
        while time.time() < start_at:
            time.sleep(0.001)
        done, deadline, cpu = 0, start_at + seconds, time.process_time()
        while time.time() < deadline:
            client.predict({"img": images})
            done += batch
    out.put((done, time.process_time() - cpu, None))


def encoded_request(batch: int) -> bytes:
    """The serialized Request for ``batch`` test images (raw tensor_content), built once per client."""
    from distill_base.proto import general_model_service_pb2 as service_pb2
    from distill_base.tensor_codec import encode_tensor

    request = service_pb2.Request(fetch_var_names=["prediction"], log_id=1)
    encode_tensor(mnist_like_images(batch), name="img", alias_name="img", raw=True, out=request.tensor.add())
    return request.SerializeToString()


def _raw_client(endpoint: str, expected, batch: int, seconds: float, start_at: float, out) -> None:
    """Load generator: one pre-encoded request sent back to back through ``unary_unary`` with no
    (de)serializers; every answer's err_no checked, the first one's values against ``expected``."""
    import grpc
    import numpy as np

    from distill_base.proto import general_model_service_pb2 as service_pb2
    from distill_base.tensor_codec import decode_tensor

    body = encoded_request(batch)
    limit = 64 * 1024 * 1024
    with grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", limit)]) as channel:
        call = channel.unary_unary(GRPC_METHOD)
        first = service_pb2.Response.FromString(call(body, timeout=60))
        if first.err_no != 0:
            out.put((0, 0.0, f"err_no {first.err_no}: {first.err_msg}"))
            return
        got = decode_tensor(first.outputs[0].tensor[0])
        if not np.allclose(got, expected, rtol=1e-4, atol=1e-6):
            out.put((0, 0.0, f"answer differs from the raw predictor's by {np.abs(got - expected).max():.3g}"))
            return
        while time.time() < start_at:
            time.sleep(0.001)
        done, deadline, cpu = 0, start_at + seconds, time.process_time()
        while time.time() < deadline:
            answer = service_pb2.Response.FromString(call(body, timeout=60))
            if answer.err_no != 0:
                out.put((done, time.process_time() - cpu, f"err_no {answer.err_no}: {answer.err_msg}"))
                return
            done += batch
    out.put((done, time.process_time() - cpu, None))


def predictor_cpu_seconds(metrics_port: Optional[int]) -> float:
    """The server's distill_teacher_predictor_cpu_seconds_total (0 without metrics)."""
    if metrics_port is None:
        return 0.0
    import requests

    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(line.split()[1]) for line in text.splitlines()
               if line.startswith("distill_teacher_predictor_cpu_seconds_total "))


@dataclass
class Rate:
    """One measurement: samples/s, and per request: server CPU, its predictor runs' CPU, client CPU (seconds)."""

    samples_per_s: float
    server_cpu: float
    predictor_cpu: float
    client_cpu: float


def server_rate(server: TeacherServer, teacher, batch: int, clients: int, seconds: float, client: str = "raw",
                metrics_port: Optional[int] = None) -> Rate:
    """What ``clients`` client processes sending ``batch`` images back to back get from ``server``."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.5
    if client == "raw":
        target, extra = _raw_client, (reference_predict(teacher.server_dir, mnist_like_images(batch)),)
    else:
        target, extra = _teacher_client, (teacher.client_conf,)
    procs = [ctx.Process(target=target, args=(server.endpoint, *extra, batch, seconds, start_at, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time()))
    pids = [server.pid, *server.worker_pids()]   # the server and its predictor worker processes
    cpu, predictor = sum(map(process_cpu_seconds, pids)), predictor_cpu_seconds(metrics_port)
    results = [out.get(timeout=seconds + 60) for _ in procs]
    cpu = sum(map(process_cpu_seconds, pids)) - cpu   # includes the last requests' tail: a slight overestimate
    predictor = predictor_cpu_seconds(metrics_port) - predictor
    for p in procs:
        p.join(timeout=10)
    errors = [e for _, _, e in results if e]
    if errors:
        raise RuntimeError(f"wrong answers from the server: {errors[0]}")
    total = sum(n for n, _, _ in results)
    requests_done = max(total / batch, 1)
    return Rate(total / seconds, cpu / requests_done, predictor / requests_done,
                sum(c for _, c, _ in results) / requests_done)


class CheckoutServer(TeacherServer):
    """A TeacherServer started from another checkout of this project (``python -m teachers.serve`` there)."""

    def __init__(self, checkout: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkout = checkout

    def start(self) -> TeacherServer:
        original = self._guard.python

        def python(*a, **kw):
            kw["cwd"] = self.checkout
            return original(*a, env={"PYTHONPATH": self.checkout}, **kw)

        self._guard.python = python
        return super().start()


def measure(make, teacher, args, metrics: bool) -> dict:
    """Every server measurement of one server build (``make(**kwargs)`` returns a TeacherServer)."""
    result: dict = {}
    kinds = ["raw", "teacher"] if args.client == "both" else [args.client]
    worker_io = args.worker_io if make is TeacherServer else args.baseline_worker_io
    io = ["--worker_io", worker_io] if worker_io else []
    with make(teacher.server_dir, thread=args.thread, max_batch_size=64, batch_timeout_ms=2, spare=True,
              extra_args=io) as on:
        on.wait_spare()     # the spare's model load would take CPU from the measurement
        for kind in kinds:
            for batch in (32, 1):
                result[kind, "on", batch] = server_rate(on, teacher, batch, args.clients, args.seconds, kind)
    port = free_port() if metrics else None
    extra = (["--enable_prometheus", "--prometheus_port", str(port)] if metrics else []) + io
    with make(teacher.server_dir, thread=args.thread, max_batch_size=0, extra_args=extra, spare=True) as off:
        off.wait_spare()
        for kind in kinds:
            for batch in (1, 32):
                result[kind, "off", batch] = server_rate(off, teacher, batch, args.clients, args.seconds, kind,
                                                         port if kind == kinds[0] else None)
    return result


def report(name: str, r: dict, raw32: float, raw_cpu: dict, metrics: bool) -> None:
    print(f"[{name}]")
    for kind in ("raw", "teacher"):
        if (kind, "on", 32) not in r:
            continue
        label = "load generator (pre-encoded requests)" if kind == "raw" else "TeacherClient.predict"
        on32, off32, on1, off1 = r[kind, "on", 32], r[kind, "off", 32], r[kind, "on", 1], r[kind, "off", 1]
        print(f"  clients: {label}")
        print(f"  batch 32, batching on:             {on32.samples_per_s:10.0f} samples/s; ratio to the raw predictor "
              f"{on32.samples_per_s / raw32:.2f} (goal >= 0.8; width 8: >= 0.9)")
        print(f"  batch 32, batching off:            {off32.samples_per_s:10.0f} samples/s; ratio "
              f"{off32.samples_per_s / raw32:.2f}")
        print(f"  batch 1, batching on / off:        {on1.samples_per_s:10.0f} / {off1.samples_per_s:.0f} samples/s; "
              f"ratio {on1.samples_per_s / off1.samples_per_s:.2f} (goal >= 2)")
        for batch, rate in ((1, off1), (32, off32)):
            cpu, pred, raw = rate.server_cpu * 1e6, rate.predictor_cpu * 1e6, raw_cpu[batch] * 1e6
            beyond = (f"its predictor runs {pred:.0f} us -> beyond the predictor {cpu - pred:.0f} us (goal <= 300); "
                      if metrics and kind == "raw" else "")
            print(f"  batching off, batch {batch:2d}, server CPU per request {cpu:.0f} us; {beyond}beyond the raw "
                  f"predictor's {raw:.0f} us: {cpu - raw:.0f} us; client CPU per request "
                  f"{rate.client_cpu * 1e6:.0f} us")
        for batch, rate in ((1, on1), (32, on32)):
            print(f"  batching on, batch {batch:2d}, server CPU per request {rate.server_cpu * 1e6:.0f} us; "
                  f"client CPU per request {rate.client_cpu * 1e6:.0f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default: 3)")
    parser.add_argument("--thread", type=int, default=2, help="server predictors = raw predictor threads (default: 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client processes (default: 8)")
    parser.add_argument("--width", type=int, default=1,
                        help="conv filter multiplier of the teacher CNN: 1 = the test model, 8 = a heavier teacher")
    parser.add_argument("--client", choices=["both", "raw", "teacher"], default="both",
                        help="raw: a load generator sending pre-encoded requests; teacher: TeacherClient.predict; "
                             "both (default): the load generator, then TeacherClient runs")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="another checkout of this project (with predictor worker processes and the "
                             "--enable_prometheus metrics) whose teacher server is measured in the same run, "
                             "right after this checkout's")
    parser.add_argument("--worker_io", choices=["threads", "loop"], default=None,
                        help="this checkout's server --worker_io (default: the server's own default); the baseline "
                             "runs --baseline_worker_io")
    parser.add_argument("--baseline_worker_io", choices=["threads", "loop"], default=None,
                        help="the baseline's server --worker_io (default: the baseline server's own default)")
    parser.add_argument("--exported", default=None,
                        help="folder holding serving_server/ and serving_client/ of an exported model to measure "
                             "instead of building one (benchmarks/bench_paddle_lines.py passes one model to each "
                             "paddle line)")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.exported:
            client_dir = os.path.join(args.exported, "serving_client")
            teacher = ExportedTeacher(os.path.join(args.exported, "serving_server"), client_dir,
                                      os.path.join(client_dir, "serving_client_conf.prototxt"), "given")
        else:
            teacher = export_teacher(save_static_model(os.path.join(tmp, "model"), width=args.width), tmp, "static")
        raw32, cpu32 = raw_predictor_rate(teacher.server_dir, 32, args.seconds, args.thread)
        raw1, cpu1 = raw_predictor_rate(teacher.server_dir, 1, args.seconds, args.thread)
        raw_cpu = {1: cpu1, 32: cpu32}
        results = {"this checkout": measure(TeacherServer, teacher, args, metrics=True)}
        if args.baseline:
            results[f"baseline {args.baseline}"] = measure(
                lambda *a, **kw: CheckoutServer(os.path.abspath(args.baseline), *a, **kw), teacher, args, True)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end "
          f"({load_start:.2f} at the start); server --thread {args.thread}, "
          f"{args.clients} client processes, {args.seconds}s per measurement, teacher CNN width {args.width}")
    print(f"raw predictor, batch 32:             {raw32:10.0f} samples/s, {cpu32 * 1e6:.0f} us CPU per run")
    print(f"raw predictor, batch 1:              {raw1:10.0f} samples/s, {cpu1 * 1e6:.0f} us CPU per run")
    for name, result in results.items():
        report(name, result, raw32, raw_cpu, metrics=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
