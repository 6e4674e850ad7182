"""The student's side of the worker processes that do a DistillReader's teacher I/O, and their shutdown protocol.

Each worker is a fresh interpreter (``python -m distill_reader.worker_process``: the code that runs there) joined
to the student by one private socket pair; this module starts, feeds and stops them (``WorkerPool``, one
``WorkerHandle`` each). Workers are stateless about the epoch: they get ``Task(request id, endpoint, feeds)`` and
send back ``Done`` or ``Failed``; the student owns the order and the counts and re-issues what did not return (one
task may have several requests: hedges and re-issues). The messages are the typed ones of
``distill_reader.worker_messages``; the settings are one ``WorkerSettings``. Feeds of large tasks travel in shared
memory (``distill_reader.memfd``); the student reuses a block once its task is answered.

Shutdown protocol (who signals whom, what is drained, what is abandoned):

1. Normal end of an epoch: nothing happens; workers persist and wait for the next epoch's tasks.
2. ``WorkerPool.close()`` (the reader's ``close()``, a ``break`` out of the epoch, an exception in the student's
   loop or in the user's generator, Ctrl-C (KeyboardInterrupt in the student), garbage collection of the reader
   or interpreter exit via ``weakref.finalize``): the student sends ``Stop()`` to every worker and closes its
   end of the socket. Nothing is drained: requests in flight are abandoned (their answers are never read), the
   student forgets the epoch's outstanding tasks.
3. A worker that reads ``Stop``, or end-of-file on its socket, leaves at once with ``os._exit(0)``; request
   threads are not joined (a blocked gRPC call cannot delay the exit).
4. The student waits up to ``stop_timeout`` (default 2 s) for all workers together, then SIGTERMs the ones left,
   waits 1 s, then SIGKILLs and reaps them (``stop_processes``, the one ladder, also for a single dead worker):
   every worker is gone within ``stop_timeout + 1 s`` of ``close()``.
5. The student dies without ``close()`` (SIGKILL, crash): the kernel closes its socket end, the worker's blocking
   read gets end-of-file and the worker exits (step 3). A watchdog thread also exits the worker when its parent
   process changes (the student is gone but a forked child of it still holds the socket).
6. Workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the student, which gets the
   KeyboardInterrupt, stops them in order (step 2) instead of leaving half-written messages.
7. A worker that dies on its own (killed, crashed): the student sees end-of-file, re-issues that worker's
   outstanding tasks to the other workers and starts a replacement. At most ``max_respawns`` replacements in a
   row: the count goes back to 0 once the workers have answered ``healthy_answers`` requests since the last
   replacement started (a healthy stretch), so a long run that loses a worker now and then goes on, while workers
   that keep dying on start or under every task raise ``WorkerError``.
8. A forked child of the student (e.g. Paddle's ``use_multiprocess=True`` loader) never talks to or stops its
   parent's workers: it notices the PID change, drops its copies of the sockets and starts workers of its own,
   which end with it (steps 2-5).

Example (the reader does this for you)::

    pool = WorkerPool(WorkerSettings(num_workers=2), config_text, "serving_client_conf.prototxt", ["prediction"])
    pool.send_task(7, "127.0.0.1:9292", {"img": batch}, len(batch))
    for worker, message in pool.receive(timeout=1.0): ...   # Ready / Done / Failed / ProbeResult / WorkerDied
    pool.close()
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Iterable, Optional, Sequence, Union

from .feeds import feed_nbytes
from .memfd import SharedBuffer, send_fd
from .worker_messages import (
    Crashed,
    Done,
    Failed,
    Forget,
    FromWorker,
    Init,
    MapBuffer,
    Probe,
    ProbeResult,
    Ready,
    RoundTrip,
    SharedArray,
    Stop,
    Task,
    UnmapBuffer,
    WorkerDied,
    WorkerSettings,
)

logger = logging.getLogger(__name__)

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHARED_MEMORY_THRESHOLD = 1 << 20   # tasks with at least this many feed bytes travel in shared memory


KILL_GRACE = 1.0                    # seconds between SIGTERM and SIGKILL


class WorkerError(RuntimeError):
    """A worker process failed in a way a replacement cannot fix (it crashed on start, or kept dying)."""


class WorkerHandle:
    """The student's side of one worker process."""

    def __init__(self, index: int, proc: subprocess.Popen, conn: Connection):
        self.index = index
        self.proc = proc
        self.conn = conn
        self.pid = proc.pid
        self.outstanding: set[int] = set()   # task ids sent and not answered
        self.probes: dict[int, str] = {}      # probe id -> endpoint
        self.alive = True
        self.ready = False                    # its Ready arrived: it has started and sends what it gets
        self.crash_text = ""
        self.buffers: dict[int, SharedBuffer] = {}   # shared memory for large tasks, reused

    def __repr__(self) -> str:
        return f"WorkerHandle(index={self.index}, pid={self.pid}, outstanding={len(self.outstanding)})"


