"""Why a predictor run costs more CPU inside the teacher server than in a tight loop: the same raw Paddle Inference
runs (2 predictor threads, batch 1, the test CNN) alone, next to CPU-bound processes, and next to processes that
wake up every ``--wake_us`` microseconds (as 8 closed-loop clients and the server's own threads do on shared cores).
Reports the predictor threads' CPU microseconds per run (thread CPU time, so time spent preempted is not counted:
what grows is the work itself, through caches and TLBs refilled after every preemption).

    python benchmarks/bench_predictor_interference.py [--seconds 3] [--processes 8] [--wake_us 200] [--width 1]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.teacher import export_teacher, mnist_like_images, save_static_model  # noqa: E402


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


def _wake(stop, wake_s: float) -> None:
    while not stop.is_set():
        time.sleep(wake_s)


def per_run_cpu_us(server_dir: str, seconds: float) -> float:
    """Mean thread CPU microseconds per run of 2 threads running batch-1 predictions back to back (a new pool
    each time: Paddle Inference's oneDNN state is per thread, and a new thread may reuse a dead one's id)."""
    from teachers.predictor_pool import PredictorOptions, PredictorPool

    pool = PredictorPool(PredictorOptions(model_dir=server_dir, size=2))
    images, feed, fetch = mnist_like_images(1), pool.input_names[0], pool.output_names[:1]
    results = []

    def loop() -> None:
        for _ in range(20):
            pool.run({feed: images}, fetch)
        cpu, runs, deadline = time.thread_time(), 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            pool.run({feed: images}, fetch)
            runs += 1
        results.append((time.thread_time() - cpu) / runs * 1e6)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results) / len(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default: 3)")
    parser.add_argument("--processes", type=int, default=8, help="competing processes (default: 8)")
    parser.add_argument("--wake_us", type=float, default=200.0,
                        help="sleep of each waking process between wake-ups, microseconds (default: 200)")
    parser.add_argument("--width", type=int, default=1, help="conv filter multiplier of the test CNN (default: 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default: 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = export_teacher(save_static_model(os.path.join(tmp, "model"), width=args.width), tmp, "static")
        ctx = mp.get_context("fork")
        results: dict = {"alone": [], f"{args.processes} CPU-bound processes": [],
                         f"{args.processes} processes waking every {args.wake_us:g} us": []}
        load_start = os.getloadavg()[0]
        for _ in range(args.rounds):
            for name, target in zip(results, (None, _spin, _wake)):
                stop = ctx.Event()
                extra = (args.wake_us / 1e6,) if target is _wake else ()
                procs = [ctx.Process(target=target, args=(stop, *extra)) for _ in range(args.processes)] \
                    if target else []
                for p in procs:
                    p.start()
                try:
                    results[name].append(per_run_cpu_us(teacher.server_dir, args.seconds))
                finally:
                    stop.set()
                    for p in procs:
                        p.join(timeout=10)
    print(f"machine: {os.cpu_count()} cores, load average {load_start:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end; 2 predictor threads, batch 1, CNN width {args.width}")
    for name, values in results.items():
        print(f"{name:40s} CPU per predictor run: " + ", ".join(f"{v:.0f}" for v in values) + " us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
