"""DistillReader under gray failures (issue 11's goals), with fake teachers each in its own process.

Parts (``bench_reader.py --parts frozen,slow,healthy``, or ``--parts gray`` for all three), every reader option at
its default, teacher batch 32 (one task per student batch), MNIST-sized inputs:

- frozen: 4 teachers at 20 ms; one is frozen with SIGSTOP (its connections stay open) a third of the way into
  the epoch and stays frozen to the end (SIGCONT afterwards). Reported: the longest gap between two yielded
  batches (goal <= 1 s) and samples/s, overall and after the freeze against the ideal of the three left.
- slow: 4 teachers, one at 10x the latency (200 ms) of the others (20 ms). Reported: samples/s over the ideal sum
  of the four teachers' rates (goal >= 0.85), and, measured right after, what the reader gets from the three fast
  teachers alone (what ignoring the slow one gives), over the same ideal.
- healthy: 4 teachers at 20 ms: efficiency vs ideal (goal >= 0.95) and the fraction of requests that were hedges
  (goal <= 2 %), from ``last_epoch_stats.stage`` ("hedges", "requests"; '-' when the reader does not report them).

Example::

    python benchmarks/bench_reader.py --parts gray --seconds 3
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Harness:
    """What bench_reader.py provides: ``free_port()``, ``wait_serving(endpoint, conf)`` and
    ``make_reader(endpoints, conf, teacher_batch_size) -> DistillReader`` (every other option at its default)."""

    free_port: Callable[[], int]
    wait_serving: Callable[[str, str], None]
    make_reader: Callable[..., Any]

GRAY_PARTS = ("frozen", "slow", "healthy")


@dataclass
class GrayResult:
    """One row of the gray-failure table."""

    part: str
    samples_per_s: float
    ideal: float
    longest_gap: float
    hedges: Optional[float] = None
    requests: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.samples_per_s / self.ideal

    @property
    def hedged(self) -> str:
        if self.hedges is None or not self.requests:
            return "-"
        return f"{100.0 * self.hedges / self.requests:.1f}% ({self.hedges:g}/{self.requests:g})"


@contextlib.contextmanager
def teacher_processes(harness: Harness, latencies_ms: Sequence[float],
                      conf: str) -> Iterator[list[tuple[str, subprocess.Popen]]]:
    """One fake teacher process per latency; yields ``[(endpoint, process)]`` once all serve. On the way out
    every process is resumed (SIGCONT) and stopped."""
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        for latency in latencies_ms:
            port = harness.free_port()
            args = [sys.executable, os.path.join(HERE, "fake_teacher.py"), "--port", str(port),
                    "--latency_ms", str(latency)]
            procs.append((f"127.0.0.1:{port}",
                          subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        for endpoint, _ in procs:
            harness.wait_serving(endpoint, conf)
        yield procs
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for _, proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _timed_epoch(reader, on_batch=None) -> tuple[int, float, float, list[float]]:
    """(samples, seconds, longest gap between two yields, yield times) of one epoch; ``on_batch(i)`` after each."""
    started = last = time.perf_counter()
    samples, gap, times = 0, 0.0, []
    for i, batch in enumerate(reader()):
        now = time.perf_counter()
        gap = max(gap, now - last)
        last = now
        times.append(now - started)
        samples += len(batch[0])
        if on_batch is not None:
            on_batch(i)
    return samples, time.perf_counter() - started, gap, times


def _stage_counts(dr) -> tuple[Optional[float], Optional[float], dict]:
    """(hedges, requests, per-teacher stats) of the reader's last epoch (None where it does not say)."""
    stats = dr.last_epoch_stats
    stage = stats.stage if stats is not None else {}
    return stage.get("hedges"), stage.get("requests"), dict(stats.teachers) if stats is not None else {}


def _run_reader(harness: Harness, endpoints: Sequence[str], conf: str, batch: int, n_batches: int,
                images: np.ndarray, on_batch=None):
    """Warm up, then one timed epoch of ``n_batches`` student batches of ``batch``; returns (dr stats, timing)."""
    labels = np.zeros((batch, 1), dtype=np.int64)

    def batches(n: int):
        def generate():
            for i in range(n):
                j = i % 8
                yield images[j * batch:(j + 1) * batch], labels
        return generate

    dr = harness.make_reader(endpoints, conf, batch)
    try:
        for _ in dr.set_batch_generator(batches(10))():   # warm-up: workers, channels, latency estimates
            pass
        timing = _timed_epoch(dr.set_batch_generator(batches(n_batches)), on_batch)
        counts = _stage_counts(dr)
    finally:
        dr.close()
    return counts, timing


