"""Worker processes that do the teacher I/O for a DistillReader, and their shutdown protocol.

Each worker is a fresh interpreter (``python -m distill_reader.workers``, not a fork of the student, so it holds
no copy of the student's Paddle, gRPC or thread state) connected to the student by one private socket pair. The
worker keeps one ``TeacherClient`` per endpoint and runs each request in a thread of its own, so one worker keeps
many teachers busy. Workers are stateless about the epoch: they get ``(request id, endpoint, feeds)`` and send back
``(request id, predictions)`` or a failure; the student owns the order and the counts and re-issues what did not
return (one task may have several requests: hedges and re-issues). Messages travel pickled over that private
local socket only (never over the network).

Messages, student -> worker: ``("init", settings)`` once, ``("task", request_id, endpoint, feeds, size)``,
``("probe", probe_id, endpoint, timeout)``, ``("forget", endpoint)``, ``("stop",)``; for large tasks
``("buffer", buffer_id, size)`` followed by the memfd of a shared memory block (SCM_RIGHTS), and ``("unmap", id)``.
A feed in shared memory is described as ``("shm", buffer_id, offset, dtype, shape)``; the student reuses the
block once the task is answered. Anonymous memfds leave nothing behind when either side dies.
Worker -> student: ``("ready", pid)``, ``("done", request_id, endpoint, outputs, latency)``,
``("fail", request_id, endpoint, kind, message, latency[, exception type])`` with kind ``unavailable`` (transient:
retry elsewhere) | ``rejected`` (the teacher refused the request as invalid) | ``answer`` (a wrong answer) |
``auth`` (the teacher refused the credentials) |
``error`` (an exception in the worker, re-raised in the student with its type ``module:qualname``),
``("probe", probe_id, endpoint, healthy, message)``, ``("crash", traceback_text)``.

Shutdown protocol (who signals whom, what is drained, what is abandoned):

1. Normal end of an epoch: nothing happens; workers persist and wait for the next epoch's tasks.
2. ``WorkerPool.close()`` (the reader's ``close()``, a ``break`` out of the epoch, an exception in the student's
   loop or in the user's generator, Ctrl-C (KeyboardInterrupt in the student), garbage collection of the reader
   or interpreter exit via ``weakref.finalize``): the student sends ``("stop",)`` to every worker and closes its
   end of the socket. Nothing is drained: requests in flight are abandoned (their answers are never read), the
   student forgets the epoch's outstanding tasks.
3. A worker that reads ``stop``, or end-of-file on its socket, leaves at once with ``os._exit(0)``; request
   threads are not joined (a blocked gRPC call cannot delay the exit).
4. The student waits up to ``stop_timeout`` (default 2 s) for all workers together, then SIGTERMs the ones left,
   waits 1 s, then SIGKILLs and reaps them: every worker is gone within ``stop_timeout + 1 s`` of ``close()``.
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

    pool = WorkerPool(num_workers=2, settings={"config_text": ..., "fetch": ["prediction"], "timeout": 30.0})
    pool.send_task(7, "127.0.0.1:9292", {"img": batch}, len(batch))
    for worker, message in pool.receive(timeout=1.0): ...
    pool.close()
"""
from __future__ import annotations

import argparse
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHARED_MEMORY_THRESHOLD = 1 << 20   # tasks with at least this many feed bytes travel in shared memory
_ALIGN = 64


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
        self.ready = False                    # its ("ready", pid) arrived: it has started and sends what it gets
        self.crash_text = ""
        self.buffers: dict[int, _SharedBuffer] = {}   # shared memory for large tasks, reused

    def __repr__(self) -> str:
        return f"WorkerHandle(index={self.index}, pid={self.pid}, outstanding={len(self.outstanding)})"


