"""Teacher server throughput against the raw Paddle Inference predictor, measured side by side in one run.

1. batch 32, 8 concurrent gRPC clients: server samples/s vs the raw predictor's (goal >= 0.8);
2. batch 1, 8 concurrent clients: dynamic batching on vs off (goal >= 3x).

Clients run in separate processes (so their Python work does not share the benchmark's GIL).

    python benchmarks/bench_teacher_server.py [--seconds 3] [--thread 2] [--clients 8] [--width 1]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time

import numpy  # noqa: F401  (numpy before paddle: paddle 2.6.2 exports zlib symbols)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.teacher import (  # noqa: E402
    ExportedTeacher,
    TeacherServer,
    export_teacher,
    mnist_like_images,
    save_static_model,
)


def raw_predictor_rate(server_dir: str, batch: int, seconds: float, threads: int) -> float:
    """Samples/s of ``threads`` predictors, each in its own thread, running ``batch`` images back to back."""
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

    start = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def _client(endpoint: str, conf: str, batch: int, seconds: float, start_at: float, out) -> None:
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


def server_rate(endpoint: str, conf: str, batch: int, clients: int, seconds: float) -> float:
    """Samples/s answered to ``clients`` client processes sending ``batch`` images back to back."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.5
    procs = [ctx.Process(target=_client, args=(endpoint, conf, batch, seconds, start_at, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(timeout=10)
    return total / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default: 3)")
    parser.add_argument("--thread", type=int, default=2, help="server predictors = raw predictor threads (default: 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client processes (default: 8)")
    parser.add_argument("--width", type=int, default=1,
                        help="conv filter multiplier of the teacher CNN: 1 = the test model, 8 = a heavier teacher")
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
        raw32 = raw_predictor_rate(teacher.server_dir, 32, args.seconds, args.thread)
        with TeacherServer(teacher.server_dir, thread=args.thread, max_batch_size=64, batch_timeout_ms=2) as on:
            served32 = server_rate(on.endpoint, teacher.client_conf, 32, args.clients, args.seconds)
            batched1 = server_rate(on.endpoint, teacher.client_conf, 1, args.clients, args.seconds)
        with TeacherServer(teacher.server_dir, thread=args.thread, max_batch_size=0) as off:
            unbatched1 = server_rate(off.endpoint, teacher.client_conf, 1, args.clients, args.seconds)
        raw1 = raw_predictor_rate(teacher.server_dir, 1, args.seconds, args.thread)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; server --thread {args.thread}, "
          f"{args.clients} client processes, {args.seconds}s per measurement, teacher CNN width {args.width}")
    print(f"raw predictor, batch 32:             {raw32:10.0f} samples/s")
    print(f"server, batch 32, {args.clients} clients:        {served32:10.0f} samples/s")
    print(f"  ratio server / raw predictor:      {served32 / raw32:10.2f}   (goal >= 0.8)")
    print(f"raw predictor, batch 1:              {raw1:10.0f} samples/s")
    print(f"server, batch 1, batching on:        {batched1:10.0f} samples/s")
    print(f"server, batch 1, batching off:       {unbatched1:10.0f} samples/s")
    print(f"  ratio batching on / off:           {batched1 / unbatched1:10.2f}   (goal >= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
