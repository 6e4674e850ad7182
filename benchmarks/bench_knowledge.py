"""Knowledge files: read throughput against plain NumPy memory maps of the same bytes, and sizes per storage.

Part 1: writes 1000-class float32 logits for ``--samples`` samples as float32, float16 and top-k (k=10) caches plus
one raw file with the same float32 bytes, warms the page cache, then reads everything in batches of
``--batch-size``, alternating cache and baseline runs ``--repeats`` times, and prints the median throughput of each.

Part 2 (DistillReader offline mode): Fashion-MNIST train images through a plain batch generator (uint8 -> float32
/ 255), against the same generator wrapped by a DistillReader whose offline cache (1000-class float32 answers of
an in-process fake teacher, written in a first pass) is complete: cached epochs vs the generator alone.

    python benchmarks/bench_knowledge.py --samples 65536
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import numpy as np

from distill_reader.knowledge import KnowledgeReader, KnowledgeWriter, sample_digests

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
            print(f"  {name:<46} {dense_bytes / seconds / 1e9:6.2f} GB/s  ({base / seconds:4.2f}x baseline)")
        images = rng.random((8192, 1, 28, 28), dtype=np.float32)
        began = time.perf_counter()
        for lo in range(0, len(images), args.batch_size):
            sample_digests({"img": images[lo:lo + args.batch_size]})
        seconds = time.perf_counter() - began
        print(f"\nsample_digests of MNIST-size inputs (3136 B/sample): {len(images) / seconds:,.0f} samples/s, "
              f"{images.nbytes / seconds / 1e9:.2f} GB/s")
        if args.epoch_samples:
            bench_offline_epochs(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


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

    conf_dir = os.path.join(root, "fake_conf")
    fake_config(classes=args.epoch_classes).save(conf_dir, "serving_client_conf.prototxt")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = serve([port], latency=0.001, classes=args.epoch_classes)
    cache = os.path.join(root, "offline_cache")
    try:
        def run(dr: DistillReader) -> float:
            began = time.perf_counter()
            for _ in dr.set_batch_generator(plain)():
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
                 "cached epoch (check_inputs=False)": []}
        with reader(True) as checked, reader(False) as unchecked:
            run(checked)
            run(unchecked)  # first read of each reader verifies the shards; measure the steady state
            for _ in range(args.repeats):
                began = time.perf_counter()
                for _ in plain():
                    pass
                times["plain generator alone"].append(time.perf_counter() - began)
                times["cached epoch (inputs checked)"].append(run(checked))
                times["cached epoch (check_inputs=False)"].append(run(unchecked))
        base = statistics.median(times["plain generator alone"])
        for name, values in times.items():
            seconds = statistics.median(values)
            print(f"  {name:<36} {seconds:6.3f} s  {len(images) / seconds:9,.0f} samples/s  "
                  f"({seconds / base:4.2f}x the plain generator's time)")
    finally:
        for server in servers:
            server.stop(0)


if __name__ == "__main__":
    main()
