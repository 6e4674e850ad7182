"""The floor of a Python gRPC server: server CPU per unary call of an echo handler on grpcio's asyncio server
(``grpc.aio``) vs its synchronous thread-pool server, measured side by side in one run (alternating rounds).

The teacher server cannot cost less per request than this; it is what is left of the "fixed cost per request"
when the teacher's own work (validation, the hand-off to a predictor thread, encoding) is taken away.

With ``--clients N`` (> 1) N client processes call back to back for ``--seconds`` (the teacher benchmark's load)
and two more grpc.aio servers show what the teacher server's structure adds to the floor, step by step:

- ``aio-limit``: the echo server with ``maximum_concurrent_rpcs`` set (the teacher server bounds its calls);
- ``aio-handoff``: that, plus the teacher server's thread hand-off: the handler queues each call to one of 2
  runner threads (a ``queue.SimpleQueue``), which sleeps ``--work_us`` without the GIL (a stand-in for a
  predictor run) and settles the handler's asyncio Future with ``loop.call_soon_threadsafe``;
- ``aio-process``: that limit plus the structure of ``--worker_io loop`` (issue 20) with nothing else: the handler
  sends a 64-byte job on a ``SOCK_SEQPACKET`` socket to one of 2 worker processes (``MSG_DONTWAIT``), which
  sleeps ``--work_us`` and answers 64 bytes; the event loop reads the answer (``add_reader``) and settles the
  handler's Future. Its CPU per call includes the workers' (all of it is overhead: they only sleep). This is
  the floor of the teacher server's design before it parses, validates, copies or encodes anything.

    python benchmarks/bench_grpc_floor.py [--calls 3000] [--rounds 3] [--size 3200]
    python benchmarks/bench_grpc_floor.py --clients 8 [--seconds 3] [--rounds 3] [--work_us 200]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import grpc

SERVICE, METHOD = "Echo", "echo"
KINDS = ("aio", "sync", "aio-limit", "aio-handoff", "aio-process")


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid`` and of its child processes still running (aio-process's workers)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return total + sum(_cpu_seconds(c) for c in children)


def _handlers(fn):
    return (grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(fn)}),)


def _runner(work: queue.SimpleQueue, work_s: float) -> None:
    while True:
        loop, waiter, body = work.get()
        time.sleep(work_s)     # releases the GIL, as a predictor run does
        loop.call_soon_threadsafe(_settle, waiter, body)


def _settle(waiter: asyncio.Future, body: bytes) -> None:
    if not waiter.done():
        waiter.set_result(body)


def _process_worker(sock: socket.socket, work_s: float) -> None:
    """A stand-in predictor worker: each 64-byte job is answered with 64 bytes after ``work_s`` seconds."""
    while True:
        job = sock.recv(64)
        if not job:
            os._exit(0)
        time.sleep(work_s)
        sock.send(job)


class _ProcessWorkers:
    """The event loop's side of ``aio-process``: idle workers, jobs queued while none is idle, answers read by
    ``add_reader`` (as ``teachers.worker_pool`` does with ``--worker_io loop``)."""

    def __init__(self, work_s: float, count: int = 2):
        self.idle: collections.deque = collections.deque()
        self.queued: collections.deque = collections.deque()
        self.waiting: dict = {}
        self.socks = []
        for _ in range(count):     # forked before grpc starts any thread
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            if os.fork() == 0:
                ours.close()
                _process_worker(theirs, work_s)
            theirs.close()
            self.socks.append(ours)
            self.idle.append(ours)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        for sock in self.socks:
            loop.add_reader(sock.fileno(), self._readable, sock)

    def submit(self, waiter: asyncio.Future, body: bytes) -> None:
        if self.idle:
            self._send(self.idle.popleft(), waiter, body)
        else:
            self.queued.append((waiter, body))

    def _send(self, sock: socket.socket, waiter: asyncio.Future, body: bytes) -> None:
        self.waiting[sock.fileno()] = (waiter, body)
        sock.send(b"j" * 64, socket.MSG_DONTWAIT)

    def _readable(self, sock: socket.socket) -> None:
        sock.recv(64, socket.MSG_DONTWAIT)
        waiter, body = self.waiting.pop(sock.fileno())
        _settle(waiter, body)
        if self.queued:
            self._send(sock, *self.queued.popleft())
        else:
            self.idle.append(sock)


def serve(kind: str, port: int, work_us: float) -> None:
    """Run an echo server of ``kind`` (one of KINDS) on 127.0.0.1:``port`` until killed."""
    if kind == "aio-process":
        workers = _ProcessWorkers(work_us / 1e6)

        async def via_process(body, context):
            waiter = asyncio.get_running_loop().create_future()
            workers.submit(waiter, body)
            return await waiter

        async def main_process() -> None:
            workers.attach(asyncio.get_running_loop())
            server = grpc.aio.server(maximum_concurrent_rpcs=64)
            server.add_generic_rpc_handlers(_handlers(via_process))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            await server.wait_for_termination()

        asyncio.run(main_process())
    elif kind.startswith("aio"):
        work: queue.SimpleQueue = queue.SimpleQueue()

        async def echo(body, context):
            return body

        async def handoff(body, context):
            waiter = asyncio.get_running_loop().create_future()
            work.put((asyncio.get_running_loop(), waiter, body))
            return await waiter

        async def main() -> None:
            server = grpc.aio.server(maximum_concurrent_rpcs=64 if kind != "aio" else None)
            server.add_generic_rpc_handlers(_handlers(handoff if kind == "aio-handoff" else echo))
            server.add_insecure_port(f"127.0.0.1:{port}")
            for _ in range(2):
                threading.Thread(target=_runner, args=(work, work_us / 1e6), daemon=True).start()
            await server.start()
            await server.wait_for_termination()

        asyncio.run(main())
    else:
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(16))
        server.add_generic_rpc_handlers(_handlers(lambda body, context: body))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()


def _client(port: int, size: int, seconds: float, start_at: float, out) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        body = b"x" * size
        call(body, timeout=10)
        while time.time() < start_at:
            time.sleep(0.001)
        done = 0
        while time.time() < start_at + seconds:
            call(body, timeout=10)
            done += 1
    out.put(done)


def measure(kind: str, args: argparse.Namespace) -> float:
    """Server CPU microseconds per echo call of ``args.size`` bytes."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.support.procs import free_port, port_is_open, wait_for

    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", str(port),
                             "--work_us", str(args.work_us)])
    try:
        wait_for(lambda: port_is_open(port), 30, f"{kind} echo server")
        if args.clients > 1:
            ctx = mp.get_context("fork")
            out = ctx.Queue()
            start_at = time.time() + 1.0
            procs = [ctx.Process(target=_client, args=(port, args.size, args.seconds, start_at, out))
                     for _ in range(args.clients)]
            for p in procs:
                p.start()
            time.sleep(max(0.0, start_at - time.time()))
            start = _cpu_seconds(proc.pid)
            calls = sum(out.get(timeout=args.seconds + 60) for _ in procs)
            cpu = _cpu_seconds(proc.pid) - start
            for p in procs:
                p.join(timeout=10)
            return cpu / max(calls, 1) * 1e6
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
            body = b"x" * args.size
            for _ in range(200):
                call(body, timeout=10)
            start = _cpu_seconds(proc.pid)
            for _ in range(args.calls):
                call(body, timeout=10)
            return (_cpu_seconds(proc.pid) - start) / args.calls * 1e6
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per measurement, one client (default: 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the servers (default: 3)")
    parser.add_argument("--size", type=int, default=3200, help="request bytes (default: 3200, one 28x28 image)")
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes calling back to back; > 1 also measures aio-limit, aio-handoff and "
                             "aio-process (default: 1)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement with --clients > 1")
    parser.add_argument("--work_us", type=float, default=200.0,
                        help="microseconds each aio-handoff runner or aio-process worker sleeps per call "
                             "(default: 200)")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.work_us)
        return 0
    kinds = KINDS if args.clients > 1 else KINDS[:2]
    results: dict = {kind: [] for kind in kinds}
    load_start = os.getloadavg()[0]
    for _ in range(args.rounds):
        for kind in results:
            results[kind].append(measure(kind, args))
    load = f"load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    if args.clients > 1:
        print(f"machine: {os.cpu_count()} cores, {load}; {args.clients} client processes, {args.seconds}s of "
              f"{args.size}-byte calls per measurement")
    else:
        print(f"machine: {os.cpu_count()} cores, {load}; {args.calls} calls of {args.size} bytes per measurement")
    for kind, values in results.items():
        print(f"{kind:12s} server CPU per echo call: " + ", ".join(f"{v:.0f}" for v in values) + " us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
