"""Smoke test of an install at the lowest versions setup.py admits (run by scripts/smoke_lowest.sh, in its own
venv, without paddle): the package and its generated protobuf/gRPC modules import, a TeacherClient round trip to
a Paddle Serving-protocol teacher (benchmarks/fake_teacher.py, answering ``sum(x) * (j + 1)``) gives the exact
answers, and one DistillReader epoch through a worker process keeps every sample in order with its own answer.

Example::

    .venv-lowest/bin/python scripts/smoke_lowest.py      # exit 0 and one "smoke ok" line
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import google.protobuf
    import grpc

    import distill_base
    import distill_reader
    from distill_reader import DistillReader
    from distill_reader.client import TeacherClient

    for package in (distill_reader, distill_base):   # setup.py's packages include the ground package
        here = os.path.join(REPO, package.__name__) + os.sep
        assert not package.__file__.startswith(here), f"not the installed package: {package.__file__}"
    port, conf = free_port(), tempfile.mkdtemp(prefix="smoke_conf_")
    teacher = subprocess.Popen([sys.executable, os.path.join(REPO, "benchmarks", "fake_teacher.py"), "--port",
                                str(port), "--latency_ms", "1", "--write_conf", conf])
    try:
        conf_file, deadline = os.path.join(conf, "serving_client_conf.prototxt"), time.monotonic() + 60
        while not os.path.exists(conf_file):  # the fake teacher writes it as it starts
            if teacher.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fake teacher on {port} wrote no {conf_file} (exit {teacher.poll()})")
            time.sleep(0.2)
        client = TeacherClient(f"127.0.0.1:{port}", conf_file)
        while not _healthy(client):
            if teacher.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fake teacher on {port} not healthy (exit {teacher.poll()})")
            time.sleep(0.2)
        x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
        want = (x.reshape(4, -1).astype(np.float64).sum(1)[:, None] * np.arange(1, 11)).astype(np.float32)
        got = client.predict({"img": x})["prediction"]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        client.close()
        with DistillReader(ins=["img", "index"], predicts=["prediction"], num_workers=1) as dr:
            dr.set_fixed_teacher(f"127.0.0.1:{port}")
            dr.set_serving_conf_file(os.path.join(conf, "serving_client_conf.prototxt"))
            dr.set_teacher_batch_size(8)
            samples = [(np.full((1, 28, 28), i / 100, np.float32), np.int64(i)) for i in range(40)]
            out = list(dr.set_sample_generator(lambda: iter(samples))())
        assert [int(s[1]) for s in out] == list(range(40)), "order lost"
        for img, _index, prediction in out:
            np.testing.assert_allclose(prediction, float(img.astype(np.float64).sum()) * np.arange(1, 11),
                                       rtol=1e-5)
    finally:
        teacher.terminate()
        teacher.wait(10)
    sys.stdout.write(f"smoke ok: grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}, "
                     f"numpy {np.__version__}, python {sys.version.split()[0]}\n")
    return 0


def _healthy(client) -> bool:
    try:
        return bool(client.health(timeout=1.0))
    except Exception:  # noqa: BLE001 - not listening yet
        return False


if __name__ == "__main__":
    sys.exit(main())
