"""DistillReader in front of a plain grpcio server with default options (grpc-core's ping policy): seconds per
epoch of one slow batch, and whether the server answered the client's keepalive pings with GOAWAY too_many_pings.

The server is ``tests/support/plain_grpc.py`` (answers after ``--delay`` seconds); the reader has one teacher,
``keepalive_time=1``, ``request_timeout=60``, ``per_teacher_in_flight=4``, other options default. Epoch 1 includes
starting the reader's worker processes. Run from the repository root (``--conf``: a serving client config whose
feed is ``img`` [1, 28, 28] and fetch ``prediction`` [10], e.g. the one ``tests/support/teacher.py`` exports).

Example::

    python benchmarks/bench_keepalive.py --conf serving_client/serving_client_conf.prototxt --epochs 3
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from typing import Sequence

import numpy as np  # noqa: I001  (numpy before paddle)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill_reader import DistillReader  # noqa: E402
from tests.support.plain_grpc import PlainGrpcServer, expected_answer  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conf", required=True, help="serving client config (feed img, fetch prediction)")
    parser.add_argument("--delay", type=float, default=6.0, help="seconds the server takes per batch (default 6)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of one batch each (default 3)")
    parser.add_argument("--batch", type=int, default=16, help="samples per batch (default 16)")
    args = parser.parse_args(argv)

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    reader_logger = logging.getLogger("distill_reader")
    reader_logger.addHandler(handler)
    reader_logger.setLevel(logging.INFO)
    images = np.random.default_rng(2).random((args.batch, 1, 28, 28), dtype=np.float32)
    times = []
    with PlainGrpcServer(delay=args.delay) as server:
        reader = DistillReader(ins=["img", "label"], predicts=["prediction"], request_timeout=60,
                               keepalive_time=1.0, per_teacher_in_flight=4)
        reader.set_fixed_teacher([server.endpoint])
        reader.set_serving_conf_file(args.conf)
        reader.set_teacher_batch_size(args.batch)
        generator = reader.set_batch_generator(lambda: iter([(images, np.arange(args.batch))]))
        try:
            for _ in range(args.epochs):
                started = time.monotonic()
                out = list(generator())
                times.append(time.monotonic() - started)
                np.testing.assert_allclose(out[0][2], expected_answer(images), rtol=1e-5)
        finally:
            reader.close()
    text = log.getvalue().lower()
    if os.environ.get("BENCH_VERBOSE"):
        print(log.getvalue())
    print(f"seconds per epoch (one {args.delay:g} s batch): {', '.join(f'{t:.2f}' for t in times)}")
    print(f"GOAWAY too_many_pings: {'too many pings' in text or 'too_many_pings' in text}; "
          f"teacher set aside: {text.count('set aside (')} time(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
