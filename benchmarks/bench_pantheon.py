"""Online Pantheon knowledge throughput: our framed transport vs a multiprocessing.managers queue over TCP.

Each measurement moves the same knowledge, float32 logits of ``--classes`` classes at batch ``--batch_size``,
from a producer process to this process, side by side in one run:

- ``managers queue (pickle)``: Pantheon's transport: a ``BaseManager`` server process hosting a queue, the
  producer putting dicts of arrays through a proxy, this process getting them through another proxy.
- ``transport``: ``distill_reader.pantheon.transport.Connection`` (authenticated, JSON header + raw buffers,
  HMAC-SHA256 per frame).
- ``HMAC-SHA256 alone``: the per-frame MAC of every batch in this process, no network: the ceiling the MAC
  puts on one direction.
- ``Teacher -> Student``: the full path: ``Teacher.start_knowledge_service`` in the producer (the logits are
  a feed of the teacher program, so no compute), ``Student.get_knowledge_generator`` here (decode, check,
  re-batch, merge thread), float32 and with ``use_fp16=True``.

Example::

    python benchmarks/bench_pantheon.py --batches 200
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.managers import BaseManager

import numpy as np

TOKEN = "bench-token"


def _logits(batch_size: int, classes: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch_size, classes)).astype("float32")


# ---------------------------------------------------------------- managers queue (Pantheon's transport)


class _QueueManager(BaseManager):
    pass


def _serve_queue_manager(port: int, ready) -> None:
    import queue

    q = queue.Queue(100)
    _QueueManager.register("get_queue", callable=lambda: q)
    manager = _QueueManager(address=("127.0.0.1", port), authkey=b"aBcXyZ123")
    server = manager.get_server()
    ready.set()
    server.serve_forever()


def _manager_producer(port: int, batches: int, batch_size: int, classes: int) -> None:
    _QueueManager.register("get_queue")
    manager = _QueueManager(address=("127.0.0.1", port), authkey=b"aBcXyZ123")
    manager.connect()
    q = manager.get_queue()
    logits = _logits(batch_size, classes)
    for _ in range(batches):
        q.put({"logits": logits})
    q.put(None)


def bench_managers(batches: int, batch_size: int, classes: int) -> float:
    ctx = mp.get_context("spawn")
    port = _free_port()
    ready = ctx.Event()
    server = ctx.Process(target=_serve_queue_manager, args=(port, ready), daemon=True)
    server.start()
    ready.wait(30)
    producer = ctx.Process(target=_manager_producer, args=(port, batches, batch_size, classes), daemon=True)
    try:
        _QueueManager.register("get_queue")
        manager = _QueueManager(address=("127.0.0.1", port), authkey=b"aBcXyZ123")
        manager.connect()
        q = manager.get_queue()
        producer.start()
        first = q.get()  # start the clock once the producer is running
        started, received = time.perf_counter(), 1
        assert first["logits"].shape == (batch_size, classes)
        while q.get() is not None:
            received += 1
        elapsed = time.perf_counter() - started
    finally:
        producer.join(30)
        server.terminate()
        server.join(10)
    assert received == batches
    return (batches - 1) * batch_size * classes * 4 / elapsed / 1e6


# ---------------------------------------------------------------- our transport, raw


def _transport_producer(port: int, batches: int, batch_size: int, classes: int) -> None:
    from distill_reader.pantheon.transport import Listener

    listener = Listener("127.0.0.1", port, TOKEN.encode())
    conn = listener.accept(timeout=30)
    listener.close()
    logits = _logits(batch_size, classes)
    for _ in range(batches):
        conn.send("batch", {"logits": logits})
    conn.send("end")
    conn.recv()  # wait for the consumer's goodbye
    conn.close()


def bench_transport(batches: int, batch_size: int, classes: int) -> float:
    from distill_reader.pantheon.transport import connect

    ctx = mp.get_context("spawn")
    port = _free_port()
    producer = ctx.Process(target=_transport_producer, args=(port, batches, batch_size, classes), daemon=True)
    producer.start()
    try:
        conn = connect(f"127.0.0.1:{port}", TOKEN.encode(), timeout=30)
        kind, first, _ = conn.recv()
        started, received = time.perf_counter(), 1
        assert first["logits"].shape == (batch_size, classes)
        while True:
            kind, value, _ = conn.recv()
            if kind == "end":
                break
            received += 1
        elapsed = time.perf_counter() - started
        conn.send("bye")
        conn.close()
    finally:
        producer.join(30)
    assert received == batches
    return (batches - 1) * batch_size * classes * 4 / elapsed / 1e6


# ---------------------------------------------------------------- the per-frame MAC alone


def bench_mac(batches: int, batch_size: int, classes: int) -> float:
    """HMAC-SHA256 of every batch in this process: the ceiling the per-frame MAC puts on one direction (the sender
    and the receiver each hash every byte once, in their own processes)."""
    import hashlib
    import hmac

    logits = memoryview(_logits(batch_size, classes)).cast("B")
    started = time.perf_counter()
    for _ in range(batches):
        hmac.new(b"k" * 32, logits, hashlib.sha256).digest()
    return batches * logits.nbytes / (time.perf_counter() - started) / 1e6


# ---------------------------------------------------------------- Teacher -> Student


def _teacher_producer(port: int, batches: int, batch_size: int, classes: int, use_fp16: bool) -> None:
    import numpy  # noqa: F401  (before paddle)
    import paddle

    from distill_reader.pantheon import Teacher

    paddle.enable_static()
    startup, program = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(program, startup):
        logits_var = paddle.static.data(name="logits", shape=[-1, classes], dtype="float32")
    exe = paddle.static.Executor(paddle.CPUPlace())
    logits = _logits(batch_size, classes)

    def reader():
        for _ in range(batches):
            yield [logits]

    teacher = Teacher(out_port=port, out_host="127.0.0.1", token=TOKEN, timeout=30)
    teacher.start()
    teacher.start_knowledge_service(feed_list=[logits_var], schema={"logits": logits_var}, program=program,
                                    reader_config={"batch_generator": reader}, exe=exe, use_fp16=use_fp16)


def bench_teacher_student(batches: int, batch_size: int, classes: int, use_fp16: bool) -> float:
    from distill_reader.pantheon import Student

    ctx = mp.get_context("spawn")
    port = _free_port()
    producer = ctx.Process(target=_teacher_producer, args=(port, batches, batch_size, classes, use_fp16),
                           daemon=True)
    producer.start()
    try:
        student = Student(token=TOKEN, timeout=60)
        student.register_teacher(in_address=f"127.0.0.1:{port}")
        student.start()
        student.get_knowledge_desc()
        generator = student.get_knowledge_generator(batch_size=batch_size)()
        first = next(generator)
        started, received = time.perf_counter(), 1
        assert first["logits"].dtype == np.float32
        for _ in generator:
            received += 1
        elapsed = time.perf_counter() - started
        student.close()
    finally:
        producer.join(60)
    assert received == batches
    return (batches - 1) * batch_size * classes * 4 / elapsed / 1e6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200, help="batches per measurement (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=256, help="rows per batch (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=1000, help="logits per row (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the best of each is reported "
                                                              "(default: %(default)s)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mb = args.batch_size * args.classes * 4 / 1e6
    print(f"{args.batches} batches of {args.batch_size} x {args.classes} float32 logits ({mb:.2f} MB each), "
          f"best of {args.repeat} rounds (MB/s of float32 knowledge delivered)")
    cases = [
        ("managers queue (pickle)", lambda: bench_managers(args.batches, args.batch_size, args.classes)),
        ("transport (raw frames)", lambda: bench_transport(args.batches, args.batch_size, args.classes)),
        ("HMAC-SHA256 alone, 1 core", lambda: bench_mac(args.batches, args.batch_size, args.classes)),
        ("Teacher -> Student fp32", lambda: bench_teacher_student(args.batches, args.batch_size, args.classes,
                                                                  False)),
        ("Teacher -> Student fp16", lambda: bench_teacher_student(args.batches, args.batch_size, args.classes,
                                                                  True)),
    ]
    best = {name: 0.0 for name, _ in cases}
    for _ in range(args.repeat):
        for name, run in cases:  # interleaved: each round measures every case side by side
            best[name] = max(best[name], run())
    base = best["managers queue (pickle)"]
    for name, _ in cases:
        print(f"{name:26s} {best[name]:9.1f} MB/s   {best[name] / base:5.2f}x managers queue")


if __name__ == "__main__":
    main()
