"""DistillReader under real network faults (issue 25's table), side by side with a fault-free epoch in one run.

Four fake teachers (benchmarks/fake_teacher.py, one request at a time, ``--latency_ms`` each, default 50), each in
its own network namespace behind a veth link (tests/support/netns.py); reader options at their defaults,
teacher batch 32. The faults are made on teacher 4's link only, inside its namespace:

- latency: an iptables NFQUEUE rule on the namespace's INPUT and tests/support/nfqueue_delay.py, which accepts
  each packet ``delay`` ms later (this kernel has no sch_netem), so its round trip grows by ``delay`` (on INPUT:
  held on OUTPUT, the teacher's packets count against its TCP Small Queues, tests/support/netns.py);
- loss: ``iptables -m statistic --mode random --probability p -j DROP`` on the same OUTPUT (answers and ACKs).

Phases, each an epoch of ``--seconds`` (samples/s over the fault-free epoch's): fault-free; +300 ms on teacher
4 (``during``); the ``--seconds`` right after the heal (``after heal``); 30 % loss on teacher 4; teacher 4 at
1.5 s round trip for ``--far_seconds`` (default 40), where the figure is its requests over its ideal share (the
ideal reader keeps every teacher busy: each answers ``seconds / latency`` requests), over the whole phase and
after its ramp (slow start at 1.5 s per round trip), with the ramp's length and teacher 4's answers per second.
Also printed: teacher 4's share of the requests per phase,
and its window, measured round trip and seconds-per-request estimate at the phase's end.
``--path_change 1500`` instead keeps 16 requests out to one teacher over a connection made while it was near,
then slows its link, with and without the link probes that make a new connection (TCP learns its path once: BBR's
least round trip of the last 10 s). The student process's CPU seconds per phase are printed too.
``--one_request 300`` instead times 100 KB requests to one teacher 300 ms away with the delay held on the
namespace's OUTPUT vs its INPUT, 1, 8 and 16 in flight (on OUTPUT the teacher's own packets count against its TCP
Small Queues while held: ~2 segments per delay). Needs root, ``ip`` and ``iptables`` (scripts/setup.sh installs
both).

Example::

    sudo python benchmarks/bench_network_faults.py --seconds 10
    sudo python benchmarks/bench_network_faults.py --one_request 300
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np  # noqa: I001  (numpy before paddle)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from fake_teacher import fake_config  # noqa: E402

from distill_reader import DistillReader  # noqa: E402
from distill_reader.client import TeacherClient  # noqa: E402
from tests.support import netns  # noqa: E402

BATCH = 32


def _iptables(namespace: netns.Namespace, *args: str) -> None:
    subprocess.run(namespace.exec_args(["iptables", *args]), check=True, capture_output=True, timeout=30)


def _wait_serving(endpoint: str, conf: str, timeout: float = 60.0) -> None:
    with TeacherClient(endpoint, conf) as client:
        deadline = time.monotonic() + timeout
        while not client.health(timeout=1.0):
            if time.monotonic() > deadline:
                raise SystemExit(f"fake teacher {endpoint} not serving after {timeout}s")
            time.sleep(0.1)


def _start_teacher(ns: netns.Namespace, latency_ms: float) -> str:
    """A fake teacher of ``latency_ms`` in ``ns`` (stopped with it); its endpoint."""
    ns.guard.python(os.path.join(HERE, "fake_teacher.py"), "--host", ns.address, "--port", "9300",
                    "--latency_ms", str(latency_ms), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"{ns.address}:9300"


def _start_delay(ns: netns.Namespace, delay_file: str, delay_ms: float, chain: str = "INPUT") -> None:
    """The delay emulator in ``ns`` (tests/support/nfqueue_delay.py), reading ``delay_file`` (written with
    ``delay_ms`` now), for the TCP packets of the test's side held on ``chain``: INPUT, what the student sends
    (held on OUTPUT, the teacher's own packets count against its TCP Small Queues until released: ~2 segments per
    delay, netns.py), or OUTPUT (``--one_request``'s comparison)."""
    with open(delay_file, "w") as f:
        f.write(str(delay_ms))
    ns.guard.python(os.path.join(ROOT, "tests", "support", "nfqueue_delay.py"), "--queue", "1",
                    "--delay_file", delay_file, stdout=subprocess.DEVNULL)
    time.sleep(0.5)   # bound to its queue before packets go there (NFQUEUE drops them while none listens)
    peer = ["-s" if chain == "INPUT" else "-d", ns.host_address]
    _iptables(ns, "-A", chain, *peer, "-p", "tcp", "-j", "NFQUEUE", "--queue-num", "1")


def _epoch(dr: DistillReader, images: np.ndarray, seconds: float) -> tuple[float, dict]:
    """Samples/s of an epoch that reads for ``seconds``, and requests per teacher (checked: every sample once,
    in order, right)."""
    labels = np.zeros((BATCH, 1), dtype=np.int64)
    stop = [0.0]

    def generate():
        i = 0
        while time.monotonic() < stop[0]:
            j = i % 8
            yield images[j * BATCH:(j + 1) * BATCH] + i, labels
            i += 1

    stop[0] = time.monotonic() + seconds
    start, samples = time.monotonic(), 0
    for i, (img, _, prediction) in enumerate(dr.set_batch_generator(generate)()):
        j = i % 8
        expected = (images[j * BATCH:(j + 1) * BATCH] + i).reshape(BATCH, -1).astype(np.float64).sum(1)
        if not np.allclose(np.asarray(prediction)[:, 0], expected.astype(np.float32), rtol=1e-5):
            raise SystemExit(f"batch {i}: wrong or out-of-order prediction")
        samples += len(img)
    elapsed = time.monotonic() - start
    stats = dr.last_epoch_stats
    return samples / elapsed, {t: s["requests"] for t, s in stats.teachers.items()} if stats else {}


def far_phase(dr: DistillReader, images: np.ndarray, seconds: float, endpoint: str, address: str, base: float,
              ideal_rate: float, delay_file: str, rows: list) -> None:
    """Teacher 4 at a 1.5 s round trip for one epoch of ``seconds``: a row for the whole phase and one for after
    its ramp (TCP's slow start at 1.5 s per doubling, the pool's window growing), when its answers per second (3 s
    running mean) first reach 0.8 of its rate over the phase's last half; ``ss -tin`` of the student's connections
    to it at the end (their cwnd); the other teachers' answers per second beside (a far teacher must not hold
    them back: the reorder buffer waits on its tasks)."""
    with open(delay_file, "w") as f:
        f.write("1500")
    counts: list[tuple[float, int]] = []
    others: list[int] = []  # each second: the other teachers' answer count, together
    trace: list[str] = []   # each second: requests out / window, seconds-per-request estimate
    stop = threading.Event()

    def sample() -> None:   # the pool's per-epoch answer count of teacher 4 (read without its lock: an int)
        start = time.monotonic()
        while not stop.wait(1.0):
            state = dr.pool._teachers.get(endpoint)
            counts.append((time.monotonic() - start, state.requests if state is not None else 0))
            others.append(sum(s.requests for e, s in list(dr.pool._teachers.items()) if e != endpoint))
            trace.append(f"{dr.pool.outstanding(endpoint)}/{dr.pool.window_of(endpoint)} "
                         f"{dr.pool.service_time(endpoint) or 0.0:.2f}")

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rate, requests = _epoch(dr, images, seconds)
    stop.set()
    thread.join()
    answered = requests.get(endpoint, 0)
    per_second = np.diff([0] + [n for _, n in counts])[:int(seconds)]   # (the epoch's end drains past its seconds)
    late = per_second[len(per_second) // 2:]
    plateau = float(late.mean()) if len(late) else 0.0
    running = np.convolve(per_second, np.ones(3) / 3, mode="valid") if len(per_second) >= 3 else per_second
    ramp = next((i + 3 for i, r in enumerate(running) if r >= 0.8 * plateau and plateau > 0), len(per_second))
    after = answered - (counts[ramp - 1][1] if 0 < ramp <= len(counts) else 0)
    share = answered / max(1, sum(requests.values()))
    window, rtt = dr.pool.window_of(endpoint), dr.pool.round_trip(endpoint) or 0.0
    per_request = dr.pool.service_time(endpoint) or 0.0
    rows.append((f"1.5 s round trip, {seconds:g} s", "its share within 20 %", rate / base, share,
                 answered / (ideal_rate * seconds), window, rtt, per_request))
    rows.append((f"same, after its {ramp} s ramp", "its share within 20 %", np.nan, np.nan,
                 after / (ideal_rate * (seconds - ramp)) if ramp < seconds else np.nan, window, rtt, per_request))
    ss = subprocess.run(["ss", "-tin", "dst", address], capture_output=True, text=True, timeout=30).stdout
    cwnds = [part.split(":")[1] for part in ss.split() if part.startswith("cwnd:")]
    min_rtts = [part.split(":")[1] for part in ss.split() if part.startswith("minrtt:")]   # ms, the kernel's
    print(f"teacher 4 answers per second in the 1.5 s phase: {per_second.tolist()}; student's connections to it: "
          f"{len(cwnds)}, cwnd {cwnds}, least round trip (ms) of those that carried data {min_rtts}\n"
          f"its requests out / window, s per request each second: {trace}\n"
          f"the other teachers' answers per second, together: {np.diff([0] + others)[:int(seconds)].tolist()}",
          flush=True)


@dataclass
class Rig:
    """Four fake teachers, each in a network namespace of its own, teacher 4's link delayed by the milliseconds
    written to ``delay_file`` (0 at first), and a reader of them all (``dr``)."""

    dr: DistillReader
    endpoints: list
    far: netns.Namespace
    delay_file: str
    images: np.ndarray


@contextlib.contextmanager
def four_teachers(latency_ms: float, workdir: str) -> Iterator[Rig]:
    """The bench's set-up (also benchmarks/trace_far_window.py's); everything made is removed on exit."""
    conf = fake_config((1, 28, 28)).save(os.path.join(workdir, "conf"), "serving_client_conf.prototxt")
    images = np.random.default_rng(0).random((BATCH * 8, 1, 28, 28), dtype=np.float32)
    delay_file = os.path.join(workdir, "delay_ms")
    with netns.namespaces() as make:
        spaces = [make() for _ in range(4)]
        endpoints = [_start_teacher(ns, latency_ms) for ns in spaces]
        for endpoint in endpoints:
            _wait_serving(endpoint, conf)
        far = spaces[3]
        _start_delay(far, delay_file, 0)
        time.sleep(1.0)
        dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
        dr.set_fixed_teacher(endpoints)
        dr.set_serving_conf_file(conf)
        dr.set_teacher_batch_size(BATCH)
        try:
            yield Rig(dr, endpoints, far, delay_file, images)
        finally:
            dr.close()


def run(seconds: float, latency_ms: float, workdir: str,
        loss_only: bool = False, far_seconds: float = 0.0,
        far_only: bool = False, far_route: str = "",
        far_from_start: bool = False) -> list[tuple[str, str, float, float]]:
    rows = []
    with four_teachers(latency_ms, workdir) as rig:
        dr, endpoints, far, delay_file, images = rig.dr, rig.endpoints, rig.far, rig.delay_file, rig.images
        ideal = seconds / (latency_ms / 1000.0)
        if far_from_start:
            return _far_from_start(rig, seconds, far_seconds, ideal)
        _epoch(dr, images, 3.0)   # warm-up: workers, channels, estimates
        base, _ = _epoch(dr, images, seconds)

        def phase(name: str, goal: str, delay_ms: float) -> tuple[float, dict]:
            with open(delay_file, "w") as f:
                f.write(str(delay_ms))
            cpu = time.process_time()
            rate, requests = _epoch(dr, images, seconds)
            print(f"{name}: the student process used {time.process_time() - cpu:.2f} s of CPU in {seconds:g} s",
                  flush=True)
            share = requests.get(endpoints[3], 0) / max(1, sum(requests.values()))
            rows.append((name, goal, rate / base, share, requests.get(endpoints[3], 0) / ideal,
                         dr.pool.window_of(endpoints[3]), dr.pool.round_trip(endpoints[3]) or 0.0,
                         dr.pool.service_time(endpoints[3]) or 0.0))
            return rate, requests

        rows.append(("fault-free", "-", 1.0, np.nan, np.nan, 0, 0.0, 0.0))
        if not loss_only and not far_only:
            phase("+300 ms on 1 of 4, during", ">= 0.9", 300)
            phase("same, the epoch after the heal", ">= 0.95", 0)
        if not far_only:
            _iptables(far, "-I", "OUTPUT", "-m", "statistic", "--mode", "random", "--probability", "0.3", "-j",
                      "DROP")
            phase("30 % loss on 1 of 4", ">= 0.9", 0)
            _iptables(far, "-D", "OUTPUT", "-m", "statistic", "--mode", "random", "--probability", "0.3",
                      "-j", "DROP")
        if not loss_only:
            if far_route:   # the student host's route to the far teacher, as a user with one would set it
                subprocess.run(["ip", "route", "replace", f"{far.address}/32", "dev", far.host_link,
                                "src", far.host_address, *far_route.split()], check=True, timeout=30)
            far_phase(dr, images, far_seconds, endpoints[3], far.address, base, ideal / seconds, delay_file,
                      rows)
    return rows


def _far_from_start(rig: Rig, seconds: float, far_seconds: float, ideal: float) -> list[tuple]:
    """Teacher 4 1.5 s away before the reader's first epoch (its workers connect over the far link, as to a teacher
    in another region: no connection state from a near link), that epoch ``far_seconds`` long; then the link healed
    and the fault-free epoch the figures are relative to."""
    with open(rig.delay_file, "w") as f:
        f.write("1500")
    time.sleep(0.5)   # (the delay emulator reads the file every 0.2 s)
    far_rows: list = []
    far_phase(rig.dr, rig.images, far_seconds, rig.endpoints[3], rig.far.address, 1.0, ideal / seconds,
              rig.delay_file, far_rows)
    with open(rig.delay_file, "w") as f:
        f.write("0")
    _epoch(rig.dr, rig.images, 3.0)
    base, _ = _epoch(rig.dr, rig.images, seconds)
    return [("fault-free (after)", "-", 1.0, np.nan, np.nan, 0, 0.0, 0.0)] + [
        (name.replace("1.5 s round trip", "1.5 s from the start"), goal, ratio / base, *rest)
        for name, goal, ratio, *rest in far_rows]


def _keep_asking(client: TeacherClient, x: np.ndarray, stop: float, latencies: list) -> None:
    while time.monotonic() < stop:
        began = time.monotonic()
        client.predict({"img": x}, batch_size=BATCH)
        latencies.append(time.monotonic() - began)


def one_request(delay_ms: float, latency_ms: float, workdir: str, seconds: float = 8.0) -> list[tuple]:
    """What 100 KB requests (teacher batch 32 of 1x28x28 float32) cost over a link ``delay_ms`` longer, with the
    delay held on the namespace's OUTPUT (the teacher's packets) or INPUT (the student's), side by side: one
    request at a time after 1 s idle, then ``in_flight`` requests kept out for ``seconds``. Rows: (where,
    in_flight, answers/s, median latency s, first request's latency s)."""
    conf = fake_config((1, 28, 28)).save(os.path.join(workdir, "conf1"), "serving_client_conf.prototxt")
    x = np.random.default_rng(0).random((BATCH, 1, 28, 28), dtype=np.float32)
    rows = []
    for where in ("OUTPUT", "INPUT"):
        for in_flight in (1, 8, 16):
            with netns.namespaces() as make:
                ns = make()
                endpoint = _start_teacher(ns, latency_ms)
                _wait_serving(endpoint, conf)
                _start_delay(ns, os.path.join(workdir, f"delay_{where}"), delay_ms, chain=where)
                with TeacherClient(endpoint, conf) as client:
                    client.predict({"img": x}, batch_size=BATCH)
                    time.sleep(1.0)
                    started = time.monotonic()
                    client.predict({"img": x}, batch_size=BATCH)
                    first = time.monotonic() - started
                    latencies: list[float] = []
                    stop = time.monotonic() + seconds

                    threads = [threading.Thread(target=_keep_asking, args=(client, x, stop, latencies))
                               for _ in range(in_flight)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                rows.append((where, in_flight, len(latencies) / seconds, float(np.median(latencies)), first))
    return rows


def path_change(delay_ms: float, latency_ms: float, workdir: str, seconds: float = 20.0,
                in_flight: int = 16) -> list[tuple]:
    """A connection made while the teacher was near, its link then ``delay_ms`` longer: ``in_flight`` requests kept
    out for ``seconds``, with the link probed every 0.5 s as the reader's workers do (``network_round_trip``: a new
    connection once 2 probes agree) or not probed (the old connection kept, as before issue 25's change). Rows:
    (probed, answers per second each second, the kernel's least round trip of the client's connections, ms)."""
    conf = fake_config((1, 28, 28)).save(os.path.join(workdir, "conf2"), "serving_client_conf.prototxt")
    x = np.random.default_rng(0).random((BATCH, 1, 28, 28), dtype=np.float32)
    rows = []
    for probed in (False, True):
        with netns.namespaces() as make:
            ns = make()
            endpoint = _start_teacher(ns, latency_ms)
            _wait_serving(endpoint, conf)
            delay_file = os.path.join(workdir, f"delay_path_{probed}")
            _start_delay(ns, delay_file, 0)
            with TeacherClient(endpoint, conf, timeout=120.0) as client:
                latencies: list[float] = []
                stop = time.monotonic() + 2.0 + seconds
                threads = [threading.Thread(target=_keep_asking, args=(client, x, stop, latencies), daemon=True)
                           for _ in range(in_flight)]
                for thread in threads:
                    thread.start()
                time.sleep(2.0)   # near: the connection is made and busy
                with open(delay_file, "w") as f:
                    f.write(str(delay_ms))
                per_second, before = [], len(latencies)
                for _ in range(int(seconds)):
                    deadline = time.monotonic() + 1.0
                    while probed and time.monotonic() < deadline - 0.5:
                        client.network_round_trip(timeout=2.0 + 2 * delay_ms / 1000.0, handshakes=3)
                        time.sleep(max(0.0, 0.5 - delay_ms / 1000.0))
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    per_second.append(len(latencies) - before)
                    before = len(latencies)
                ss = subprocess.run(["ss", "-tin", "dst", ns.address], capture_output=True, text=True,
                                    timeout=30).stdout
                min_rtts = [part.split(":")[1] for part in ss.split() if part.startswith("minrtt:")]
                with open(delay_file, "w") as f:
                    f.write("0")   # the threads' last requests finish quickly
                for thread in threads:
                    thread.join(30.0)
            rows.append((probed, per_second, min_rtts))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase's epoch, seconds")
    parser.add_argument("--latency_ms", type=float, default=50.0, help="each fake teacher's service time, ms")
    parser.add_argument("--one_request", type=float, default=0.0, metavar="DELAY_MS",
                        help="instead: 100 KB requests to one teacher DELAY_MS away, the delay held on OUTPUT vs "
                             "INPUT, 1 / 8 / 16 in flight (what one request costs over the delayed link)")
    parser.add_argument("--path_change", type=float, default=0.0, metavar="DELAY_MS",
                        help="instead: 16 requests kept out to one teacher over a connection made while it was near, "
                             "its link then DELAY_MS longer, with and without the link probes that make a new "
                             "connection (answers per second each second, the kernel's least round trip)")
    parser.add_argument("--far_seconds", type=float, default=40.0,
                        help="length of the 1.5 s round-trip phase, seconds (0: --seconds); long enough to show the "
                             "far teacher's ramp and its steady state")
    parser.add_argument("--far_only", action="store_true",
                        help="only the fault-free and the 1.5 s round-trip phases")
    parser.add_argument("--far_route", default="", metavar="OPTIONS",
                        help="before the 1.5 s phase, the host's route to teacher 4 gets these ip-route options "
                             "(e.g. 'rto_min 2000ms initcwnd 100 initrwnd 100'): what a user can set for a far teacher")
    parser.add_argument("--far_from_start", action="store_true",
                        help="only the 1.5 s phase, with teacher 4 far before the reader's first epoch (its "
                             "connections made over the far link, as to a teacher in another region), then the "
                             "fault-free epoch")
    parser.add_argument("--loss_only", action="store_true",
                        help="only the fault-free and the 30 %% loss phases (issue 25's lossy teacher)")
    args = parser.parse_args(argv)
    reason = netns.unavailable()
    if reason:
        raise SystemExit(reason)
    if args.one_request:
        with tempfile.TemporaryDirectory(prefix="bench_netfaults_") as workdir:
            rows = one_request(args.one_request, args.latency_ms, workdir)
        print(f"{'delay held on':<14} {'in flight':>9} {'answers/s':>10} {'ideal':>6} {'median latency s':>17} "
              f"{'one request after 1 s idle, s':>30}")
        for where, in_flight, rate, median, first in rows:
            print(f"{where:<14} {in_flight:>9d} {rate:>10.1f} {1000 / args.latency_ms:>6.1f} {median:>17.3f} "
                  f"{first:>30.3f}")
        return 0
    if args.path_change:
        with tempfile.TemporaryDirectory(prefix="bench_netfaults_") as workdir:
            for probed, per_second, min_rtts in path_change(args.path_change, args.latency_ms, workdir):
                print(f"{'probed, new connection' if probed else 'not probed, old connection':<27} answers/s "
                      f"{per_second} (mean of the last 10 s {np.mean(per_second[-10:]):.1f}, ideal "
                      f"{1000 / args.latency_ms:.0f}); least round trip of its connections, ms: {min_rtts}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_netfaults_") as workdir:
        rows = run(args.seconds, args.latency_ms, workdir, args.loss_only, args.far_seconds or args.seconds,
                   args.far_only, args.far_route, args.far_from_start)
    print(f"{'phase':<34} {'goal':<22} {'throughput / fault-free':>24} {'teacher 4 share':>16} "
          f"{'t4 reqs / ideal':>16} {'t4 window, rtt, s/req at end':>30}")
    for name, goal, ratio, share, of_ideal, window, rtt, per_request in rows:
        print(f"{name:<34} {goal:<22} {ratio:>24.3f} {share:>16.3f} {of_ideal:>16.3f} "
              f"{window:>10d} {rtt:>8.3f} {per_request:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
