"""Teacher server scaling with its predictor worker processes, side by side in one run:

1. the raw predictor as N separate processes (the true ceiling: no server, no GIL shared) for N = 1 and --thread;
2. the server with --thread 1 and --thread N, driven by one load-generator process (--clients threads sending a
   pre-encoded batch back to back): samples/s, ratio N/1 (goal on 2 cores, wide CNN: >= 1.6) and ratio to the
   ceiling (goal on >= 8 cores: >= 0.9);
3. health latency while a long prediction runs, and --predict_timeout on it: a model that counts to 10**7 in a
   while loop (about 10 s or more) served with --thread 2 --predict_timeout 2: gRPC health checked every 20 ms
   (p50 / p99 / max; goal p99 <= 50 ms), when the 6000 answer arrives (goal <= 2.5 s) and when the replacement
   worker is ready.

    python benchmarks/bench_teacher_scaling.py [--seconds 3] [--thread 2] [--width 8] [--clients 8] [--skip_health]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np  # (numpy before paddle: paddle 2.6.2 exports zlib symbols)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.teacher import TeacherServer, export_teacher, grpc_health, save_counting_model, save_static_model  # noqa: E402

GRPC_METHOD = "/baidu.paddle_serving.predictor.general_model.GeneralModelService/inference"
_RAW_LOOP = """
import sys, time, numpy as np
from teachers.predictor_pool import PredictorOptions, PredictorPool
pool = PredictorPool(PredictorOptions(model_dir=sys.argv[1], size=1))
images = np.random.default_rng(0).random((int(sys.argv[2]), 1, 28, 28), dtype=np.float32)
feed, fetch = pool.input_names[0], pool.output_names[:1]
for _ in range(10):
    pool.run({feed: images}, fetch)
print("ready", flush=True)
start_at, seconds = float(sys.stdin.readline()), float(sys.argv[3])
while time.time() < start_at:
    time.sleep(0.001)
done = 0
while time.time() < start_at + seconds:
    pool.run({feed: images}, fetch)
    done += len(images)
print(done)
"""


def raw_processes_rate(server_dir: str, processes: int, batch: int, seconds: float) -> float:
    """Samples/s of ``processes`` separate processes, each one predictor running ``batch`` back to back."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", _RAW_LOOP, server_dir, str(batch), str(seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True)
             for _ in range(processes)]
    for p in procs:    # each has imported paddle, loaded the model and warmed up
        while p.stdout.readline().strip() != "ready":
            if p.poll() is not None:
                raise RuntimeError(f"raw predictor process exited with {p.returncode}")
    start_at = time.time() + 0.2
    for p in procs:
        p.stdin.write(f"{start_at}\n")
        p.stdin.flush()
    total = sum(int(p.communicate(timeout=seconds + 120)[0].split()[-1]) for p in procs)
    return total / seconds


def encoded(feed: str, array: np.ndarray, fetch: str) -> bytes:
    from distill_base.proto import general_model_service_pb2 as pb
    from distill_base.tensor_codec import encode_tensor

    request = pb.Request(fetch_var_names=[fetch])
    encode_tensor(array, name=feed, alias_name=feed, raw=True, out=request.tensor.add())
    return request.SerializeToString()


def server_rate(endpoint: str, body: bytes, batch: int, clients: int, seconds: float) -> float:
    """Samples/s that ``clients`` threads of this one process get sending ``body`` back to back."""
    import grpc

    from distill_base.proto import general_model_service_pb2 as pb

    counts = [0] * clients
    errors: list = []
    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(GRPC_METHOD)
        for _ in range(3):
            call(body, timeout=60)
        deadline = time.perf_counter() + seconds

        def loop(i: int) -> None:
            while time.perf_counter() < deadline:
                answer = pb.Response.FromString(call(body, timeout=60))
                if answer.err_no:
                    errors.append(answer.err_msg)
                    return
                counts[i] += batch

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"the server answered an error: {errors[0]}")
    return sum(counts) / took


