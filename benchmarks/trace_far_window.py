"""Trace of a far teacher's in-flight window (issue 25): the bench's four fake teachers of 50 ms, teacher 4's
link +300 ms (``--delay_ms``) for one epoch, then healed; every ``--every`` seconds, teacher 4's window, requests
out, seconds-per-request estimate and measured round trip, summarised per second (min-max of the window and
requests out, the estimate's max), beside throughput over a fault-free epoch. Shows whether the window settles at
the bandwidth-delay product (2 + 0.3 / 0.05 = 8) or swings. Needs root, ``ip`` and ``iptables`` (as
benchmarks/bench_network_faults.py, whose set-up it reuses).

Example::

    sudo python benchmarks/trace_far_window.py --seconds 10
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bench_network_faults as bench  # noqa: E402

from distill_reader import DistillReader  # noqa: E402
from tests.support import netns  # noqa: E402


def _sample(dr: DistillReader, endpoint: str, every: float, stop: threading.Event, rows: list) -> None:
    began = time.monotonic()
    while not stop.wait(every):
        pool = dr.pool
        rows.append((time.monotonic() - began, pool.window_of(endpoint), pool.outstanding(endpoint),
                     pool.service_time(endpoint) or 0.0, pool.round_trip(endpoint) or 0.0))


def _summary(rows: list, since: float, until: float) -> list[str]:
    lines = []
    for second in range(int(since), int(until) + 1):
        part = [r for r in rows if second <= r[0] < second + 1]
        if part:
            windows, outs = [r[1] for r in part], [r[2] for r in part]
            lines.append(f"{second - since:5.0f} s  window {min(windows):2d}-{max(windows):2d}  out "
                         f"{min(outs):2d}-{max(outs):2d}  s/req max {max(r[3] for r in part):6.3f}  "
                         f"rtt {part[-1][4]:.3f}")
    return lines


def run(seconds: float, latency_ms: float, every: float, workdir: str, delay_ms: float = 300.0) -> list[str]:
    out = []
    with bench.four_teachers(latency_ms, workdir) as rig:
        dr, endpoints, images = rig.dr, rig.endpoints, rig.images
        ideal = seconds / (latency_ms / 1000.0)
        rows: list = []
        stop = threading.Event()
        try:
            bench._epoch(dr, images, 3.0)
            base, _ = bench._epoch(dr, images, seconds)
            sampler = threading.Thread(target=_sample, args=(dr, endpoints[3], every, stop, rows), daemon=True)
            began = time.monotonic()
            sampler.start()
            for name, delay in ((f"+{delay_ms:g} ms on teacher 4", delay_ms), ("after the heal", 0)):
                with open(rig.delay_file, "w") as f:
                    f.write(str(delay))
                since = time.monotonic() - began
                rate, requests = bench._epoch(dr, images, seconds)
                out.append(f"{name}: throughput / fault-free {rate / base:.3f}, teacher 4 reqs / ideal "
                           f"{requests.get(endpoints[3], 0) / ideal:.3f}")
                out.extend(_summary(rows, since, time.monotonic() - began))
        finally:
            stop.set()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each epoch, seconds")
    parser.add_argument("--latency_ms", type=float, default=50.0, help="each fake teacher's service time, ms")
    parser.add_argument("--delay_ms", type=float, default=300.0, help="teacher 4's added round trip, ms")
    parser.add_argument("--every", type=float, default=0.1, help="seconds between two samples of teacher 4")
    args = parser.parse_args(argv)
    reason = netns.unavailable()
    if reason:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="trace_far_window_") as workdir:
        for line in run(args.seconds, args.latency_ms, args.every, workdir, args.delay_ms):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
