"""A predictor worker process: one Paddle Inference predictor, run for the teacher server over the protocol of
``teachers.worker_protocol`` (docs/architecture.md, "Predictor worker protocol").

Started by ``teachers.worker_pool`` as a fresh interpreter (never a fork of a process that imported paddle)::

    python -m teachers.predictor_worker --fd 5 --parent 1234 --index 0

It dies with the server (``PR_SET_PDEATHSIG``), imports paddle at once (so a spare worker, started before any
worker is lost, only has to load the model when it takes a lost one's place), ignores SIGINT/SIGTERM (set after
paddle's own handlers: the server drains first and then says ``stop``, or kills it), loads the model named in the
``start`` message, answers ``ready`` (or ``error`` and exits 1), then runs one ``job`` at a time until ``stop``
or the channel closes. A spare is started with index -1: it loads the model and waits; ``place`` tells it which
worker it now is. Its process name (``/proc/PID/comm``, ``ps -o comm``) is ``dr-spare``, ``dr-worker-N`` once it
has its place.
"""
from __future__ import annotations

import argparse
import ctypes
import gzip  # noqa: F401  (gzip/zlib and numpy before paddle: paddle 2.6.2 exports zlib symbols)
import logging
import os
import signal
import socket
import sys
import time
import zlib  # noqa: F401
from typing import Optional, Sequence

import numpy as np

from . import worker_protocol as wire

logger = logging.getLogger("teachers.predictor_worker")
LOD_PREFIX = "lod:"    # layout name of a feed's (or fetch's) LoD offsets, int64
# Paddle's error kinds that mean "this input does not fit the model" (ValueError / IndexError in Python)
_INPUT_ERRORS = ("InvalidArgument", "OutOfRange")   # "(InvalidArgument) ..." or "InvalidArgumentError: ..."


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the server dies (even by SIGKILL); exit now if it is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: the closed channel still ends the worker once idle
        pass
    if os.getppid() != parent:
        sys.exit(0)


