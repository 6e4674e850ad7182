"""The code that runs in a DistillReader worker process (``python -m distill_reader.worker_process``).

A worker is a fresh interpreter started by ``distill_reader.workers.WorkerPool`` (not a fork of the student, so it
holds no copy of the student's Paddle, gRPC or thread state), joined to the student by one private socket pair. It
reads ``Init`` (``distill_reader.worker_messages``), answers ``Ready``, then keeps one ``TeacherClient`` per
endpoint and runs each ``Task`` and ``Probe`` in a thread of its own, so one worker keeps many teachers busy.
Shutdown protocol steps 3, 5 and 6 (``distill_reader.workers``) are this module's: it leaves at once with
``os._exit(0)`` on ``Stop`` or end-of-file, a watchdog exits it when the student is gone, and it ignores SIGINT.

Example (the pool runs this; by hand only to see the flags)::

    python -m distill_reader.worker_process --help
"""
from __future__ import annotations

import argparse
import logging
import math
import mmap
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Optional, Sequence

from .channel_options import note_round_trip
from .memfd import recv_fd, view
from .worker_messages import (
    Connecting,
    Crashed,
    Done,
    Failed,
    FailureKind,
    Forget,
    FromWorker,
    Init,
    MapBuffer,
    Probe,
    ProbeResult,
    Ready,
    RoundTrip,
    Sent,
    SharedArray,
    Stop,
    Task,
    UnmapBuffer,
    WorkerException,
)

logger = logging.getLogger(__name__)