class WorkerPool:
    """Start, feed and stop the worker processes (student side).

    Args:
        settings: the workers' settings: ``num_workers``, ``stop_timeout`` (seconds to wait for a worker after
            ``Stop`` before SIGTERM), ``max_respawns`` (replacements started in a row for workers that died, then
            ``WorkerError``), ``healthy_answers`` (answers of any worker since the last replacement started after
            which the replacements in a row count from 0 again), and what every worker's clients use.
        config_text: the teacher's serving client config in protobuf text format; ``config_source`` where it was
            read from.
        fetch: the fetch names every request asks for.

    Raises:
        WorkerError: (from ``send_task``, ``send_probe``, ``receive``) a worker crashed on start, or workers keep
            dying; no worker is running.
    """

    def __init__(self, settings: WorkerSettings, config_text: str, config_source: str, fetch: Sequence[str]):
        self.settings = settings
        self.num_workers = settings.num_workers
        self.max_respawns = settings.max_respawns
        self.stop_timeout = settings.stop_timeout
        self.healthy_answers = settings.healthy_answers
        self._init = Init(settings, config_text, config_source, tuple(fetch))
        self.respawns = 0                 # replacements in a row (since the last healthy stretch)
        self.total_respawns = 0           # replacements over the pool's life
        self._answers_since_respawn = 0
        self.workers: list[WorkerHandle] = []
        self._buffer_ids = 0
        self._events: list[tuple[WorkerHandle, WorkerDied]] = []   # worker deaths noticed while sending
        self.owner_pid = os.getpid()   # a forked child of the student must not talk to these workers
        self._next_index = 0
        self._closed = False
        for _ in range(self.num_workers):
            self.workers.append(self._spawn())

    # -- starting ----------------------------------------------------------------------------------------
    def _spawn(self) -> WorkerHandle:
        parent_sock, child_sock = socket.socketpair()
        child_fd = child_sock.fileno()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
        args = [sys.executable, "-m", "distill_reader.worker_process", "--fd", str(child_fd),
                "--parent", str(os.getpid())]
        try:
            proc = subprocess.Popen(args, pass_fds=[child_fd], stdin=subprocess.DEVNULL, env=env, close_fds=True)
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        handle = WorkerHandle(self._next_index, proc, conn)
        self._next_index += 1
        conn.send(self._init)
        logger.debug("started worker %d (pid %d)", handle.index, handle.pid)
        return handle

    @property
    def pids(self) -> list[int]:
        """PIDs of the live workers."""
        return [w.pid for w in self.workers if w.alive]

    # -- sending ----------------------------------------------------------------------------------------
    def _least_loaded(self) -> WorkerHandle:
        live = [w for w in self.workers if w.alive]
        if not live:
            raise WorkerError("no worker process is running")
        return min(live, key=lambda w: len(w.outstanding) + len(w.probes))

    def send_task(self, task_id: int, endpoint: str, feeds: dict, size: int,
                  nbytes: Optional[int] = None) -> WorkerHandle:
        """Give a task to the least loaded worker; returns it (the task is then in its ``outstanding``).

        Feeds of ``SHARED_MEMORY_THRESHOLD`` bytes or more are copied once into a shared memory block of that
        worker (reused when the task is answered) instead of being pickled through the socket. ``nbytes``: the
        feeds' bytes when the caller has counted them (``feed_nbytes``).
        """
        nbytes = feed_nbytes(feeds) if nbytes is None else nbytes
        while True:
            worker = self._least_loaded()
            try:
                payload = self._to_shared(worker, task_id, feeds, nbytes) if nbytes >= SHARED_MEMORY_THRESHOLD \
                    else feeds
                worker.conn.send(Task(task_id, endpoint, payload, size))
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._events.append((worker, self._mark_dead(worker)))
                continue
            worker.outstanding.add(task_id)
            return worker

    def _to_shared(self, worker: WorkerHandle, task_id: int, feeds: dict, nbytes: int) -> dict[str, SharedArray]:
        need = SharedBuffer.needed(feeds, nbytes)
        free = [b for b in worker.buffers.values() if b.task_id is None and b.size >= need]
        if free:
            buffer = min(free, key=lambda b: b.size)
        else:
            idle = [b for b in worker.buffers.values() if b.task_id is None]
            if len(idle) >= 2:   # too small for this task: give one back
                smallest = min(idle, key=lambda b: b.size)
                worker.conn.send(UnmapBuffer(smallest.buffer_id))
                worker.buffers.pop(smallest.buffer_id).close()
            self._buffer_ids += 1
            buffer = SharedBuffer(self._buffer_ids, max(need, 1 << 20))
            worker.buffers[buffer.buffer_id] = buffer
            worker.conn.send(MapBuffer(buffer.buffer_id, buffer.size))
            send_fd(worker.conn, buffer.fd)
        buffer.task_id = task_id
        return buffer.write(feeds)

    @staticmethod
    def _release_buffer(worker: WorkerHandle, task_id: int) -> None:
        for buffer in worker.buffers.values():
            if buffer.task_id == task_id:
                buffer.task_id = None

    def send_probe(self, probe_id: int, endpoint: str, timeout: float, handshakes: int = 0) -> None:
        """Ask the least loaded worker for a health check of ``endpoint`` (answered by a ``ProbeResult``), or with
        ``handshakes`` > 0 for that many TCP handshakes timed at once (its round trip, or none answered)."""
        while True:
            worker = self._least_loaded()
            try:
                worker.conn.send(Probe(probe_id, endpoint, timeout, handshakes))
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._events.append((worker, self._mark_dead(worker)))
                continue
            worker.probes[probe_id] = endpoint
            return

    def forget(self, endpoint: str) -> None:
        """Tell every worker to close its client for ``endpoint`` (it left the teacher set)."""
        for worker in self.workers:
            if worker.alive:
                try:
                    worker.conn.send(Forget(endpoint))
                except OSError:
                    pass

    # -- receiving ---------------------------------------------------------------------------------------
    def receive(self, timeout: Optional[float]) -> list[tuple[WorkerHandle, Union[FromWorker, WorkerDied]]]:
        """Messages from the workers, waiting up to ``timeout`` for the first one.

        A worker that died shows up as ``(worker, WorkerDied(request_ids, probes))``: the requests it held, which
        the caller re-issues; a replacement is started here.
        """
        messages, self._events = self._events, []
        live = {w.conn: w for w in self.workers if w.alive}
        if not live:
            return messages
        ready = wait(list(live), timeout=0 if messages else timeout)
        for conn in ready:
            worker = live[conn]
            while worker.alive:
                try:
                    if not conn.poll():
                        break
                    message = conn.recv()
                except (EOFError, OSError):
                    messages.append((worker, self._mark_dead(worker)))
                    break
                if isinstance(message, (Done, Failed)):
                    worker.outstanding.discard(message.request_id)
                    self._release_buffer(worker, message.request_id)
                    self._count_answer()
                elif isinstance(message, ProbeResult):
                    worker.probes.pop(message.probe_id, None)
                    if message.round_trip is not None:
                        self._share_round_trip(worker, message.endpoint, message.round_trip)
                elif isinstance(message, Ready):
                    worker.ready = True
                elif isinstance(message, Crashed):
                    worker.crash_text = message.error.traceback_text
                messages.append((worker, message))
        return messages

    def _share_round_trip(self, measured_by: WorkerHandle, endpoint: str, seconds: float) -> None:
        """A link probe's round trip, measured by one worker, told to the others (``RoundTrip``): each worker's
        connection follows a link that moved once the pool's latest probes agree, not once it has run as many of
        its own (the least loaded worker runs most probes: the other kept a connection that no longer fit the
        link ~1.6 s longer at +300 ms; issue 25)."""
        for worker in self.workers:
            if worker is not measured_by and worker.alive:
                try:
                    worker.conn.send(RoundTrip(endpoint, seconds))
                except OSError:
                    pass   # a dead worker: its end-of-file is read by receive()

    def _count_answer(self) -> None:
        """A worker answered: after ``healthy_answers`` of them the replacements in a row count from 0."""
        self._answers_since_respawn += 1
        if self.respawns and self._answers_since_respawn >= self.healthy_answers:
            logger.info("workers healthy again after %d replacement(s) in a row", self.respawns)
            self.respawns = 0

    def _mark_dead(self, worker: WorkerHandle) -> WorkerDied:
        if not worker.alive:
            return WorkerDied((), {})
        worker.alive = False
        tasks, probes = tuple(sorted(worker.outstanding)), dict(worker.probes)
        worker.outstanding.clear()
        worker.probes.clear()
        for buffer in worker.buffers.values():
            buffer.close()
        worker.buffers.clear()
        try:
            worker.conn.close()
        except OSError:
            pass
        code = stop_processes([worker.proc], 1.0)[0]
        self.workers.remove(worker)
        if self._closed:
            return WorkerDied(tasks, probes)
        if worker.crash_text:
            raise WorkerError(f"worker process {worker.pid} crashed:\n{worker.crash_text}")
        if self.respawns >= self.max_respawns:
            raise WorkerError(f"worker processes keep dying (last: pid {worker.pid}, exit code {code}); "
                              f"gave up after {self.respawns} replacements in a row (fewer than "
                              f"{self.healthy_answers} answers between deaths)")
        logger.warning("worker process %d died (exit code %s); re-issuing its %d task(s) and starting another",
                       worker.pid, code, len(tasks))
        self.respawns += 1
        self.total_respawns += 1
        self._answers_since_respawn = 0
        self.workers.append(self._spawn())
        return WorkerDied(tasks, probes)

    # -- stopping ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker (shutdown protocol steps 2-4): within ``stop_timeout + 1 s``.

        In a forked child of the student the workers are not its own: it only drops its copies of the sockets.
        """
        if self._closed:
            return
        self._closed = True
        workers, self.workers = self.workers, []
        if os.getpid() != self.owner_pid:
            for worker in workers:
                try:
                    worker.conn.close()
                except OSError:
                    pass
            return
        for worker in workers:
            try:
                worker.conn.send(Stop())
            except OSError:
                pass
            try:
                worker.conn.close()
            except OSError:
                pass
            for buffer in worker.buffers.values():
                buffer.close()
            worker.buffers.clear()
        stop_processes([w.proc for w in workers], self.stop_timeout)
        logger.debug("stopped %d worker(s)", len(workers))

    @property
    def closed(self) -> bool:
        return self._closed


def stop_processes(procs: Iterable[subprocess.Popen], timeout: float) -> list[Optional[int]]:
    """Wait up to ``timeout`` seconds for ``procs`` to exit, then SIGTERM the ones left, ``KILL_GRACE`` s later
    SIGKILL them, and reap them (the shutdown ladder of every worker, one or all). One grace period for all of
    them together, not one each: every process is gone within ``timeout + KILL_GRACE`` s (plus the kernel's time
    to end a SIGKILLed one). Returns their exit codes in order (None for one that outlived even SIGKILL's wait).
    """
    procs = list(procs)
    for sig, grace in ((None, timeout), (signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            break
        for proc in alive:
            if sig is not None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in alive:
            try:
                proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    return [p.returncode for p in procs]
