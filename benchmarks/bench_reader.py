"""DistillReader benchmarks, each ratio measured side by side in one run (numbers on a shared machine are noisy).

1. efficiency: K = 1, 4, 8 fake teachers answering after a fixed latency (default 20 ms, one request at a time
   each), MNIST-sized inputs, teacher batch 32: delivered samples/s divided by the ideal ``K * batch / latency``;
   also against what plain threaded clients get out of the same teachers right after ("direct").
2. large: 3x224x224 float32 samples, 2 fake teachers (20 ms): delivered MB/s against a plain gRPC loop
   (``TeacherClient.predict`` one request after another) to one teacher.
3. student: steps/s of a small Paddle dygraph training loop fed by DistillReader (teachers with spare capacity)
   against the same loop fed by the plain generator (same model, same loss, precomputed soft labels), in
   alternating rounds.
4. gray failures (parts frozen, slow, healthy; ``gray`` = all three): a teacher frozen with SIGSTOP, one teacher
   at 10x latency, all healthy with the hedged fraction (see benchmarks/gray_failures.py).
5. copy: what copying the user's slots as they are read costs (``distill_reader.snapshot``; the reader never keeps
   a reference to a buffer the generator may reuse), per item of each generator kind, as a fraction of the time per
   sample of the ideal reader: K = 8 teachers of part 1 for MNIST-sized samples, part 2's 2 teachers at batch 8 for
   3x224x224 ones.

Example::

    python benchmarks/bench_reader.py                      # all three, about 1.5 minutes
    python benchmarks/bench_reader.py --parts efficiency --seconds 5 --num_workers 1
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Sequence

import numpy as np  # noqa: I001  (numpy before paddle)
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from fake_teacher import fake_config  # noqa: E402
from gray_failures import GRAY_PARTS, Harness, print_gray, run_gray  # noqa: E402

from distill_reader import DistillReader  # noqa: E402
from distill_reader.client import TeacherClient  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(endpoint: str, conf: str, timeout: float = 30.0) -> None:
    with TeacherClient(endpoint, conf) as client:
        deadline = time.monotonic() + timeout
        while not client.health(timeout=0.5):
            if time.monotonic() > deadline:
                raise SystemExit(f"fake teacher {endpoint} not serving after {timeout}s")
            time.sleep(0.05)


@contextlib.contextmanager
def fake_teachers(count: int, latency_ms: float, conf: str, per_process: int = 4) -> Iterator[list[str]]:
    """``count`` fake teachers (``per_process`` ports per process; ``conf`` their client config); yields their
    endpoints once they are serving, stops them afterwards."""
    ports = [free_port() for _ in range(count)]
    procs = []
    try:
        for start in range(0, count, per_process):
            args = [sys.executable, os.path.join(HERE, "fake_teacher.py"), "--latency_ms", str(latency_ms)]
            for port in ports[start:start + per_process]:
                args += ["--port", str(port)]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        endpoints = [f"127.0.0.1:{p}" for p in ports]
        for endpoint in endpoints:
            wait_serving(endpoint, conf)
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _reader(endpoints: Sequence[str], conf: str, teacher_batch_size: int, **options) -> DistillReader:
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], **options)
    dr.set_fixed_teacher(list(endpoints))
    dr.set_serving_conf_file(conf)
    dr.set_teacher_batch_size(teacher_batch_size)
    return dr


def bench_efficiency(ks: Sequence[int], latency_ms: float, batch: int, seconds: float, workdir: str,
                     **reader_options) -> list[dict]:
    conf = fake_config((1, 28, 28)).save(os.path.join(workdir, "mnist_conf"), "serving_client_conf.prototxt")
    images = np.random.default_rng(0).random((batch * 8, 1, 28, 28), dtype=np.float32)
    labels = np.zeros((batch, 1), dtype=np.int64)
    rows = []
    for k in tqdm(ks, desc="efficiency (K teachers)", disable=None):
        ideal = k * batch / (latency_ms / 1000.0)
        n_batches = max(20, int(ideal * seconds / batch))

        def batches(n=n_batches):
            for i in range(n):
                j = i % 8
                yield images[j * batch:(j + 1) * batch], labels

        with fake_teachers(k, latency_ms, conf) as endpoints:
            dr = _reader(endpoints, conf, batch, **reader_options)
            reader = dr.set_batch_generator(batches)
            try:
                # warm-up with a complete short epoch (a break would stop the workers): workers, channels
                for _ in dr.set_batch_generator(lambda: batches(10))():
                    pass
                started = time.perf_counter()
                samples = sum(len(b[0]) for b in reader())
                elapsed = time.perf_counter() - started
            finally:
                dr.close()
            direct = _saturate(endpoints, conf, images[:batch], elapsed)
        rate = samples / elapsed
        rows.append({"K": k, "samples/s": rate, "ideal": ideal, "efficiency": rate / ideal, "direct": direct,
                     "vs direct": rate / direct})
    return rows


def _saturate(endpoints: Sequence[str], conf: str, batch: np.ndarray, seconds: float) -> float:
    """Samples/s the teachers deliver to plain clients that keep two requests at each (threads, no reader)."""
    stop = time.perf_counter() + seconds
    counts = []

    def loop(endpoint: str) -> None:
        with TeacherClient(endpoint, conf) as client:
            client.predict({"img": batch}, fetch=["prediction"])
            n = 0
            while time.perf_counter() < stop:
                client.predict({"img": batch}, fetch=["prediction"])
                n += len(batch)
            counts.append(n)

    threads = [threading.Thread(target=loop, args=(e,)) for e in endpoints for _ in range(2)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def bench_large(latency_ms: float, teacher_batch: int, seconds: float, workdir: str, **reader_options) -> dict:
    shape = (3, 224, 224)
    conf = fake_config(shape).save(os.path.join(workdir, "large_conf"), "serving_client_conf.prototxt")
    student_batch = teacher_batch * 2
    images = np.random.default_rng(1).random((student_batch, *shape), dtype=np.float32)
    labels = np.zeros((student_batch, 1), dtype=np.int64)
    mb_per_batch = images.nbytes / 1e6
    with fake_teachers(2, latency_ms, conf, per_process=1) as endpoints:
        # plain loop: one teacher, one request after another
        client = TeacherClient(endpoints[0], conf)
        client.predict({"img": images[:teacher_batch]}, fetch=["prediction"])
        started, sent = time.perf_counter(), 0.0
        while time.perf_counter() - started < seconds:
            for start in range(0, student_batch, teacher_batch):
                client.predict({"img": images[start:start + teacher_batch]}, fetch=["prediction"])
            sent += mb_per_batch
        plain = sent / (time.perf_counter() - started)
        client.close()
        # DistillReader, two teachers
        n_batches = max(10, int(plain * seconds * 1.5 / mb_per_batch))
        dr = _reader(endpoints, conf, teacher_batch, **reader_options)
        reader = dr.set_batch_generator(lambda: ((images, labels) for _ in range(n_batches)))
        try:
            for _batch in dr.set_batch_generator(lambda: ((images, labels) for _ in range(3)))():   # warm-up
                pass
            started = time.perf_counter()
            delivered = sum(len(b[0]) for b in reader()) / student_batch * mb_per_batch
            distill = delivered / (time.perf_counter() - started)
        finally:
            dr.close()
    return {"plain MB/s (1 teacher)": plain, "DistillReader MB/s (2 teachers)": distill, "ratio": distill / plain}


def bench_student(teachers: int, latency_ms: float, batch: int, steps: int, rounds: int, workdir: str,
                  **reader_options) -> dict:
    import paddle
    from student_loop import lenet_student, steps_per_second

    paddle.disable_static()
    paddle.set_device("cpu")
    paddle.seed(0)
    conf = fake_config((1, 28, 28)).save(os.path.join(workdir, "student_conf"), "serving_client_conf.prototxt")
    rng = np.random.default_rng(2)
    images = rng.random((batch * 16, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, (batch * 16, 1)).astype(np.int64)
    soft = np.full((batch * 16, 10), 0.1, dtype=np.float32)

    model = lenet_student()
    optimizer = paddle.optimizer.SGD(learning_rate=0.01, parameters=model.parameters())

    def plain_batches():
        for i in range(steps):
            j = (i % 16) * batch
            yield images[j:j + batch], labels[j:j + batch], soft[j:j + batch]

    def student_batches():
        for i in range(steps):
            j = (i % 16) * batch
            yield images[j:j + batch], labels[j:j + batch]

    def train(source) -> float:
        return steps_per_second(model, optimizer, source, steps)

    with fake_teachers(teachers, latency_ms, conf) as endpoints:
        dr = _reader(endpoints, conf, batch, **reader_options)
        reader = dr.set_batch_generator(student_batches)
        try:
            train(plain_batches())   # warm-up both paths
            train(reader())
            plain_rates, distill_rates = [], []
            for _ in tqdm(range(rounds), desc="student view (alternating rounds)", disable=None):
                plain_rates.append(train(plain_batches()))
                distill_rates.append(train(reader()))
        finally:
            dr.close()
    plain, distill = float(np.median(plain_rates)), float(np.median(distill_rates))
    paired = [d / p for d, p in zip(distill_rates, plain_rates)]
    return {"plain steps/s (median)": plain, "DistillReader steps/s (median)": distill,
            "ratio of medians": distill / plain, "median of paired ratios": float(np.median(paired)),
            "worst paired ratio": min(paired), "best paired ratio": max(paired)}


def bench_copy(batch: int, latency_ms: float, teachers: int = 8, repeat: int = 2000) -> list[dict]:
    """Seconds ``snapshot`` takes per item (median of 5 runs of ``repeat``), for MNIST-sized samples, a sample
    list and a batch of ``batch``, and a 3x224x224 batch; against the ideal time per sample of ``teachers`` at
    ``batch`` (MNIST-sized) and of the large-input part's 2 teachers at batch 8 (3x224x224)."""
    import timeit

    from distill_reader.snapshot import snapshot

    rng = np.random.default_rng(3)
    mnist = rng.random((batch, 1, 28, 28), dtype=np.float32)
    large = rng.random((8, 3, 224, 224), dtype=np.float32)
    items = {"sample (1x28x28, label)": ((mnist[0], 7), 1),
             f"sample list ({batch} samples)": ([(mnist[i], i) for i in range(batch)], batch),
             f"batch ({batch}x1x28x28, labels)": ((mnist, np.arange(batch)), batch),
             "batch (8x3x224x224, labels)": ((large, np.arange(8)), 8)}
    per_sample_ideal = latency_ms / 1000.0 / (teachers * batch)
    large_ideal = latency_ms / 1000.0 / (2 * 8)
    rows = []
    for name, (item, samples) in items.items():
        ideal = large_ideal if "224" in name else per_sample_ideal
        n = max(20, repeat // samples)
        seconds = float(np.median(timeit.repeat(lambda item=item: snapshot(item), number=n, repeat=5))) / n
        rows.append({"item": name, "us/item": seconds * 1e6, "us/sample": seconds * 1e6 / samples,
                     "of ideal time": seconds / samples / ideal})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="efficiency,large,student",
                        help="comma-separated benchmarks to run: efficiency, large, student, and the gray "
                        "failures frozen, slow, healthy (gray = those three), copy (cost of copying the user's "
                        "slots)")
    parser.add_argument("--ks", default="1,4,8", help="teacher counts for the efficiency benchmark")
    parser.add_argument("--latency_ms", type=float, default=20.0, help="fake teachers' latency, ms (efficiency, gray)")
    parser.add_argument("--batch", type=int, default=32, help="teacher batch size (efficiency, student, gray)")
    parser.add_argument("--seconds", type=float, default=3.0, help="approximate length of each measurement")
    parser.add_argument("--large_batch", type=int, default=8, help="teacher batch of 3x224x224 samples (large)")
    parser.add_argument("--large_latency_ms", type=float, default=20.0, help="fake teachers' latency (large)")
    parser.add_argument("--student_teachers", type=int, default=2, help="fake teachers for the student view")
    parser.add_argument("--student_latency_ms", type=float, default=2.0, help="their latency (spare capacity)")
    parser.add_argument("--student_steps", type=int, default=150, help="training steps per round (student)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (student); the median is shown")
    parser.add_argument("--slow_factor", type=float, default=10.0,
                        help="latency of the slow teacher as a multiple of --latency_ms (part slow)")
    parser.add_argument("--num_workers", type=int, default=None, help="DistillReader worker processes (default: "
                        "the reader's default)")
    parser.add_argument("--per_teacher_in_flight", type=int, default=None,
                        help="requests outstanding per teacher (default: the reader's default)")
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in ("num_workers", "per_teacher_in_flight") if getattr(args, k) is not None}
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if "gray" in parts:
        parts = (parts - {"gray"}) | set(GRAY_PARTS)
    unknown = parts - {"efficiency", "large", "student", "copy", *GRAY_PARTS}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start (shared machine: "
          f"numbers are noisy); reader options {options or 'default'}")
    with tempfile.TemporaryDirectory(prefix="bench_reader_") as workdir:
        if "efficiency" in parts:
            ks = [int(k) for k in args.ks.split(",")]
            rows = bench_efficiency(ks, args.latency_ms, args.batch, args.seconds, workdir, **options)
            print(f"\nefficiency vs ideal ({args.latency_ms:g} ms latency, teacher batch {args.batch}, "
                  f"MNIST-sized inputs; goal >= 0.9)")
            print("direct = the same teachers saturated by plain threaded clients right after (what this machine "
                  "lets them deliver now)")
            print(f"{'K':>3} {'samples/s':>11} {'ideal':>9} {'efficiency':>11} {'direct':>9} {'vs direct':>10}")
            for row in rows:
                print(f"{row['K']:>3} {row['samples/s']:>11.0f} {row['ideal']:>9.0f} {row['efficiency']:>11.3f} "
                      f"{row['direct']:>9.0f} {row['vs direct']:>10.3f}")
        if "large" in parts:
            result = bench_large(args.large_latency_ms, args.large_batch, args.seconds, workdir, **options)
            print(f"\nlarge inputs (3x224x224 float32, teacher batch {args.large_batch}, "
                  f"{args.large_latency_ms:g} ms latency)")
            for key, value in result.items():
                print(f"  {key:<34} {value:8.2f}")
        if "student" in parts:
            result = bench_student(args.student_teachers, args.student_latency_ms, args.batch, args.student_steps,
                                   args.rounds, workdir, **options)
            print(f"\nstudent view (dygraph LeNet-like CNN, batch {args.batch}, {args.student_teachers} teachers at "
                  f"{args.student_latency_ms:g} ms; goal >= 0.95)")
            for key, value in result.items():
                print(f"  {key:<34} {value:8.3f}")
        if "copy" in parts:
            rows = bench_copy(args.batch, args.latency_ms)
            print(f"\ncopying the user's slots as read (snapshot), against the ideal time per sample (8 teachers, "
                  f"batch {args.batch}; 3x224x224: 2 teachers, batch 8; {args.latency_ms:g} ms)")
            print(f"{'item':<32} {'us/item':>9} {'us/sample':>10} {'of ideal time':>14}")
            for row in rows:
                print(f"{row['item']:<32} {row['us/item']:>9.1f} {row['us/sample']:>10.2f} "
                      f"{row['of ideal time']:>14.4f}")
        gray = [part for part in GRAY_PARTS if part in parts]
        if gray:
            harness = Harness(free_port, wait_serving,
                              lambda endpoints, conf, batch: _reader(endpoints, conf, batch, **options))
            rows = run_gray(harness, gray, args.latency_ms, args.batch, args.seconds, workdir, args.slow_factor)
            print_gray(rows, args.latency_ms, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
