"""Shared flags and data readers of the Pantheon toy example (the seed's demo/pantheon/utils.py, on paddle 2.6)."""
from __future__ import annotations

import argparse
import logging

import numpy as np


def str2bool(value: str) -> bool:
    return str(value).lower() in ("true", "t", "1", "yes")


def parse_args(doc: str) -> argparse.Namespace:
    """The teachers' flags (the seed's, plus --out_host, --max_n and --token_file)."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--out_port", type=int, default=None,
                        help="online mode: TCP port to serve knowledge on (default: %(default)s)")
    parser.add_argument("--out_host", type=str, default="0.0.0.0",
                        help="online mode: interface to listen on (default: %(default)s, all interfaces)")
    parser.add_argument("--out_path", type=str, default=None,
                        help="offline mode: knowledge directory to write (default: %(default)s)")
    parser.add_argument("--use_cuda", type=str2bool, default=False,
                        help="predict on GPU 0; falls back to the CPU, with a warning, when paddle has no CUDA "
                             "(default: %(default)s)")
    parser.add_argument("--test_send_recv", type=str2bool, default=False,
                        help="exchange a few messages with the student before serving (default: %(default)s)")
    parser.add_argument("--generator_type", type=str, default="batch_generator",
                        choices=["sample_generator", "sample_list_generator", "batch_generator"],
                        help="which kind of data reader to use (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="batch size of the teacher's reader (default: %(default)s)")
    parser.add_argument("--serving_times", type=int, default=1,
                        help="passes to serve in online mode (default: %(default)s)")
    parser.add_argument("--max_n", type=int, default=1000,
                        help="the reader yields x = 0 .. max_n-1 (default: %(default)s)")
    parser.add_argument("--token_file", type=str, default=None,
                        help="file holding the shared secret of online mode (default: $DISTILL_PANTHEON_TOKEN; "
                             "never give the secret itself on the command line)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the student (default: $DISTILL_PANTHEON_TIMEOUT or 60)")
    args = parser.parse_args()
    if bool(args.out_path) == bool(args.out_port):
        parser.error("give exactly one of --out_path (offline) or --out_port (online)")
    return args


def read_token(path: str | None) -> str | None:
    """The token in ``path`` (surrounding whitespace removed), or None to use $DISTILL_PANTHEON_TOKEN."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def setup_logging() -> None:
    """INFO logs of distill_reader and this example to stderr (on named loggers: importing paddle later
    reconfigures the root logger)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("distill_reader", "pantheon_toy"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


def sample_generator(max_n: int):
    def wrapper():
        for i in range(max_n):
            yield [i]

    return wrapper


def sample_list_generator(max_n: int, batch_size: int = 500):
    def wrapper():
        sample_list = []
        for sample in sample_generator(max_n)():
            sample_list.append(sample)
            if len(sample_list) == batch_size:
                yield sample_list
                sample_list = []
        if sample_list:
            yield sample_list

    return wrapper


def batch_generator(max_n: int, batch_size: int = 500):
    def wrapper():
        for start in range(0, max_n, batch_size):
            yield [np.arange(start, min(start + batch_size, max_n), dtype="int64").reshape((-1, 1))]

    return wrapper


def reader_config(args: argparse.Namespace) -> dict:
    if args.generator_type == "sample_generator":
        return {"sample_generator": sample_generator(args.max_n), "batch_size": args.batch_size, "drop_last": False}
    if args.generator_type == "sample_list_generator":
        return {"sample_list_generator": sample_list_generator(args.max_n, args.batch_size)}
    return {"batch_generator": batch_generator(args.max_n, args.batch_size)}


def make_place(use_cuda: bool):
    """CUDAPlace(0) when asked and available; otherwise the CPU (with a clear warning if CUDA was asked for)."""
    import paddle

    if use_cuda and paddle.is_compiled_with_cuda():
        return paddle.CUDAPlace(0)
    if use_cuda:
        logging.getLogger("pantheon_toy").warning(
            "--use_cuda true, but this paddle build has no CUDA support: predicting on the CPU instead")
    return paddle.CPUPlace()