def _set_name(name: str) -> None:
    """The process name ``ps`` and ``/proc/PID/comm`` show (PR_SET_NAME; at most 15 bytes; Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def classify(exc: BaseException) -> str:
    """"input" when Paddle refused the input (InvalidArgument / OutOfRange), else "internal"."""
    text = str(exc)
    return "input" if any(kind in text for kind in _INPUT_ERRORS) else "internal"


class Worker:
    """The worker's state: its predictor and the server's blocks it is attached to."""

    def __init__(self, sock: socket.socket, index: int):
        self.sock = sock
        self.index = index
        self.pool = None
        self.inputs: Optional[wire.shared_memory.SharedMemory] = None
        self.outputs: Optional[wire.shared_memory.SharedMemory] = None
        self._in_name = self._out_name = ""      # the names the server gave for the blocks attached

    def load(self, options: dict) -> bool:
        from .predictor_pool import PredictorOptions, PredictorPool

        try:
            # glog on while loading: Paddle names each IR pass it runs, so a crash inside one can be named
            self.pool = PredictorPool(PredictorOptions(**options, size=1, quiet=False))
        except BaseException as exc:  # noqa: BLE001 - every load failure is reported, then the worker exits
            wire.send(self.sock, "error", stage="load", message=f"{type(exc).__name__}: {exc}".strip())
            return False
        import paddle

        wire.send(self.sock, "ready", pid=os.getpid(), inputs=self.pool.input_names,
                  outputs=self.pool.output_names, paddle=paddle.__version__)
        return True

    def _switch(self, current, name: Optional[str]):
        if not name or (current is not None and current.name.lstrip("/") == name.lstrip("/")):
            return current
        wire.release_block(current, unlink=False)
        return wire.attach_block(name)

    def serve(self) -> None:
        """Run jobs from the server until the channel closes.

        Raises:
            ProtocolError: the server sent a message that is not a job.
        """
        while True:
            message = wire.receive(self.sock)
            if message is None or message["kind"] == "stop":
                return
            job = message.get("id")
            if message["kind"] == "place":   # a spare takes a lost worker's place
                self.index = int(message["index"])
                _set_name(f"dr-worker-{self.index}")
                continue
            try:
                if message["kind"] != "job":
                    raise wire.ProtocolError(f"unexpected {message['kind']!r} message")
                self._job(message)
            except Exception as exc:  # noqa: BLE001 - the job fails, the worker goes on
                # Paddle's messages start with the Python stack that built the model: the error is at the end
                wire.send(self.sock, "error", id=job, cls=classify(exc), message=f"{exc}".strip()[-4000:])

    def _job(self, message: dict) -> None:
        name = message.get("in")
        if name and name != self._in_name:
            self.inputs, self._in_name = self._switch(self.inputs, name), name
        name = message.get("out")
        if name and name != self._out_name:
            self.outputs, self._out_name = self._switch(self.outputs, name), name
        feeds = wire.read_arrays(self.inputs, message["feeds"])
        lods = None
        if any(n.startswith(LOD_PREFIX) for n in feeds):
            lods = {n[len(LOD_PREFIX):]: a.tolist() for n, a in feeds.items() if n.startswith(LOD_PREFIX)}
            feeds = {n: a for n, a in feeds.items() if not n.startswith(LOD_PREFIX)}
        started, cpu = time.perf_counter(), time.process_time()   # every thread: Paddle's own helpers too
        outputs = self.pool.run(feeds, list(message["fetch"]), lods, timeout=None)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        out = {}
        for name, (array, lod) in outputs.items():
            out[name] = array     # write_arrays copies it into the block whatever its strides
            if lod:
                out[LOD_PREFIX + name] = np.asarray(lod, dtype=np.int64)
        need = wire.layout_size(out)
        if self.outputs is None or need > self.outputs.size:
            wire.send(self.sock, "need", id=message.get("id"), bytes=need)
            grown = wire.receive(self.sock)
            if grown is None or grown["kind"] != "grown":
                raise wire.ProtocolError(f"expected 'grown', got {grown and grown['kind']!r}")
            self.outputs, self._out_name = self._switch(self.outputs, grown["out"]), grown["out"]
        layout = wire.write_arrays(self.outputs, out)
        wire.send_answer(self.sock, message["id"], layout, seconds, cpu)

    def close(self) -> None:
        wire.release_block(self.inputs, unlink=False)
        wire.release_block(self.outputs, unlink=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teachers.predictor_worker",
                                     description="A predictor worker of teachers.serve (started by the server).")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the control channel")
    parser.add_argument("--parent", type=int, required=True, help="pid of the server; the worker dies with it")
    parser.add_argument("--index", type=int, default=0,
                        help="worker number, for log lines, unless the start message gives one (default: 0)")
    args = parser.parse_args(argv)
    _set_name("dr-spare")
    _die_with_parent(args.parent)
    from distill_base.paddle_compat import import_paddle

    try:
        import_paddle("the predictor worker")   # now, before the model is named: the slow part of a start
        from paddle import inference  # noqa: F401
    except ImportError:   # load() reports it in its error message
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the server drains on SIGINT/SIGTERM, then stops us;
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # after paddle's import, which installs a SIGTERM handler
    sock = socket.socket(fileno=args.fd)
    try:
        start = wire.receive(sock)
    except (BrokenPipeError, ConnectionResetError):
        return 0
    if start is None or start["kind"] != "start":
        return 1
    index = int(start.get("index", args.index))     # < 0: a spare, placed later
    if index >= 0:
        _set_name(f"dr-worker-{index}")
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s worker pid {os.getpid()}: %(message)s")
    worker = Worker(sock, index)
    try:
        if not worker.load(start["options"]):
            return 1
        worker.serve()
    except (BrokenPipeError, ConnectionResetError):   # the server is gone
        return 0
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