class _SharedBuffer:
    """An anonymous shared memory block (memfd) mapped by the student and by one worker."""

    def __init__(self, buffer_id: int, size: int):
        self.buffer_id = buffer_id
        self.size = size
        self.fd = os.memfd_create(f"distill-task-{buffer_id}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.task_id: Optional[int] = None   # the task whose feeds it holds, None when free

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.map.close()
        except BufferError:
            pass


def _send_fd(conn: Connection, fd: int) -> None:
    carrier = socket.socket(fileno=conn.fileno())
    try:
        socket.send_fds(carrier, [b"F"], [fd])
    finally:
        carrier.detach()


def _recv_fd(conn: Connection) -> int:
    carrier = socket.socket(fileno=conn.fileno())
    try:
        _, fds, _, _ = socket.recv_fds(carrier, 1, 1)
    finally:
        carrier.detach()
    if not fds:
        raise EOFError("no file descriptor received")
    return fds[0]


class WorkerPool:
    """Start, feed and stop the worker processes (student side).

    Args:
        num_workers: worker processes to run.
        settings: the ``init`` message: ``config_text`` (serving client config, text format), ``fetch`` (names),
            ``timeout`` (seconds per request), ``protocol``, ``wire``, ``max_threads``, ``security``,
            ``padding`` (``pad_value`` / ``lengths_feeds`` for each ``TeacherClient``).
        max_respawns: replacements started in a row for workers that died (then ``WorkerError``).
        stop_timeout: seconds to wait for a worker after ``stop`` before SIGTERM.
        healthy_answers: answers (of any worker) since the last replacement started after which the replacements
            in a row count from 0 again.
    """

    def __init__(self, num_workers: int, settings: dict, max_respawns: int = 8, stop_timeout: float = 2.0,
                 healthy_answers: int = 16):
        """Check the arguments.

        Raises:
            ValueError: ``num_workers`` < 1.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, not {num_workers}")
        self.num_workers = num_workers
        self.settings = dict(settings)
        self.max_respawns = max_respawns
        self.stop_timeout = stop_timeout
        self.healthy_answers = healthy_answers
        self.respawns = 0                 # replacements in a row (since the last healthy stretch)
        self.total_respawns = 0           # replacements over the pool's life
        self._answers_since_respawn = 0
        self.workers: list[WorkerHandle] = []
        self._buffer_ids = 0
        self._events: list[tuple[WorkerHandle, tuple]] = []   # worker deaths noticed while sending
        self.owner_pid = os.getpid()   # a forked child of the student must not talk to these workers
        self._next_index = 0
        self._closed = False
        for _ in range(num_workers):
            self.workers.append(self._spawn())

    # -- starting ----------------------------------------------------------------------------------------
    def _spawn(self) -> WorkerHandle:
        parent_sock, child_sock = socket.socketpair()
        child_fd = child_sock.fileno()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
        args = [sys.executable, "-m", "distill_reader.workers", "--fd", str(child_fd), "--parent", str(os.getpid())]
        try:
            proc = subprocess.Popen(args, pass_fds=[child_fd], stdin=subprocess.DEVNULL, env=env, close_fds=True)
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        handle = WorkerHandle(self._next_index, proc, conn)
        self._next_index += 1
        conn.send(("init", self.settings))
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

    def send_task(self, task_id: int, endpoint: str, feeds: dict, size: int) -> WorkerHandle:
        """Give a task to the least loaded worker; returns it (the task is then in its ``outstanding``).

        Feeds of ``SHARED_MEMORY_THRESHOLD`` bytes or more are copied once into a shared memory block of that
        worker (reused when the task is answered) instead of being pickled through the socket.
        """
        nbytes = sum(np.asarray(a).nbytes for a in feeds.values())
        while True:
            worker = self._least_loaded()
            try:
                payload = self._to_shared(worker, task_id, feeds, nbytes) if nbytes >= SHARED_MEMORY_THRESHOLD \
                    else feeds
                worker.conn.send(("task", task_id, endpoint, payload, size))
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._events.append((worker, self._mark_dead(worker)))
                continue
            worker.outstanding.add(task_id)
            return worker

    def _to_shared(self, worker: WorkerHandle, task_id: int, feeds: dict, nbytes: int) -> dict:
        need = nbytes + _ALIGN * len(feeds)
        free = [b for b in worker.buffers.values() if b.task_id is None and b.size >= need]
        if free:
            buffer = min(free, key=lambda b: b.size)
        else:
            idle = [b for b in worker.buffers.values() if b.task_id is None]
            if len(idle) >= 2:   # too small for this task: give one back
                smallest = min(idle, key=lambda b: b.size)
                worker.conn.send(("unmap", smallest.buffer_id))
                worker.buffers.pop(smallest.buffer_id).close()
            self._buffer_ids += 1
            buffer = _SharedBuffer(self._buffer_ids, max(need, 1 << 20))
            worker.buffers[buffer.buffer_id] = buffer
            worker.conn.send(("buffer", buffer.buffer_id, buffer.size))
            _send_fd(worker.conn, buffer.fd)
        buffer.task_id = task_id
        described, offset = {}, 0
        for name, value in feeds.items():
            array = np.asarray(value)
            target = np.ndarray(array.shape, dtype=array.dtype, buffer=buffer.map, offset=offset)
            np.copyto(target, array)
            described[name] = ("shm", buffer.buffer_id, offset, array.dtype.str, array.shape)
            offset += -(-array.nbytes // _ALIGN) * _ALIGN
        return described

    @staticmethod
    def _release_buffer(worker: WorkerHandle, task_id: int) -> None:
        for buffer in worker.buffers.values():
            if buffer.task_id == task_id:
                buffer.task_id = None

    def send_probe(self, probe_id: int, endpoint: str, timeout: float) -> None:
        while True:
            worker = self._least_loaded()
            try:
                worker.conn.send(("probe", probe_id, endpoint, timeout))
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
                    worker.conn.send(("forget", endpoint))
                except OSError:
                    pass

    # -- receiving ---------------------------------------------------------------------------------------
    def receive(self, timeout: Optional[float]) -> list[tuple[WorkerHandle, tuple]]:
        """Messages from the workers, waiting up to ``timeout`` for the first one.

        A worker that died shows up as ``(worker, ("dead", task_ids, probes))``: the tasks it held, which the
        caller re-issues; a replacement is started here.
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
                kind = message[0]
                if kind in ("done", "fail"):
                    worker.outstanding.discard(message[1])
                    self._release_buffer(worker, message[1])
                    self._count_answer()
                elif kind == "probe":
                    worker.probes.pop(message[1], None)
                elif kind == "ready":
                    worker.ready = True
                elif kind == "crash":
                    worker.crash_text = message[1]
                messages.append((worker, message))
        return messages

    def _count_answer(self) -> None:
        """A worker answered: after ``healthy_answers`` of them the replacements in a row count from 0."""
        self._answers_since_respawn += 1
        if self.respawns and self._answers_since_respawn >= self.healthy_answers:
            logger.info("workers healthy again after %d replacement(s) in a row", self.respawns)
            self.respawns = 0

    def _mark_dead(self, worker: WorkerHandle) -> tuple:
        if not worker.alive:
            return ("dead", [], {})
        worker.alive = False
        tasks, probes = sorted(worker.outstanding), dict(worker.probes)
        worker.outstanding.clear()
        worker.probes.clear()
        for buffer in worker.buffers.values():
            buffer.close()
        worker.buffers.clear()
        try:
            worker.conn.close()
        except OSError:
            pass
        code = _reap(worker.proc, 1.0)
        self.workers.remove(worker)
        if self._closed:
            return ("dead", tasks, probes)
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
        return ("dead", tasks, probes)

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
                worker.conn.send(("stop",))
            except OSError:
                pass
            try:
                worker.conn.close()
            except OSError:
                pass
            for buffer in worker.buffers.values():
                buffer.close()
            worker.buffers.clear()
        procs = [w.proc for w in workers]
        for sig, grace in ((None, self.stop_timeout), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                break
            for proc in alive:
                if sig is not None:
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace   # one grace period for all of them, not one each
            for proc in alive:
                try:
                    proc.wait(timeout=max(0.01, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        logger.debug("stopped %d worker(s)", len(workers))

    @property
    def closed(self) -> bool:
        return self._closed


def _reap(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """Wait for ``proc``; SIGTERM after ``timeout``, SIGKILL 1 s later. Returns the exit code."""
    for sig, wait_s in ((None, timeout), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return None


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------
class _Worker:
    """Runs in the worker process: one TeacherClient per endpoint, one thread per request in flight."""

    def __init__(self, conn: Connection, settings: dict):
        from google.protobuf import text_format

        from distill_base.client_security import ClientSecurity
        from distill_base.proto import general_model_config_pb2 as config_pb2
        from distill_base.serving_config import ServingConfig

        from .client import TeacherClient

        message = config_pb2.GeneralModelConfig()
        text_format.Parse(settings["config_text"], message)
        self.config = ServingConfig.from_proto(message, source=settings.get("config_source", ""))
        self.conn = conn
        self.fetch = list(settings["fetch"])
        self.timeout = float(settings.get("timeout", 30.0))
        self.protocol = settings.get("protocol", "grpc")
        self.wire = settings.get("wire", "auto")
        self.keepalive_time = float(settings.get("keepalive_time", 1.0))
        self.security = ClientSecurity(**settings.get("security", {}))
        self.padding = dict(settings.get("padding", {}))   # pad_value, lengths_feeds (distill_reader.padding)
        self._client_class = TeacherClient
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._buffers: dict[int, mmap.mmap] = {}
        self._executor = ThreadPoolExecutor(max_workers=int(settings.get("max_threads", 64)),
                                            thread_name_prefix="teacher-request")

    def client(self, endpoint: str):
        with self._clients_lock:
            client = self._clients.get(endpoint)
            if client is None:
                client = self._client_class(endpoint, self.config, protocol=self.protocol, wire=self.wire,
                                            timeout=self.timeout, keepalive_time=self.keepalive_time,
                                            security=self.security, **self.padding)
                self._clients[endpoint] = client
            return client

    def forget(self, endpoint: str) -> None:
        """Drop the client of ``endpoint``; the next request opens a fresh channel. The old channel is not
        closed here (a request thread may still be using it): it closes when garbage collected."""
        with self._clients_lock:
            self._clients.pop(endpoint, None)

    def send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except OSError:
                os._exit(0)   # the student is gone (shutdown step 5)

    def map_buffer(self, buffer_id: int, size: int) -> None:
        fd = _recv_fd(self.conn)
        try:
            self._buffers[buffer_id] = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def unmap_buffer(self, buffer_id: int) -> None:
        buffer = self._buffers.pop(buffer_id, None)
        if buffer is not None:
            try:
                buffer.close()
            except BufferError:
                pass   # a finished request's array still refers to it; freed with it

    def feeds_of(self, payload: dict) -> dict:
        """Arrays of a task: sent as they are, or views of a shared memory block (no copy)."""
        feeds = {}
        for name, value in payload.items():
            if isinstance(value, tuple) and value and value[0] == "shm":
                _, buffer_id, offset, dtype, shape = value
                feeds[name] = np.ndarray(shape, dtype=np.dtype(dtype), buffer=self._buffers[buffer_id], offset=offset)
            else:
                feeds[name] = value
        return feeds

    def run_task(self, request_id: int, endpoint: str, feeds: dict, size: int) -> None:
        from .client import TeacherAnswerError, TeacherAuthError, TeacherRequestRejected, TeacherUnavailable

        start = time.monotonic()
        try:
            feeds = self.feeds_of(feeds)
            outputs = self.client(endpoint).predict(feeds, fetch=self.fetch, batch_size=size)
        except TeacherUnavailable as exc:
            self.send(("fail", request_id, endpoint, "unavailable", str(exc), time.monotonic() - start))
        except TeacherRequestRejected as exc:
            self.send(("fail", request_id, endpoint, "rejected", str(exc), time.monotonic() - start))
        except TeacherAuthError as exc:
            self.send(("fail", request_id, endpoint, "auth", str(exc), time.monotonic() - start))
        except TeacherAnswerError as exc:
            self.send(("fail", request_id, endpoint, "answer", str(exc), time.monotonic() - start))
        except Exception as exc:  # noqa: BLE001 - re-raised in the student with its type and this traceback
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            type_path = f"{type(exc).__module__}:{type(exc).__qualname__}"
            self.send(("fail", request_id, endpoint, "error", f"teacher {endpoint}: {text}", time.monotonic() - start,
                       type_path))
        else:
            self.send(("done", request_id, endpoint, outputs, time.monotonic() - start))

    def run_probe(self, probe_id: int, endpoint: str, timeout: float) -> None:
        try:
            healthy = self.client(endpoint).health(timeout=timeout)
            message = "" if healthy else f"teacher {endpoint}: health check failed"
        except Exception as exc:  # noqa: BLE001
            healthy, message = False, f"teacher {endpoint}: {exc}"
        if not healthy:
            # a fresh channel next time: gRPC's own reconnect backoff would otherwise delay the teacher's return
            self.forget(endpoint)
        self.send(("probe", probe_id, endpoint, healthy, message))

    def loop(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "stop":
                return
            if kind == "task":
                self._executor.submit(self.run_task, *message[1:])
            elif kind == "probe":
                self._executor.submit(self.run_probe, *message[1:])
            elif kind == "forget":
                self.forget(message[1])
            elif kind == "buffer":
                self.map_buffer(message[1], message[2])
            elif kind == "unmap":
                self.unmap_buffer(message[1])


def _watch_parent(parent_pid: int) -> None:
    """Exit when the student process is gone (shutdown protocol step 5)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
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
        kind, settings = conn.recv()
        worker = _Worker(conn, settings)
        conn.send(("ready", os.getpid()))
    except (EOFError, OSError):
        os._exit(0)
    except Exception as exc:  # noqa: BLE001 - the student re-raises it
        try:
            conn.send(("crash", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
        finally:
            os._exit(1)
    worker.loop()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(worker_main())
