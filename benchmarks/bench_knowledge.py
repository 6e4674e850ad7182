"""Knowledge files: read throughput against plain NumPy memory maps of the same bytes, and sizes per storage.

Part 1: writes 1000-class float32 logits for ``--samples`` samples as float32, float16 and top-k (k=10) caches plus
one raw file with the same float32 bytes, warms the page cache, then reads everything in batches of
``--batch-size``, alternating cache and baseline runs ``--repeats`` times, and prints the median throughput of each;
the shuffled variants read the rows of a random permutation (``KnowledgeReader.take``, optionally found through a
``DigestIndex``, as a shuffled epoch over the offline cache does) against fancy indexing of a plain memmap.

Part 2 (DistillReader offline mode): Fashion-MNIST train images through a plain batch generator (uint8 -> float32
/ 255), against the same generator wrapped by a DistillReader whose offline cache (1000-class float32 answers of
an in-process fake teacher, written in a first pass) is complete: cached epochs vs the generator alone; then the
same with a generator that shuffles the samples every epoch (the cache read by input digest).

Part 3 (student view of the offline mode): steps/s of a small Paddle dygraph training loop (the LeNet-like CNN of
bench_reader's student view, and an MLP) with a distillation loss, fed by a DistillReader whose cache is complete
vs the same loop fed by a plain generator that yields the same soft labels from memory; alternating rounds, each
round one epoch of ``--student-steps`` batches; the ratio of the medians is printed.

    python benchmarks/bench_knowledge.py --samples 65536 --repeats 5
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import numpy as np

from distill_reader.knowledge import KnowledgeError, KnowledgeReader, KnowledgeWriter, sample_digests

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=65536, help="samples per cache (default 65536: 262 MB f32)")
    parser.add_argument("--classes", type=int, default=1000, help="logits per sample (default 1000)")
    parser.add_argument("--k", type=int, default=10, help="k of the top-k cache (default 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per read (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per variant; the median is shown")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temp dir, removed after)")
    parser.add_argument("--epoch-samples", type=int, default=60000,
                        help="Fashion-MNIST images per epoch in part 2 (default 60000; 0 skips part 2)")
    parser.add_argument("--epoch-classes", type=int, default=1000,
                        help="length of the fake teacher's answer per sample in part 2 (default 1000)")
    parser.add_argument("--student-models", default="cnn,mlp",
                        help="part 3: comma-separated student models to train (cnn, mlp; empty skips part 3)")
    parser.add_argument("--student-steps", type=int, default=100, help="part 3: training steps per round")
    parser.add_argument("--student-batch", type=int, default=64, help="part 3: student batch size")
    parser.add_argument("--student-rounds", type=int, default=5,
                        help="part 3: alternating rounds per model (median shown)")
    return parser.parse_args()


def write_caches(root: str, logits: np.ndarray, k: int) -> dict:
    paths = {}
    for storage in ("float32", "float16", f"topk:{k}"):
        path = os.path.join(root, storage.replace(":", "_"))
        began = time.perf_counter()
        with KnowledgeWriter(path, {"logits": (logits.shape[1:], "float32")}, storage=storage, overwrite=True) as w:
            for lo in range(0, len(logits), 4096):
                w.append({"logits": logits[lo:lo + 4096]})
        seconds = time.perf_counter() - began
        paths[storage] = path
        print(f"write {storage:>8}: {logits.nbytes / seconds / 1e9:.2f} GB/s of float32 logits (incl. fsync)")
    raw = os.path.join(root, "plain.f32")
    logits.tofile(raw)
    paths["plain"] = raw
    return paths


def dir_bytes(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def warm(path: str) -> None:
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in os.listdir(path)]
    for name in files:
        with open(name, "rb") as f:
            while f.read(1 << 24):
                pass


def read_plain(path: str, shape: tuple, batch: int) -> float:
    began = time.perf_counter()
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=shape)
    total = 0.0
    for lo in range(0, shape[0], batch):
        chunk = np.array(mapped[lo:lo + batch])
        total += chunk[0, 0]
    del mapped
    return time.perf_counter() - began


def read_plain_shuffled(path: str, shape: tuple, batch: int, order: np.ndarray) -> float:
    began = time.perf_counter()
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=shape)
    total = 0.0
    for lo in range(0, shape[0], batch):
        chunk = mapped[np.sort(order[lo:lo + batch])]   # fancy indexing copies; sorted rows: the kindest case
        total += chunk[0, 0]
    del mapped
    return time.perf_counter() - began


def take_cache(reader: KnowledgeReader, batch: int, order: np.ndarray, digests: np.ndarray = None) -> float:
    """Seconds for one pass reading rows in ``order`` with ``take`` (after a DigestIndex lookup with ``digests``)."""
    from distill_reader.knowledge.index import DigestIndex

    began = time.perf_counter()
    index = DigestIndex(digests) if digests is not None else None
    total = 0.0
    for lo in range(0, len(order), batch):
        rows = order[lo:lo + batch] if index is None else index.lookup(digests[order[lo:lo + batch]])
        total += reader.take(rows)["logits"][0, 0]
    return time.perf_counter() - began


def read_cache(path: str, batch: int, fresh: bool = True, copy: bool = True, topk_as: str = "dense",
               reader: KnowledgeReader = None, lazy_check: str = "crc32") -> float:
    """Seconds for one pass; ``fresh`` opens a new reader (so every shard checksum is verified during the pass)."""
    began = time.perf_counter()
    r = KnowledgeReader(path, topk_as=topk_as, lazy_check=lazy_check) if fresh else reader
    total = 0.0
    for b in r.iter_batches(batch, copy=copy):
        chunk = b["logits"]
        total += chunk[0, 0] if isinstance(chunk, np.ndarray) else chunk.values[0, 0]
    if fresh:
        r.close()
    return time.perf_counter() - began


def main() -> None:
    args = parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_knowledge_")
    os.makedirs(root, exist_ok=True)
    try:
        rng = np.random.default_rng(0)
        logits = rng.standard_normal((args.samples, args.classes), dtype=np.float32)
        shape = logits.shape
        dense_bytes = logits.nbytes
        paths = write_caches(root, logits, args.k)
        del logits
        print(f"\n{args.samples} samples x {args.classes} float32 logits = {dense_bytes / 1e6:.1f} MB dense")
        print("sizes on disk (shards + manifest):")
        for storage in ("float32", "float16", f"topk:{args.k}"):
            size = dir_bytes(paths[storage])
            print(f"  {storage:>8}: {size / 1e6:9.2f} MB  ({size / args.samples:7.1f} B/sample, "
                  f"{dense_bytes / size:6.1f}x smaller than dense float32)")
        for path in paths.values():
            warm(path)

        steady = KnowledgeReader(paths["float32"])
        read_cache(paths["float32"], args.batch_size, fresh=False, reader=steady)  # verify once
        order = np.random.default_rng(1).permutation(args.samples)
        stored_digests = rng.integers(0, 256, (args.samples, 16), dtype=np.uint8)   # stand-ins for input digests
        variants = {
            "plain np.memmap, copy per batch (baseline)": lambda: read_plain(paths["plain"], shape, args.batch_size),
            "cache float32, new reader (crc32 checked)": lambda: read_cache(paths["float32"], args.batch_size),
            "cache float32, new reader (sha256 checked)": lambda: read_cache(paths["float32"], args.batch_size,
                                                                             lazy_check="sha256"),
            "cache float32, verified reader, copy": lambda: read_cache(paths["float32"], args.batch_size, False,
                                                                       reader=steady),
            "cache float32, verified reader, copy=False": lambda: read_cache(paths["float32"], args.batch_size,
                                                                             False, False, reader=steady),
            "cache float16 -> float32, new reader": lambda: read_cache(paths["float16"], args.batch_size),
            f"cache topk:{args.k} -> dense, new reader": lambda: read_cache(paths[f"topk:{args.k}"],
                                                                           args.batch_size),
            f"cache topk:{args.k} sparse, new reader": lambda: read_cache(paths[f"topk:{args.k}"], args.batch_size,
                                                                          topk_as="sparse"),
            "plain np.memmap, shuffled rows, fancy index (baseline 2)":
                lambda: read_plain_shuffled(paths["plain"], shape, args.batch_size, order),
            "cache float32, verified reader, take(shuffled rows)":
                lambda: take_cache(steady, args.batch_size, order),
            "  same, rows found by input digest (index built in the pass)":
                lambda: take_cache(steady, args.batch_size, order, stored_digests),
        }
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                times[name].append(run())
        steady.close()
        base = statistics.median(times["plain np.memmap, copy per batch (baseline)"])
        print(f"\nread throughput, batch {args.batch_size}, median of {args.repeats} alternating runs "
              "(GB/s of dense float32 knowledge delivered):")
        for name, values in times.items():
            seconds = statistics.median(values)
            print(f"  {name:<62} {dense_bytes / seconds / 1e9:6.2f} GB/s  ({base / seconds:4.2f}x baseline)")
        images = rng.random((8192, 1, 28, 28), dtype=np.float32)
        digest_times = {"sample_digests (vectorised, mix64x2-v1)": [], "per-sample hashlib.sha256 loop (before)": []}
        for _ in range(args.repeats):
            for name, digest in zip(digest_times, (sample_digests, sha256_digests)):
                began = time.perf_counter()
                for lo in range(0, len(images), args.batch_size):
                    digest({"img": images[lo:lo + args.batch_size]})
                digest_times[name].append(time.perf_counter() - began)
        print(f"\ninput digests of MNIST-size float32 inputs (3136 B/sample), batch {args.batch_size}, median of "
              f"{args.repeats} alternating runs:")
        for name, values in digest_times.items():
            seconds = statistics.median(values)
            print(f"  {name:<42} {len(images) / seconds:9,.0f} samples/s  {images.nbytes / seconds / 1e9:5.2f} GB/s")
        if args.epoch_samples:
            bench_offline_epochs(args, root)
        if args.student_models and args.student_steps:
            bench_student_view(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def sha256_digests(inputs: dict) -> np.ndarray:
    """The previous input digest (first 16 bytes of sha256 per sample, a Python loop), as a baseline."""
    array = np.ascontiguousarray(inputs["img"])
    rows = array.reshape(len(array), -1).view(np.uint8)
    header = f"img|{array.dtype.str}|{array.shape[1:]}|".encode()
    return np.frombuffer(b"".join(hashlib.sha256(header + row.tobytes()).digest()[:16] for row in rows),
                         np.uint8).reshape(len(array), 16)


def load_fashion_mnist(count: int) -> np.ndarray:
    with gzip.open(FASHION_MNIST, "rb") as f:
        raw = f.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    if count > len(images):
        raise SystemExit(f"--epoch-samples {count}: Fashion-MNIST train has {len(images)} images")
    return images[:count]


def bench_offline_epochs(args: argparse.Namespace, root: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fake_teacher import fake_config, serve

    from distill_reader import DistillReader

    images = load_fashion_mnist(args.epoch_samples)
    labels = np.arange(len(images), dtype=np.int64) % 10
    batch = args.batch_size

    def plain():
        for lo in range(0, len(images), batch):
            yield (images[lo:lo + batch].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0,
                   labels[lo:lo + batch])

    shuffle_rng = np.random.RandomState(0)

    def shuffled():   # a new order every epoch, as paddle.io.DataLoader(shuffle=True) gives
        order = shuffle_rng.permutation(len(images))
        for lo in range(0, len(images), batch):
            rows = order[lo:lo + batch]
            yield images[rows].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0, labels[rows]

    conf_dir = os.path.join(root, "fake_conf")
    fake_config(classes=args.epoch_classes).save(conf_dir, "serving_client_conf.prototxt")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = serve([port], latency=0.001, classes=args.epoch_classes)
    cache = os.path.join(root, "offline_cache")
    try:
        def run(dr: DistillReader, generator=plain) -> float:
            began = time.perf_counter()
            for _ in dr.set_batch_generator(generator)():
                pass
            return time.perf_counter() - began

        def run_shuffled(dr: DistillReader) -> float:
            try:
                return run(dr, shuffled)
            except KnowledgeError as exc:   # a distill_reader that reads caches by position only
                print(f"  shuffled cached epoch refused: {type(exc).__name__}")
                return float("nan")

        def generator_alone(generator) -> float:
            began = time.perf_counter()
            for _ in generator():
                pass
            return time.perf_counter() - began

        def reader(check_inputs: bool) -> DistillReader:
            dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
            dr.set_fixed_teacher(f"127.0.0.1:{port}")
            dr.set_serving_conf_file(conf_dir)
            dr.set_teacher_batch_size(batch)
            dr.set_offline_cache(cache, check_inputs=check_inputs)
            return dr

        with reader(True) as writer_dr:
            first = run(writer_dr)
        knowledge = len(images) * args.epoch_classes * 4
        print(f"\nDistillReader offline mode: {len(images)} Fashion-MNIST images, batch {batch}, "
              f"{args.epoch_classes}-class float32 answers ({knowledge / 1e6:.0f} MB per epoch)")
        print(f"  first pass (fake teacher, 1 ms/request, writing the cache): {first:6.2f} s")
        times = {"plain generator alone": [], "cached epoch (inputs checked)": [],
                 "cached epoch (check_inputs=False)": [], "shuffled generator alone": [],
                 "shuffled cached epoch (by input digest)": []}
        with reader(True) as checked, reader(False) as unchecked:
            run(checked)
            run(unchecked)  # first read of each reader verifies the shards; measure the steady state
            for _ in range(args.repeats):
                times["plain generator alone"].append(generator_alone(plain))
                times["cached epoch (inputs checked)"].append(run(checked))
                times["cached epoch (check_inputs=False)"].append(run(unchecked))
                times["shuffled generator alone"].append(generator_alone(shuffled))
                times["shuffled cached epoch (by input digest)"].append(run_shuffled(checked))
        for name, values in times.items():
            base = statistics.median(times["shuffled generator alone" if "shuffled" in name
                                           else "plain generator alone"])
            seconds = statistics.median(values)
            print(f"  {name:<40} {seconds:6.3f} s  {len(images) / seconds:9,.0f} samples/s  "
                  f"({seconds / base:4.2f}x the {'shuffled' if 'shuffled' in name else 'plain'} generator's time, "
                  f"{len(images) * args.epoch_classes * 4 / seconds / 1e9:5.2f} GB/s of knowledge)")
    finally:
        for server in servers:
            server.stop(0)


def bench_student_view(args: argparse.Namespace, root: str) -> None:
    """Part 3: a dygraph training loop fed by the cached DistillReader vs by a plain in-memory generator."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import paddle
    from fake_teacher import fake_config, fake_predictions, serve
    from student_loop import lenet_student, steps_per_second
    from tqdm import tqdm

    from distill_reader import DistillReader

    paddle.disable_static()
    paddle.set_device("cpu")
    batch, steps = args.student_batch, args.student_steps
    images = load_fashion_mnist(batch * steps).reshape(-1, 1, 28, 28)
    labels = (np.arange(len(images)) % 10).astype(np.int64).reshape(-1, 1)
    soft = fake_predictions(images.astype(np.float32) / 255.0, 10)   # what the teacher answers (cached)

    def inputs(lo: int) -> tuple:
        return images[lo:lo + batch].astype(np.float32) / 255.0, labels[lo:lo + batch]

    def plain_batches():
        for lo in range(0, len(images), batch):
            yield inputs(lo) + (soft[lo:lo + batch],)

    def student_batches():
        for lo in range(0, len(images), batch):
            yield inputs(lo)

    conf_dir = os.path.join(root, "student_conf")
    fake_config(classes=10).save(conf_dir, "serving_client_conf.prototxt")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = serve([port], latency=0.001, classes=10)
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
    try:
        dr.set_fixed_teacher(f"127.0.0.1:{port}")
        dr.set_serving_conf_file(conf_dir)
        dr.set_teacher_batch_size(batch)
        dr.set_offline_cache(os.path.join(root, "student_cache"))
        reader = dr.set_batch_generator(student_batches)
        for _ in reader():   # first pass: writes the cache
            pass
    finally:
        for server in servers:
            server.stop(0)
    print(f"\nstudent view: dygraph training on {len(images)} Fashion-MNIST images, batch {batch}, {steps} steps "
          f"per round, soft labels of 10 classes; cached DistillReader (no teacher running) vs plain generator")
    try:
        for name in [m.strip() for m in args.student_models.split(",") if m.strip()]:
            paddle.seed(0)
            if name == "cnn":   # the same student as bench_reader's student view
                model = lenet_student()
            elif name == "mlp":
                model = paddle.nn.Sequential(paddle.nn.Flatten(), paddle.nn.Linear(784, 256), paddle.nn.ReLU(),
                                             paddle.nn.Linear(256, 10))
            else:
                raise SystemExit(f"--student-models: unknown model {name!r} (cnn, mlp)")
            optimizer = paddle.optimizer.SGD(learning_rate=0.01, parameters=model.parameters())

            def train(source, model=model, optimizer=optimizer) -> float:
                return steps_per_second(model, optimizer, source, steps)

            train(plain_batches())   # warm-up both paths (the first cached epoch also checks the shards)
            train(reader())
            assert dr.last_epoch_stats.stage["cache"] == "read"
            plain_rates, cached_rates = [], []
            for _ in tqdm(range(args.student_rounds), desc=f"student view {name} (alternating rounds)", disable=None):
                plain_rates.append(train(plain_batches()))
                cached_rates.append(train(reader()))
            plain, cached = statistics.median(plain_rates), statistics.median(cached_rates)
            paired = [c / p for c, p in zip(cached_rates, plain_rates)]
            print(f"  {name}: plain generator {plain:7.1f} steps/s, cached DistillReader {cached:7.1f} steps/s, "
                  f"ratio of medians {cached / plain:.3f} (paired ratios {min(paired):.3f}-{max(paired):.3f})")
    finally:
        dr.close()


if __name__ == "__main__":
    main()