def health_during_long_prediction(tmp: str, count_to: float) -> None:
    import grpc

    from distill_base.proto import general_model_service_pb2 as pb

    server_dir, _ = save_counting_model(os.path.join(tmp, "counting"))
    with TeacherServer(server_dir, thread=2, max_batch_size=0, spare=True,
                       extra_args=["--predict_timeout", "2"]) as server:
        server.wait_spare()
        before = server.worker_pids()
        latencies, stop = [], threading.Event()

        def probe() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                status = grpc_health(server.endpoint, timeout=5)
                latencies.append((time.perf_counter() - t0, status))
                time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        with grpc.insecure_channel(server.endpoint) as channel:
            answer = pb.Response.FromString(channel.unary_unary(GRPC_METHOD)(
                encoded("x", np.array([[count_to]], "float32"), "y"), timeout=60))
        answered = time.monotonic() - t0
        while len(set(server.worker_pids()) - set(before)) < 1 and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        replaced_pid = time.monotonic() - t0
        while server.log().count(" ready (pid ") < 3 and time.monotonic() - t0 < 60:   # 2 at start + the spare
            time.sleep(0.01)
        replaced = time.monotonic() - t0
        time.sleep(1.0)
        stop.set()
        prober.join()
    ms = np.array([s for s, _ in latencies]) * 1000
    statuses = sorted({str(st) for _, st in latencies})
    print(f"health while a {count_to:.0e}-step prediction runs (--thread 2 --predict_timeout 2): {len(ms)} checks, "
          f"latency ms p50 {np.percentile(ms, 50):.1f} p99 {np.percentile(ms, 99):.1f} max {ms.max():.1f} "
          f"(goal p99 <= 50); statuses {statuses}")
    print(f"the long prediction's answer: err_no {answer.err_no} after {answered:.2f}s (goal <= 2.5 s, 6000); "
          f"replacement worker spawned after {replaced_pid:.2f}s, ready after {replaced:.2f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default: 3)")
    parser.add_argument("--thread", type=int, default=2, help="N: workers / raw processes (default: 2)")
    parser.add_argument("--width", type=int, default=8, help="conv filter multiplier of the CNN (default: 8, wide)")
    parser.add_argument("--batch", type=int, default=32, help="samples per request (default: 32)")
    parser.add_argument("--clients", type=int, default=8, help="load-generator threads (default: 8)")
    parser.add_argument("--count_to", type=float, default=1e7,
                        help="steps of the long prediction for the health measurement (default: 1e7)")
    parser.add_argument("--skip_health", action="store_true", help="leave out the health measurement")
    parser.add_argument("--skip_scaling", action="store_true", help="leave out the throughput measurements")
    args = parser.parse_args()
    import paddle

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; paddle {paddle.__version__}; "
          f"CNN width {args.width}, batch {args.batch}, {args.clients} load-generator threads in one process, "
          f"{args.seconds}s per measurement")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_scaling:
            teacher = export_teacher(save_static_model(os.path.join(tmp, "model"), width=args.width), tmp, "static")
            body = encoded("img", np.random.default_rng(0).random((args.batch, 1, 28, 28), dtype=np.float32),
                           "prediction")
            ceiling = {n: raw_processes_rate(teacher.server_dir, n, args.batch, args.seconds)
                       for n in sorted({1, args.thread})}
            served = {}
            for n in sorted({1, args.thread}):
                with TeacherServer(teacher.server_dir, thread=n, max_batch_size=0, spare=True) as server:
                    server.wait_spare()   # the spare's model load would take CPU from the measurement
                    served[n] = server_rate(server.endpoint, body, args.batch, args.clients, args.seconds)
            for n in sorted(served):
                print(f"--thread {n}: server {served[n]:9.0f} samples/s; raw predictor in {n} separate process(es) "
                      f"{ceiling[n]:9.0f}; server / ceiling {served[n] / ceiling[n]:.2f}")
            n = args.thread
            print(f"--thread {n} / --thread 1: server {served[n] / served[1]:.2f} (goal on 2 cores, wide CNN: >= 1.6); "
                  f"raw processes {ceiling[n] / ceiling[1]:.2f}")
        if not args.skip_health:
            health_during_long_prediction(tmp, args.count_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
