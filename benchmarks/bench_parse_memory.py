"""Memory while the teacher parses one request, per wire form, as a multiple of the body (issue 26).

For each form (raw ``tensor_content``; Paddle Serving's typed fields for int64 with small and large values,
int32, float32, float64, bool) a body of ``--elements`` values is written to a file; a fresh process reads it,
then parses it as the server does (``teachers.grpc_front.read_request``: the decoded-size bound of
``distill_base/wire_size.py``, then ``Request.ParseFromString``; then ``InferenceHandler.parse``), and reports its
peak resident memory (``VmHWM``, reset just before) over the resident memory before parsing, divided by the body
size (Linux only); "refused" marks a body the bound refused before protobuf parsed it (err_no 5000).
``--compare DIR`` runs the same measurement with another checkout's code (e.g. the code before a change, which
has no ``read_request``: it parses every body) side by side. A second table gives the time of the bound alone
per request (``check_decoded_size``: 0 for a body under 128 KiB, which is not walked) next to protobuf's parse.

Example::

    python benchmarks/bench_parse_memory.py --elements 8000000
    python benchmarks/bench_parse_memory.py --compare /tmp/old-checkout
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile

FORMS = {  # name: (dtype, raw?, value)
    "raw float32": ("float32", True, 0), "typed int64 (values < 128)": ("int64", False, 0),
    "typed int64 (values 2^40)": ("int64", False, 1 << 40), "typed int32 (values < 128)": ("int32", False, 0),
    "typed float32": ("float32", False, 0), "typed float64": ("float64", False, 0), "typed bool": ("bool", False, 0)}
ELEM_TYPES = {"int64": 0, "float32": 1, "int32": 2, "float64": 3, "bool": 9}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ground(name: str):
    """A module shared by both sides of the wire, in this checkout (``distill_base``) or in one from before the
    ground package (``distill_reader``), so that ``--compare`` can run an older checkout."""
    try:
        return importlib.import_module(f"distill_base.{name}")
    except ImportError:
        return importlib.import_module(f"distill_reader.{name}")


def make_body(path: str, dtype: str, raw: bool, value: int, elements: int) -> None:
    import numpy as np

    service_pb2 = _ground("proto.general_model_service_pb2")
    encode_tensor = _ground("tensor_codec").encode_tensor

    request = service_pb2.Request()
    encode_tensor(np.full((elements, 1), value, dtype), "x", raw=raw, out=request.tensor.add())
    with open(path, "wb") as f:
        f.write(request.SerializeToString())


def measure(path: str, dtype: str) -> str:
    """Run in a fresh process: peak RSS growth while parsing / body bytes, "refused" appended when refused."""
    import gc

    import numpy as np  # noqa: F401 - loaded before the measurement starts

    from teachers.inference import InferenceHandler

    service_pb2 = _ground("proto.general_model_service_pb2")
    ServingConfig, VarSpec = _ground("serving_config").ServingConfig, _ground("serving_config").VarSpec

    config = ServingConfig(feeds=(VarSpec("x", "x", ELEM_TYPES[dtype], (1,)),), fetches=(VarSpec("y", "y", 1, (1,)),))
    handler = InferenceHandler(config)
    read_request = None   # a checkout from before the bound parses every body
    for front in ("teachers.grpc_front", "teachers.server"):   # the gRPC front's module, then its older name
        try:
            read_request = importlib.import_module(front).read_request
            break
        except (ImportError, AttributeError):
            continue
    with open(path, "rb") as f:
        body = f.read()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:   # resets the peak (VmHWM): ru_maxrss would keep the parent's
        f.write("5")
    resident = _status_kib("VmRSS")
    refused = ""
    if read_request is None:
        request = service_pb2.Request()
        request.ParseFromString(body)
        handler.parse(request)
    else:
        DecodedSizeError = _ground("wire_size").DecodedSizeError
        try:
            handler.parse(read_request(body))
        except DecodedSizeError:
            refused = " refused"
    return f"{(_status_kib('VmHWM') - resident) * 1024 / len(body):.2f}x{refused}"


def scan_cost(dtype: str, raw: bool, value: int, elements: int, repeat: int) -> tuple:
    """(body bytes, microseconds of check_decoded_size per request, of Request.ParseFromString) in this process."""
    import time

    import numpy as np

    from distill_base.proto import general_model_service_pb2 as service_pb2
    from distill_base.tensor_codec import encode_tensor
    from distill_base.wire_size import DecodedSizeError, check_decoded_size

    request = service_pb2.Request(fetch_var_names=["y"])
    encode_tensor(np.full((elements, 1), value, dtype), "x", raw=raw, out=request.tensor.add())
    body = request.SerializeToString()
    start = time.perf_counter()
    for _ in range(repeat):
        try:
            check_decoded_size(body)
        except DecodedSizeError:
            pass
    scan = (time.perf_counter() - start) / repeat * 1e6
    start = time.perf_counter()
    for _ in range(repeat):
        service_pb2.Request.FromString(body)
    return len(body), scan, (time.perf_counter() - start) / repeat * 1e6


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=8_000_000, help="values per request (default 8000000)")
    parser.add_argument("--compare", default=None, metavar="DIR",
                        help="another checkout whose code is measured side by side (default: none)")
    parser.add_argument("--scan_cost", action="store_true",
                        help="also time the decoded-size bound per request for MNIST-size and 1 MB bodies "
                             "(default: off)")
    parser.add_argument("--repeat", type=int, default=200, help="requests per --scan_cost timing (default 200)")
    parser.add_argument("--measure", nargs=2, metavar=("BODY", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(measure(*args.measure))
        return 0
    trees = [("this checkout", ROOT)] + ([("--compare", os.path.abspath(args.compare))] if args.compare else [])
    print(f"| form ({args.elements} values) | body bytes | " + " | ".join(f"peak / body, {n}" for n, _ in trees) + " |")
    print("|---|---|" + "---|" * len(trees))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (dtype, raw, value) in FORMS.items():
            body = os.path.join(tmp, "body")
            make_body(body, dtype, raw, value, args.elements)
            ratios = []
            for _, tree in trees:
                env = dict(os.environ, PYTHONPATH=tree)
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", body, dtype], env=env,
                                     cwd=tree, capture_output=True, text=True, check=True)
                ratios.append(out.stdout.strip())
            print(f"| {name} | {os.path.getsize(body)} | " + " | ".join(ratios) + " |")
    if args.scan_cost:
        print("\n| request | body bytes | decoded-size bound, us | protobuf parse, us |\n|---|---|---|---|")
        for name, dtype, raw, value, elements in (
                ("MNIST batch 32, typed float32", "float32", False, 0, 32 * 784),
                ("MNIST batch 32, raw float32", "float32", True, 0, 32 * 784),
                ("1 MB typed float32", "float32", False, 0, 250_000),
                ("1 MB typed int64 (values < 128)", "int64", False, 0, 1_000_000),
                ("1 MB typed int64 (values 2^40)", "int64", False, 1 << 40, 166_000)):
            size, scan, parse = scan_cost(dtype, raw, value, elements, args.repeat)
            print(f"| {name} | {size} | {scan:.1f} | {parse:.1f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.environ.get("PYTHONPATH", ROOT).split(os.pathsep)[0])
    raise SystemExit(main())
