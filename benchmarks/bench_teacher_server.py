"""Teacher server throughput against the raw Paddle Inference predictor, measured side by side in one run.

1. batch 32, 8 concurrent gRPC clients: server samples/s vs the raw predictor's (goal >= 0.8; 0.9 for width 8);
2. batch 1, 8 concurrent clients: dynamic batching on vs off (goal >= 2x);
3. server CPU per request beyond the predictor (batching off, so each request is one predictor run): the server
   process's CPU time (/proc/PID/stat) during a measurement divided by the requests answered, minus the CPU time
   the server's own predictor runs took meanwhile (its distill_teacher_predictor_cpu_seconds_total metric)
   (goal <= 300 us); also minus the raw predictor's CPU per run measured alone in a tight loop, which is lower
   (warm caches) and so gives a larger "beyond".

Clients run in separate processes (so their Python work does not share the benchmark's GIL).

    python benchmarks/bench_teacher_server.py [--seconds 3] [--thread 2] [--clients 8] [--width 1]
        [--baseline DIR]    # also measure the teacher server of another checkout DIR (e.g. the main branch)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
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


def _client(endpoint: str, conf: str, batch: int, seconds: float, start_at: float, out) -> None:
    sys.path.insert(0, ROOT)
    from distill_reader.client import TeacherClient

    images = mnist_like_images(batch)
    with TeacherClient(endpoint, conf) as client:
        client.predict({"img": images})
        while time.time() < start_at:
            time.sleep(0.001)
        done, deadline = 0, start_at + seconds
        while time.time() < deadline:
            client.predict({"img": images})
            done += batch
    out.put(done)


def predictor_cpu_seconds(metrics_port: Optional[int]) -> float:
    """The server's distill_teacher_predictor_cpu_seconds_total (0 without metrics)."""
    if metrics_port is None:
        return 0.0
    import requests

    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(line.split()[1]) for line in text.splitlines()
               if line.startswith("distill_teacher_predictor_cpu_seconds_total "))


def server_rate(server: TeacherServer, conf: str, batch: int, clients: int, seconds: float,
                metrics_port: Optional[int] = None) -> tuple[float, float, float]:
    """(samples/s, server CPU seconds per request, predictor CPU seconds per request) answered to ``clients``
    client processes sending ``batch`` images back to back."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.5
    procs = [ctx.Process(target=_client, args=(server.endpoint, conf, batch, seconds, start_at, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu, predictor = process_cpu_seconds(server.pid), predictor_cpu_seconds(metrics_port)
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    cpu = process_cpu_seconds(server.pid) - cpu   # includes the last requests' tail: a slight overestimate
    predictor = predictor_cpu_seconds(metrics_port) - predictor
    for p in procs:
        p.join(timeout=10)
    requests_done = max(total / batch, 1)
    return total / seconds, cpu / requests_done, predictor / requests_done


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
    result = {}
    with make(teacher.server_dir, thread=args.thread, max_batch_size=64, batch_timeout_ms=2) as on:
        result["served32"], _, _ = server_rate(on, teacher.client_conf, 32, args.clients, args.seconds)
        result["batched1"], _, _ = server_rate(on, teacher.client_conf, 1, args.clients, args.seconds)
    port = free_port() if metrics else None
    extra = ["--enable_prometheus", "--prometheus_port", str(port)] if metrics else []
    with make(teacher.server_dir, thread=args.thread, max_batch_size=0, extra_args=extra) as off:
        for batch in (1, 32):
            rate, cpu, predictor = server_rate(off, teacher.client_conf, batch, args.clients, args.seconds, port)
            result[f"unbatched{batch}"] = rate
            result[f"cpu{batch}_us"], result[f"pred{batch}_us"] = cpu * 1e6, predictor * 1e6 if metrics else None
    return result


def report(name: str, r: dict, raw32: float, raw_cpu: dict) -> None:
    print(f"[{name}]")
    print(f"server, batch 32, batching on:       {r['served32']:10.0f} samples/s")
    print(f"  ratio server / raw predictor:      {r['served32'] / raw32:10.2f}   (goal >= 0.8; width 8: >= 0.9)")
    print(f"server, batch 32, batching off:      {r['unbatched32']:10.0f} samples/s "
          f"(ratio {r['unbatched32'] / raw32:.2f})")
    print(f"server, batch 1, batching on:        {r['batched1']:10.0f} samples/s")
    print(f"server, batch 1, batching off:       {r['unbatched1']:10.0f} samples/s")
    print(f"  ratio batching on / off:           {r['batched1'] / r['unbatched1']:10.2f}   (goal >= 2)")
    for batch in (1, 32):
        cpu, pred, raw = r[f"cpu{batch}_us"], r[f"pred{batch}_us"], raw_cpu[batch] * 1e6
        in_server = (f"its predictor runs {pred:.0f} us -> beyond the predictor {cpu - pred:.0f} us (goal <= 300); "
                     if pred is not None else "")
        print(f"server CPU per request, batch {batch:2d}:   {cpu:10.0f} us; {in_server}"
              f"beyond the raw predictor's {raw:.0f} us: {cpu - raw:.0f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default: 3)")
    parser.add_argument("--thread", type=int, default=2, help="server predictors = raw predictor threads (default: 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client processes (default: 8)")
    parser.add_argument("--width", type=int, default=1,
                        help="conv filter multiplier of the teacher CNN: 1 = the test model, 8 = a heavier teacher")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="another checkout of this project whose teacher server is measured in the same run")
    parser.add_argument("--exported", default=None,
                        help="folder holding serving_server/ and serving_client/ of an exported model to measure "
                             "instead of building one (benchmarks/bench_paddle_lines.py passes one model to each "
                             "paddle line)")
    args = parser.parse_args()
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
                lambda *a, **kw: CheckoutServer(os.path.abspath(args.baseline), *a, **kw), teacher, args, False)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; server --thread {args.thread}, "
          f"{args.clients} client processes, {args.seconds}s per measurement, teacher CNN width {args.width}")
    print(f"raw predictor, batch 32:             {raw32:10.0f} samples/s, {cpu32 * 1e6:.0f} us CPU per run")
    print(f"raw predictor, batch 1:              {raw1:10.0f} samples/s, {cpu1 * 1e6:.0f} us CPU per run")
    for name, result in results.items():
        report(name, result, raw32, raw_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