class Worker:
    """One worker: one TeacherClient per endpoint, one thread per request in flight."""

    def __init__(self, conn: Connection, init: Init):
        from google.protobuf import text_format

        from distill_base.proto import general_model_config_pb2 as config_pb2
        from distill_base.serving_config import ServingConfig

        from .client import (
            TeacherAnswerError,
            TeacherAuthError,
            TeacherClient,
            TeacherRequestRejected,
            TeacherUnavailable,
        )

        message = config_pb2.GeneralModelConfig()
        text_format.Parse(init.config_text, message)
        self.config = ServingConfig.from_proto(message, source=init.config_source)
        self.conn = conn
        self.fetch = list(init.fetch)
        self.client_options = init.settings.client_options()
        # the client's errors by what they mean for the student (most specific first: rejected is an answer error)
        self._kinds = ((TeacherUnavailable, FailureKind.UNAVAILABLE), (TeacherRequestRejected, FailureKind.REJECTED),
                       (TeacherAuthError, FailureKind.AUTH), (TeacherAnswerError, FailureKind.ANSWER))
        self._client_class = TeacherClient
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._buffers: dict[int, mmap.mmap] = {}
        self._executor = ThreadPoolExecutor(max_workers=init.settings.max_threads,
                                            thread_name_prefix="teacher-request")

    def client(self, endpoint: str) -> Any:
        with self._clients_lock:
            client = self._clients.get(endpoint)
            if client is None:
                client = self._client_class(endpoint, self.config, **self.client_options)
                self._clients[endpoint] = client
            return client

    def forget(self, endpoint: str) -> None:
        """Drop the client of ``endpoint``; the next request opens a fresh channel. The old channel is not
        closed here (a request thread may still be using it): it closes when garbage collected."""
        with self._clients_lock:
            self._clients.pop(endpoint, None)

    def round_trip_measured(self, message: RoundTrip) -> None:
        """Another worker's link probe: noted as this process's own measurement of the endpoint (its client, if
        it has one, makes a new connection when the link moved; a client made later fits it from the start)."""
        if not math.isfinite(message.seconds) or message.seconds < 0:
            logger.error("ignoring a round trip of %r s to %s", message.seconds, message.endpoint)
            return
        with self._clients_lock:
            client = self._clients.get(message.endpoint)
        if client is None:
            note_round_trip(message.endpoint, message.seconds)
        else:
            client.round_trip_measured(message.seconds)

    def send(self, message: FromWorker) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except OSError:
                os._exit(0)   # the student is gone (shutdown step 5)

    def map_buffer(self, message: MapBuffer) -> None:
        fd = recv_fd(self.conn)
        try:
            self._buffers[message.buffer_id] = mmap.mmap(fd, message.size)
        finally:
            os.close(fd)

    def unmap_buffer(self, message: UnmapBuffer) -> None:
        buffer = self._buffers.pop(message.buffer_id, None)
        if buffer is not None:
            try:
                buffer.close()
            except BufferError:
                pass   # a finished request's array still refers to it; freed with it

    def feeds_of(self, payload: dict) -> dict:
        """Arrays of a task: sent as they are, or views of a shared memory block (no copy)."""
        return {name: view(self._buffers[value.buffer_id], value) if isinstance(value, SharedArray) else value
                for name, value in payload.items()}

    def run_task(self, task: Task) -> None:
        """Send one request and report its answer (``Done``, the latency from sending) or failure (``Failed``);
        a client that must first make its connection says so (``Connecting``, then ``Sent``), so that its round
        trips are not counted as the request's."""
        timing: dict = {}
        try:
            client = self.client(task.endpoint)
            if not client.ready_to_send():
                self.send(Connecting(task.request_id))
                client.connect()
                self.send(Sent(task.request_id))
            start = time.monotonic()
            outputs = client.predict(self.feeds_of(task.feeds), fetch=self.fetch, batch_size=task.size,
                                     timing=timing)
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised in the student
            kind = next((kind for cls, kind in self._kinds if isinstance(exc, cls)), FailureKind.ERROR)
            error = WorkerException.capture(exc, f"teacher {task.endpoint}") if kind is FailureKind.ERROR else None
            self.send(Failed(task.request_id, task.endpoint, kind, str(exc), error))
        else:
            self.send(Done(task.request_id, task.endpoint, outputs, time.monotonic() - start,
                           timing.get("server_seconds")))

    def run_probe(self, probe: Probe) -> None:
        """A health check of ``probe.endpoint`` (a set-aside teacher: is it back?)."""
        try:
            healthy = self.client(probe.endpoint).health(timeout=probe.timeout)
            message = "" if healthy else f"teacher {probe.endpoint}: health check failed"
        except Exception as exc:  # noqa: BLE001
            healthy, message = False, f"teacher {probe.endpoint}: {exc}"
        if not healthy:
            # a fresh channel next time: gRPC's own reconnect backoff would otherwise delay the teacher's return
            self.forget(probe.endpoint)
        self.send(ProbeResult(probe.probe_id, probe.endpoint, healthy, message))

    def run_handshakes(self, probe: Probe) -> None:
        """``probe.handshakes`` TCP handshakes to a usable teacher timed at once: its network round trip (healthy),
        or none answered within ``probe.timeout`` (not healthy: a black hole or a dead host)."""
        try:
            round_trip = self.client(probe.endpoint).network_round_trip(probe.timeout, probe.handshakes)
            message = "" if round_trip is not None else (
                f"teacher {probe.endpoint}: none of {probe.handshakes} TCP handshakes answered within "
                f"{probe.timeout:.1f}s")
        except Exception as exc:  # noqa: BLE001
            round_trip, message = None, f"teacher {probe.endpoint}: {exc}"
        self.send(ProbeResult(probe.probe_id, probe.endpoint, round_trip is not None, message, round_trip))

    def loop(self) -> None:
        """Read messages until ``Stop`` or end-of-file."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(message, Stop):
                return
            if isinstance(message, Task):
                self._executor.submit(self.run_task, message)
            elif isinstance(message, Probe) and message.handshakes > 0:
                # a thread of its own: the executor's may all be busy with a far teacher's requests, and this
                # probe's timeout is the student's clock for a black hole
                threading.Thread(target=self.run_handshakes, args=(message,), name="handshake-probe",
                                 daemon=True).start()
            elif isinstance(message, Probe):
                self._executor.submit(self.run_probe, message)
            elif isinstance(message, Forget):
                self.forget(message.endpoint)
            elif isinstance(message, RoundTrip):
                self.round_trip_measured(message)
            elif isinstance(message, MapBuffer):
                self.map_buffer(message)
            elif isinstance(message, UnmapBuffer):
                self.unmap_buffer(message)
            else:
                logger.error("ignoring an unknown message from the student: %s", type(message).__name__)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the student process is gone (shutdown protocol step 5)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one worker: read ``Init``, answer ``Ready`` (or ``Crashed``), serve until ``Stop``; never returns.

    Raises:
        SystemExit: bad command-line arguments (argparse); a first message that is not ``Init`` is reported to
            the student as ``Crashed``, not raised.
    """
    parser = argparse.ArgumentParser(description="DistillReader worker process (started by the reader, not by hand).")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the socket to the student")
    parser.add_argument("--parent", type=int, required=True, help="PID of the student; exit when it is gone")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s distill worker %(process)d %(message)s")
    if os.getppid() != args.parent:
        return 0
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True, name="parent-watch").start()
    conn = Connection(args.fd)
    try:
        init = conn.recv()
        if not isinstance(init, Init):
            raise TypeError(f"the first message from the student must be Init, not {type(init).__name__}")
        worker = Worker(conn, init)
        conn.send(Ready(os.getpid()))
    except (EOFError, OSError):
        os._exit(0)
    except Exception as exc:  # noqa: BLE001 - the student re-raises it
        try:
            conn.send(Crashed(WorkerException.capture(exc, "starting")))
        finally:
            os._exit(1)
    worker.loop()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(worker_main())