def bench_frozen(harness: Harness, conf: str, latency_ms: float, batch: int, seconds: float) -> GrayResult:
    """4 teachers; one SIGSTOPped a third of the way into the epoch. Longest gap, samples/s, rate after."""
    images = np.random.default_rng(3).random((batch * 8, 1, 28, 28), dtype=np.float32)
    ideal = 4 * batch / (latency_ms / 1000.0)
    n_batches = max(30, int(ideal * seconds / batch))
    freeze_at = n_batches // 3
    with teacher_processes(harness, [latency_ms] * 4, conf) as procs:
        victim = procs[1][1]

        def freeze(i: int) -> None:
            if i == freeze_at:
                victim.send_signal(signal.SIGSTOP)   # resumed below, and by teacher_processes on any exit

        (hedges, requests, _), (samples, elapsed, gap, times) = _run_reader(
            harness, [e for e, _ in procs], conf, batch, n_batches, images, freeze)
        victim.send_signal(signal.SIGCONT)
    after = len(times) - 1 - freeze_at
    after_seconds = times[-1] - times[freeze_at]
    after_rate = after * batch / after_seconds if after_seconds > 0 else 0.0
    return GrayResult("frozen", samples / elapsed, ideal, gap, hedges, requests,
                      {"after the freeze / ideal of 3": after_rate / (ideal * 3 / 4)})


def bench_slow(harness: Harness, conf: str, latency_ms: float, batch: int, seconds: float,
               factor: float = 10.0) -> GrayResult:
    """4 teachers, one at ``factor`` x the latency; then the three fast ones alone. Rates over the ideal sum."""
    images = np.random.default_rng(4).random((batch * 8, 1, 28, 28), dtype=np.float32)
    latencies = [latency_ms * factor] + [latency_ms] * 3
    ideal = sum(batch / (lat / 1000.0) for lat in latencies)
    n_batches = max(30, int(ideal * seconds / batch))
    with teacher_processes(harness, latencies, conf) as procs:
        endpoints = [e for e, _ in procs]
        (hedges, requests, teachers), (samples, elapsed, gap, _) = _run_reader(harness, endpoints, conf, batch,
                                                                               n_batches, images)
        _, (fast_samples, fast_elapsed, _, _) = _run_reader(harness, endpoints[1:], conf, batch, n_batches,
                                                            images)
    slow_requests = teachers.get(endpoints[0], {}).get("requests", 0)
    all_requests = sum(t.get("requests", 0) for t in teachers.values()) or 1
    return GrayResult("slow", samples / elapsed, ideal, gap, hedges, requests,
                      {"slow teacher's share of requests (its share of the ideal: "
                       f"{batch / (latencies[0] / 1000.0) / ideal:.3f})": slow_requests / all_requests,
                       "three fast teachers alone / ideal of 4": fast_samples / fast_elapsed / ideal,
                       "ideal of the three / ideal of 4": (ideal - batch / (latencies[0] / 1000.0)) / ideal})


def bench_healthy(harness: Harness, conf: str, latency_ms: float, batch: int, seconds: float) -> GrayResult:
    """4 healthy teachers: efficiency vs ideal and the hedged fraction."""
    images = np.random.default_rng(5).random((batch * 8, 1, 28, 28), dtype=np.float32)
    ideal = 4 * batch / (latency_ms / 1000.0)
    n_batches = max(30, int(ideal * seconds / batch))
    with teacher_processes(harness, [latency_ms] * 4, conf) as procs:
        (hedges, requests, _), (samples, elapsed, gap, _) = _run_reader(harness, [e for e, _ in procs], conf,
                                                                     batch, n_batches, images)
    return GrayResult("healthy", samples / elapsed, ideal, gap, hedges, requests)


def run_gray(harness: Harness, parts: Sequence[str], latency_ms: float, batch: int, seconds: float,
             workdir: str, slow_factor: float = 10.0) -> list[GrayResult]:
    """Run the chosen gray-failure parts in order; returns their rows."""
    from fake_teacher import fake_config

    conf = fake_config((1, 28, 28)).save(os.path.join(workdir, "gray_conf"), "serving_client_conf.prototxt")
    rows = []
    for part in parts:
        if part == "slow":
            rows.append(bench_slow(harness, conf, latency_ms, batch, seconds, slow_factor))
        else:
            bench = bench_frozen if part == "frozen" else bench_healthy
            rows.append(bench(harness, conf, latency_ms, batch, seconds))
    return rows


def print_gray(rows: Sequence[GrayResult], latency_ms: float, batch: int) -> None:
    print(f"\ngray failures (4 fake teachers, one process each, {latency_ms:g} ms, teacher batch {batch}, reader "
          "defaults; goals: frozen gap <= 1 s, slow >= 0.85, healthy >= 0.95 with <= 2 % hedged)")
    print(f"{'part':<8} {'samples/s':>10} {'ideal':>8} {'ratio':>7} {'longest gap':>12}  hedged")
    for row in rows:
        print(f"{row.part:<8} {row.samples_per_s:>10.0f} {row.ideal:>8.0f} {row.ratio:>7.3f} "
              f"{row.longest_gap:>11.2f}s  {row.hedged}")
        for key, value in row.extra.items():
            print(f"         {key}: {value:.3f}")
