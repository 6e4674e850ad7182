"""The floor of a Python gRPC server: server CPU per unary call of an echo handler on grpcio's asyncio server
(``grpc.aio``) vs its synchronous thread-pool server, measured side by side in one run (alternating rounds).

The teacher server cannot cost less per request than this; it is what is left of the "fixed cost per request"
when the teacher's own work (validation, the hand-off to a predictor thread, encoding) is taken away.

    python benchmarks/bench_grpc_floor.py [--calls 3000] [--rounds 3] [--size 3200]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

import grpc

SERVICE, METHOD = "Echo", "echo"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _handlers(fn):
    return (grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(fn)}),)


def serve(kind: str, port: int) -> None:
    """Run an echo server of ``kind`` ("aio" or "sync") on 127.0.0.1:``port`` until killed."""
    if kind == "aio":
        async def echo(body, context):
            return body

        async def main() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers(_handlers(echo))
            server.add_insecure_port(f"127.0.0.1:{port}")
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


def measure(kind: str, calls: int, size: int) -> float:
    """Server CPU microseconds per echo call of ``size`` bytes, one client calling back to back."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.support.procs import free_port, port_is_open, wait_for

    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", str(port)])
    try:
        wait_for(lambda: port_is_open(port), 30, f"{kind} echo server")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
            body = b"x" * size
            for _ in range(200):
                call(body, timeout=10)
            start = _cpu_seconds(proc.pid)
            for _ in range(calls):
                call(body, timeout=10)
            return (_cpu_seconds(proc.pid) - start) / calls * 1e6
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per measurement (default: 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both servers (default: 3)")
    parser.add_argument("--size", type=int, default=3200, help="request bytes (default: 3200, one 28x28 image)")
    parser.add_argument("--serve", choices=["aio", "sync"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    results: dict = {"aio": [], "sync": []}
    for _ in range(args.rounds):
        for kind in results:
            results[kind].append(measure(kind, args.calls, args.size))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {args.calls} calls of "
          f"{args.size} bytes per measurement")
    for kind, values in results.items():
        print(f"{kind:5s} server CPU per echo call: " + ", ".join(f"{v:.0f}" for v in values) + " us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
