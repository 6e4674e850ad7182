"""Predictor worker processes of the teacher server: ``--thread N`` starts N of them, each a fresh interpreter
(``python -m teachers.predictor_worker``) loading its own predictor, so predictors use every core whatever the
Paddle line (paddle 3.3's ``Predictor.run`` holds the GIL of the process it runs in), a wedged run is killed at
``--predict_timeout`` and a crashing predictor takes only its own process down.

``run`` (called by the batcher's runner threads with ``teachers.serve --worker_io threads``; start-up runs; tests)
borrows an idle worker, copies the inputs into the worker's shared-memory block, sends a ``job`` message and
waits (GIL released) for ``answer``/``error``. With ``--worker_io loop`` (the default) the server drives the workers
from its event loop instead (``attach_loop``, then ``borrow_nowait`` + ``launch`` in the loop's thread, used by
``teachers.batcher.LoopBatcher``): the ``job`` message is sent without blocking and ``loop.add_reader`` on the
worker's socket takes the answer and calls the run's ``done`` callback, no thread in between. Each run is bounded
by ``predict_timeout`` seconds. Then:

- over time: the worker is SIGKILLed and replaced, the run raises ``WorkerTimeout`` (err_no 6000);
- the worker died (any signal or exit): ``WorkerLost`` (err_no 10000, transient), the server logs why and a
  supervisor thread starts a new worker after an exponential backoff (``distill_base.backoff``);
- the model refused the input (Paddle's InvalidArgument / OutOfRange): ``ModelRejectedInput`` (err_no 5000);
- any other predictor error: RuntimeError (err_no 10000); the worker goes on.

The supervisor thread starts every worker (so ``PR_SET_PDEATHSIG`` in a worker follows that long-lived thread)
and restarts idle workers found dead. With ``spare`` (the default) it keeps one more worker, its model loaded, that
takes a lost worker's place at once (``place``); a new spare is started behind it. The server owns every
shared-memory block and unlinks it when its worker is replaced and at ``close``. A model's memory is paid once
per worker (and once more for the spare).

Example::

    pool = WorkerPool(PredictorOptions(model_dir="serving_server", size=2), predict_timeout=30)
    pool.start()                                   # WorkerLoadError (one line) when the model cannot load
    out = pool.run({"img": images}, ["save_infer_model/scale_0.tmp_1"])   # {name: (array, lod)}
    # in an event loop: pool.attach_loop(loop, on_idle); w = pool.borrow_nowait(); pool.launch(w, ..., done)
    pool.close()
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from distill_base.backoff import backoff_delay

from . import worker_protocol as wire
from .errors import ModelRejectedInput, PredictorTimeout, WorkerLoadError, WorkerLost, WorkerTimeout
from .predictor_pool import PredictorOptions
from .predictor_worker import LOD_PREFIX

logger = logging.getLogger("teachers.worker_pool")

RunObserver = Callable[[int, float, float], None]   # (samples, seconds of the run, CPU seconds of the predictor)
_STEP_RE = re.compile(r"--- Running (IR pass|analysis) \[(\w+)\]")
_BACKOFF_BASE_S, _BACKOFF_CAP_S = 0.2, 30.0
_SUPERVISE_S = 0.1


def exit_reason(returncode: Optional[int]) -> str:
    """``killed by SIGSEGV`` / ``exited with code 1`` / ``still running``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class _NoWait:
    """The event loop's view of a worker channel: ``recv_into`` and ``send`` never block (``MSG_DONTWAIT``)
    while the socket itself stays blocking for the supervisor thread. A message the socket cannot take now
    (``SOCK_SEQPACKET`` takes one whole or not at all) is kept in ``pending`` for an ``add_writer`` callback
    (``flush``)."""

    __slots__ = ("sock", "pending")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        if not self.pending:
            try:
                return self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        self.pending.append(bytes(data))
        return len(data)

    def recv_into(self, buffer: bytearray) -> int:
        return self.sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left. Raises OSError when the worker is gone."""
        while self.pending:
            try:
                self.sock.send(self.pending[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            self.pending.pop(0)
        return True


RunDone = Callable[[Optional[dict], Optional[BaseException]], None]   # (outputs, error): exactly one is None


class _LoopRun:
    """One run on a worker, driven by the event loop (``WorkerPool.launch``)."""

    __slots__ = ("worker", "feeds", "done", "fd", "deadline", "writing", "limit", "bound")

    def __init__(self, worker: _Worker, feeds: Mapping[str, np.ndarray], done: RunDone, limit: float, bound: str,
                 deadline: float):
        self.worker = worker
        self.feeds = feeds
        self.done = done
        self.fd = worker.fd
        self.deadline = deadline    # loop.time() past which the run has taken too long
        self.writing = False
        self.limit = limit
        self.bound = bound


class _Worker:
    """One worker process (one generation of a slot): its channel, blocks and output tail."""

    def __init__(self, index: int, gpu_id: Optional[int]):
        self.index = index
        self.gpu_id = gpu_id
        self.sock, theirs = wire.channel_pair()
        self.nowait = _NoWait(self.sock)
        self.fd = self.sock.fileno()      # kept: the event loop watches it until the worker is retired
        env = dict(os.environ)
        if gpu_id is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu_id)     # each worker sees its own GPU only, as GPU 0
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "teachers.predictor_worker", "--fd", str(theirs.fileno()),
                 "--parent", str(os.getpid()), "--index", str(index)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env)
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.tail: collections.deque = collections.deque(maxlen=200)
        self.last_step: Optional[tuple[str, str]] = None
        self._reader = threading.Thread(target=self._read_output, name=f"worker-{index}-output", daemon=True)
        self._reader.start()
        self.inputs: Optional[wire.shared_memory.SharedMemory] = None
        self.outputs: Optional[wire.shared_memory.SharedMemory] = None
        self._block_names: Optional[tuple[str, str]] = None    # (inputs, outputs) names for job messages
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.busy_since: Optional[float] = None
        self.ready = False
        self.dead = False
        self._jobs = 0
        # the event loop's watchdog of this worker's runs (WorkerPool.launch): one timer armed for a run's
        # deadline, left armed when the run ends and re-armed for the run in progress when it fires, so a
        # run costs no timer of its own
        self.watchdog: Optional[asyncio.TimerHandle] = None
        self.watchdog_at = 0.0
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)

    def begin(self, index: int, options: PredictorOptions) -> None:
        """Send ``start``: load the model as worker ``index`` (-1: the spare, placed later with ``place``).

        Raises OSError when the process is already gone."""
        self.index = index
        fields = dataclasses.asdict(options)
        for name in ("size", "quiet"):
            fields.pop(name)
        fields["gpu_ids"] = [0] if self.gpu_id is not None else []
        wire.send(self.sock, "start", index=index, options=fields)

    def place(self, index: int) -> None:
        """Tell a spare which worker it now is (``place``; it answers nothing). Raises OSError when it is gone."""
        self.index = index
        wire.send(self.sock, "place", index=index)

    # -- output of the process: kept for crash reports, logged at DEBUG --------------------------------
    def _read_output(self) -> None:
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                self.tail.append(line)
                step = _STEP_RE.search(line)
                if step:
                    self.last_step = (step.group(1), step.group(2))
                logger.debug("worker %d: %s", self.index, line)
        except (OSError, ValueError):   # closed while reading
            pass

    # -- start-up ------------------------------------------------------------------------------------
    def await_ready(self, deadline: float, load_timeout: float) -> Optional[str]:
        """Wait for ``ready``; None when ready, else one line saying why the worker cannot serve."""
        try:
            message = self._receive(deadline)
        except WorkerTimeout:
            self.kill()
            return f"predictor worker {self.index} (pid {self.pid}) did not load the model within {load_timeout:g}s"
        except (WorkerLost, wire.ProtocolError) as exc:
            return self.load_failure(None, str(exc))
        if message["kind"] == "ready":
            self.input_names = [str(n) for n in message.get("inputs", [])]
            self.output_names = [str(n) for n in message.get("outputs", [])]
            self.ready = True
            if self.index < 0:
                logger.info("spare predictor worker loaded the model (pid %d)", self.pid)
            else:
                logger.info("predictor worker %d ready (pid %d, paddle %s)", self.index, self.pid,
                            message.get("paddle", "?"))
            return None
        return self.load_failure(str(message.get("message", "")), None)

    def load_failure(self, error: Optional[str], lost: Optional[str]) -> str:
        """One line: what failed while loading, the Paddle step it was in, and the flag that avoids it."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reader.join(timeout=2)
        what = error or exit_reason(self.proc.returncode)
        line = f"predictor worker {self.index} (pid {self.pid}) failed while loading the model: {what}"
        if self.last_step and self.last_step[0] == "IR pass":
            line += (f", inside Paddle's IR pass {self.last_step[1]} (an --ir_optim pass); --ir_optim False "
                     f"turns these passes off")
        elif self.last_step:
            line += f", in Paddle's analysis step {self.last_step[1]}"
        return line

    # -- one run -------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str], lods: Optional[Mapping[str, list]],
            timeout: float) -> tuple[dict, float, float]:
        """({fetch: (array, lod)}, seconds, predictor CPU seconds) of one run on this worker."""
        try:
            self.send_job(self.sock, feeds, fetch, lods)
        except OSError:
            raise WorkerLost(self.lost_message("before it took the request")) from None
        deadline = self.busy_since + timeout
        while True:
            result = self.handle(self.sock, self._receive(deadline), feeds)
            if result is not None:
                return result

    def send_job(self, sock, feeds: Mapping[str, np.ndarray], fetch: Sequence[str],
                 lods: Optional[Mapping[str, list]]) -> None:
        """Copy the inputs into the input block (a bigger one when they do not fit) and send ``job`` on ``sock``
        (the channel, or the event loop's non-blocking view of it). Raises OSError when the worker is gone."""
        arrays = feeds           # write_arrays copies any layout into the block: no contiguous copy first
        if lods:
            arrays = dict(feeds)
            for name, lod in lods.items():
                if lod:
                    arrays[LOD_PREFIX + name] = np.asarray(lod, dtype=np.int64)
        need = wire.layout_size(arrays)
        if self.inputs is None or need > self.inputs.size:
            old, self.inputs = self.inputs, wire.create_block(need + need // 4)
            self._block_names = None
            wire.release_block(old)
        if self.outputs is None:
            self.outputs = wire.create_block(wire.MIN_BLOCK)
            self._block_names = None
        if self._block_names is None:    # SharedMemory.name is a property that strips a slash each time
            self._block_names = (self.inputs.name, self.outputs.name)
        layout = wire.write_arrays(self.inputs, arrays)
        self._jobs += 1
        wire.send_job(sock, self._jobs, *self._block_names, layout, fetch)

    def handle(self, sock, message: dict, feeds: Mapping[str, np.ndarray]) -> Optional[tuple[dict, float, float]]:
        """One message of a run: the run's (outputs, seconds, CPU seconds) on ``answer``; None after ``need``
        (the output block is replaced, ``grown`` sent on ``sock``: the answer is still to come).

        Raises:
            ModelRejectedInput: the model refused the input (``error`` of class input).
            RuntimeError: any other predictor error (the worker goes on).
            wire.ProtocolError: a message that is not part of a run.
            OSError: ``grown`` could not be sent (the worker is gone).
        """
        kind = message["kind"]
        if kind == "answer":
            got = wire.read_arrays(self.outputs, message["outputs"], copy=True)
            outputs = {name: (got[name], got[LOD_PREFIX + name].tolist() if LOD_PREFIX + name in got else [])
                       for name in got if not name.startswith(LOD_PREFIX)}
            return outputs, float(message.get("seconds", 0.0)), float(message.get("cpu", 0.0))
        if kind == "need":
            size = int(message["bytes"])
            old, self.outputs = self.outputs, wire.create_block(size + size // 4)
            self._block_names = None
            wire.release_block(old)
            wire.send(sock, "grown", out=self.outputs.name)
            return None
        if kind == "error":
            text = str(message.get("message", ""))
            if message.get("cls") == "input":
                raise ModelRejectedInput(rejection(text, list(feeds)))
            raise RuntimeError(text)
        raise wire.ProtocolError(f"unexpected {kind!r} message from predictor worker {self.index}")

    def _receive(self, deadline: float) -> dict:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout("deadline")
            if self._poll.poll(max(1, int(left * 1000))):
                break
        message = wire.receive(self.sock)
        if message is None:
            raise WorkerLost(self.lost_message("while it held the request"))
        return message

    def lost_message(self, when: str) -> str:
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
        return f"predictor worker {self.index} (pid {self.pid}) {exit_reason(self.proc.returncode)} {when}"

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def readable(self) -> bool:
        """A message is waiting on the channel (or it was closed)."""
        return bool(self._poll.poll(0))

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("predictor worker %d (pid %d) did not die of SIGKILL within 5s", self.index, self.pid)

    def release(self) -> None:
        """Close the channel and unlink the blocks (the process is gone or going)."""
        self.dead = True
        self.ready = False
        self.sock.close()
        wire.release_block(self.inputs)
        wire.release_block(self.outputs)
        self.inputs = self.outputs = None
        self._block_names = None
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def rejection(paddle_message: str, feeds: Sequence[str]) -> str:
    """The 5000 message: the feeds named in Paddle's message (else all of the request's), and Paddle's words."""
    lines = [line.strip() for line in paddle_message.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "InvalidArgument" in line or "OutOfRange" in line), 0)
    text = " ".join(lines[start:start + 2])[:600]
    named = [f for f in feeds if re.search(rf"\b{re.escape(f)}\b", text)] or list(feeds)
    return f"the model rejected feed {', '.join(repr(f) for f in named)}: {text}"


@dataclasses.dataclass
class _Slot:
    """One of the ``--thread`` places for a worker; ``worker`` is its current process."""

    index: int
    gpu_id: Optional[int]
    worker: Optional[_Worker] = None
    failures: int = 0
    restarts: int = 0
    due: Optional[float] = None     # when a replacement is to be started


class WorkerPool:
    """``options.size`` predictor worker processes; ``run`` is thread-safe (one run per worker at a time)."""

    def __init__(self, options: PredictorOptions, predict_timeout: float = 60.0,
                 on_run: Optional[RunObserver] = None, load_timeout: float = 600.0, spare: bool = True):
        self.options = options
        self.size = max(1, options.size)
        self.predict_timeout = float(predict_timeout)
        self.load_timeout = load_timeout
        self._on_run = on_run
        gpus = options.gpu_ids or [None]
        self._slots = [_Slot(i, gpus[i % len(gpus)]) for i in range(self.size)]
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._supervisor: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._start_error: Optional[str] = None
        self._loading: list[_Worker] = []     # spawned, not yet ready (killed by close)
        # a spare process (model loaded, index -1) takes a lost worker's place at once
        self._use_spare = spare
        self._spare: Optional[_Worker] = None
        self._spare_due: Optional[float] = None   # when to start the spare (None: not before the first start)
        self._spare_failures = 0
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None   # attach_loop: runs driven by this loop
        self._on_idle: Optional[Callable[[], None]] = None
        self._loop_runs: dict[int, _LoopRun] = {}                # fd -> run in flight (loop thread only)
        self._watched: dict[int, _Worker] = {}                   # fd -> worker whose socket the loop reads

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker and wait until all are ready.

        Raises WorkerLoadError (one line: the worker, the signal or error, the Paddle pass) when one cannot load
        the model; no worker is left running then.

        Raises:
            WorkerLoadError: a worker cannot load the model (one line; no worker is left running).
        """
        now = time.monotonic()
        for slot in self._slots:
            slot.due = now
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._supervisor.start()
        self._started.wait()
        if self._start_error is not None:
            self.close(0)
            raise WorkerLoadError(self._start_error)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker: ``stop`` to idle ones, SIGKILL to any still running after ``timeout`` seconds;
        unlink every block."""
        with self._lock:
            self._closing = True
            loading = list(self._loading)
        self._wake.set()
        for w in loading:
            w.kill()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=10)
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.kill()
            spare.release()
        deadline = time.monotonic() + max(0.0, timeout)
        workers = [s.worker for s in self._slots if s.worker is not None]
        for w in workers:
            if w.alive() and w.busy_since is None:
                try:
                    wire.send(w.sock, "stop")
                except OSError:
                    pass
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
            w.release()

    # -- runs ----------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], fetch_names: Sequence[str],
            lods: Optional[Mapping[str, list]] = None, timeout: Optional[float] = None,
            run_timeout: Optional[float] = None) -> dict:
        """Run one batch on a free worker; returns {fetch name: (array, lod)}.

        ``run_timeout`` (seconds, default ``predict_timeout``) bounds the run itself: the server's start-up runs
        (warm-up, batch-independence check) pass a longer one, as a first run is slower than the user's bound.

        Raises PredictorTimeout when no worker is free within ``timeout`` (default ``predict_timeout``)
        seconds; WorkerTimeout when the run passes ``run_timeout`` (the worker is killed and replaced);
        WorkerLost when the worker dies meanwhile; ModelRejectedInput when the model refuses the input;
        RuntimeError for other predictor errors.

        Raises:
            PredictorTimeout: no worker free in time.
            WorkerTimeout: the run took longer than its bound (the worker is killed and replaced).
            WorkerLost: the worker died or broke the protocol while it held the run.
            ModelRejectedInput: the model refused the input.
            RuntimeError: any other predictor error, or ``attach_loop`` was called (runs go through the loop).
        """
        if self._loop is not None:
            raise RuntimeError("WorkerPool.run after attach_loop: the event loop reads the workers' sockets now; "
                               "submit through the loop's batcher (LoopBatcher.submit from other threads)")
        worker = self._borrow(self.predict_timeout if timeout is None else timeout)
        limit = self.predict_timeout if run_timeout is None else run_timeout
        bound = "--predict_timeout" if run_timeout is None else "the start-up run timeout"
        try:
            outputs, seconds, cpu = worker.run(feeds, fetch_names, lods, limit)
        except WorkerTimeout:
            worker.kill()
            self._lost(worker, f"its run passed {bound} {limit:g}s; killed", failure=False)
            raise WorkerTimeout(f"the predictor did not answer within {bound} {limit:g}s; "
                                f"its worker process was killed and is being replaced") from None
        except (WorkerLost, wire.ProtocolError, OSError) as exc:
            self._lost(worker, str(exc), failure=True)
            if isinstance(exc, WorkerLost):
                raise
            raise WorkerLost(f"predictor worker {worker.index} broke the protocol: {exc}") from None
        except BaseException:
            self._give_back(worker)
            raise
        self._slots[worker.index].failures = 0
        self._give_back(worker)
        if self._on_run is not None:
            batch = int(next(iter(feeds.values())).shape[0]) if feeds else 0
            self._on_run(batch, seconds, cpu)
        return outputs

    def _borrow(self, wait: float) -> _Worker:
        deadline = time.monotonic() + wait
        while True:
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise PredictorTimeout(f"no predictor worker free within {wait:g}s ({self.ready_workers()} of "
                                       f"{self.size} ready)") from None
            if worker.alive():
                worker.busy_since = time.monotonic()
                return worker
            self._lost(worker, f"predictor worker {worker.index} (pid {worker.pid}) "
                               f"{exit_reason(worker.proc.poll())} while idle", failure=True)

    def _give_back(self, worker: _Worker) -> None:
        worker.busy_since = None
        self._idle.put(worker)
        self._notify_idle()

    def _notify_idle(self) -> None:
        """Tell the attached event loop (if any) that a worker is free; callable from any thread."""
        loop, on_idle = self._loop, self._on_idle
        if loop is not None and on_idle is not None:
            try:
                loop.call_soon_threadsafe(on_idle)
            except RuntimeError:   # the loop is closed
                pass

    # -- runs driven by the event loop -----------------------------------------------------------------
    def attach_loop(self, loop: asyncio.AbstractEventLoop, on_idle: Callable[[], None]) -> None:
        """Drive runs from ``loop`` (``borrow_nowait`` + ``launch``, loop thread only): the job is written to
        the worker's socket from the loop and its answer read by ``loop.add_reader``, no thread in between.
        ``on_idle`` is then called in the loop whenever a worker becomes free outside a loop run (a restarted
        worker, the spare placed). From then on ``run`` is refused (the loop reads the sockets) until
        ``detach_loop``."""
        self._loop, self._on_idle = loop, on_idle

    def detach_loop(self, error: BaseException) -> None:
        """Stop driving runs from the loop (loop thread, before ``close``): every run still in flight gets
        ``error`` and its worker stays busy (``close`` kills it)."""
        runs = list(self._loop_runs.values())
        for run in runs:
            self._end(run)
            run.done(None, error)
        for worker in list(self._watched.values()):
            self._unwatch(worker)
        self._loop, self._on_idle = None, None

    def idle_workers(self) -> int:
        """Workers waiting for a run (some may have died meanwhile: ``borrow_nowait`` skips those)."""
        return self._idle.qsize()

    def borrow_nowait(self) -> Optional[_Worker]:
        """A free, live worker marked busy, or None when none is free now (loop thread)."""
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return None
            if worker.alive():
                worker.busy_since = time.monotonic()
                return worker
            self._unwatch(worker)    # before its socket is closed: asyncio must not keep a closed fd
            self._lost(worker, f"predictor worker {worker.index} (pid {worker.pid}) "
                               f"{exit_reason(worker.proc.poll())} while idle", failure=True)

    def give_back(self, worker: _Worker) -> None:
        """Return a worker from ``borrow_nowait`` unused (loop thread)."""
        worker.busy_since = None
        self._idle.put(worker)

    def launch(self, worker: _Worker, feeds: Mapping[str, np.ndarray], fetch_names: Sequence[str],
               lods: Optional[Mapping[str, list]], done: RunDone) -> None:
        """Run one batch on ``worker`` (from ``borrow_nowait``) without blocking the loop: the inputs are copied
        into its block and ``job`` sent now; ``done(outputs, None)`` or ``done(None, error)`` is called in the
        loop later, with the errors ``run`` raises (WorkerTimeout after ``predict_timeout``: the worker is
        killed and replaced; WorkerLost; ModelRejectedInput; RuntimeError). The worker is free again before
        ``done`` is called."""
        loop = self._loop
        run = _LoopRun(worker, feeds, done, self.predict_timeout, "--predict_timeout",
                       loop.time() + self.predict_timeout)
        try:
            worker.send_job(worker.nowait, feeds, fetch_names, lods)
        except OSError:
            self._retire(run, "before it took the request")
            return
        except wire.ProtocolError as exc:
            self._retire(run, None, f"predictor worker {worker.index} broke the protocol: {exc}")
            return
        self._loop_runs[run.fd] = run
        if self._watched.get(run.fd) is not worker:   # first loop run of this worker: its reader stays
            loop.remove_reader(run.fd)                 # (a retired worker's fd number may have come back)
            loop.add_reader(run.fd, self._readable, run.fd)
            self._watched[run.fd] = worker
        if worker.nowait.pending:
            run.writing = True
            loop.add_writer(run.fd, self._writable, run)
        if worker.watchdog is None:    # else armed for an earlier run's deadline, which is sooner: it re-arms
            self._arm_watchdog(worker, run.deadline)

    def _arm_watchdog(self, worker: _Worker, when: float) -> None:
        worker.watchdog_at = when
        worker.watchdog = self._loop.call_at(when, self._watchdog, worker)

    def _watchdog(self, worker: _Worker) -> None:
        """``worker``'s watchdog fired (loop thread): its run in progress, if any, is expired when its deadline
        has come, else the watchdog is re-armed for it."""
        worker.watchdog = None
        run = self._loop_runs.get(worker.fd)
        if run is None or run.worker is not worker:
            return                 # idle: the next launch arms it again
        if run.deadline <= worker.watchdog_at:
            self._expired(run)
        else:
            self._arm_watchdog(worker, run.deadline)

    def _unwatch(self, worker: _Worker) -> None:
        """Stop reading ``worker``'s socket (before it is closed) and stop its watchdog."""
        if worker.watchdog is not None:
            worker.watchdog.cancel()
            worker.watchdog = None
        if self._watched.get(worker.fd) is worker:
            del self._watched[worker.fd]
            self._loop.remove_reader(worker.fd)

    def _end(self, run: _LoopRun) -> None:
        """``run`` is over: its writer goes (the worker's reader and watchdog stay for its next run)."""
        if self._loop_runs.pop(run.fd, None) is None:
            return
        if run.writing:
            self._loop.remove_writer(run.fd)

    def _writable(self, run: _LoopRun) -> None:
        try:
            flushed = run.worker.nowait.flush()
        except OSError:
            self._end(run)
            self._retire(run, "before it took the request")
            return
        if flushed:
            run.writing = False
            self._loop.remove_writer(run.fd)

    def _readable(self, fd: int) -> None:
        worker = self._watched.get(fd)
        run = self._loop_runs.get(fd)
        if worker is None:
            return
        if run is None or run.worker is not worker:
            self._idle_readable(worker)
            return
        try:
            message = wire.receive(worker.nowait)
        except BlockingIOError:     # woken with nothing to read
            return
        except (wire.ProtocolError, OSError) as exc:
            self._end(run)
            self._retire(run, None, f"predictor worker {worker.index} broke the protocol: {exc}")
            return
        if message is None:
            self._end(run)
            self._retire(run, "while it held the request")
            return
        try:
            result = worker.handle(worker.nowait, message, run.feeds)
        except (wire.ProtocolError, OSError) as exc:
            self._end(run)
            self._retire(run, None, f"predictor worker {worker.index} broke the protocol: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - the predictor's error goes to the run's requests
            self._end(run)
            worker.busy_since = None
            self._idle.put(worker)
            run.done(None, exc)
            return
        if result is None:          # ``need``: ``grown`` sent, the answer is still to come
            if worker.nowait.pending and not run.writing:
                run.writing = True
                self._loop.add_writer(run.fd, self._writable, run)
            return
        self._end(run)
        outputs, seconds, cpu = result
        self._slots[worker.index].failures = 0
        worker.busy_since = None
        self._idle.put(worker)
        if self._on_run is not None:
            feeds = run.feeds
            self._on_run(int(next(iter(feeds.values())).shape[0]) if feeds else 0, seconds, cpu)
        run.done(outputs, None)

    def _idle_readable(self, worker: _Worker) -> None:
        """A watched worker without a run spoke: EOF (it died idle) or a message out of turn; it is retired."""
        try:
            message = wire.receive(worker.nowait)
        except BlockingIOError:
            return
        except (wire.ProtocolError, OSError) as exc:
            message = exc
        self._unwatch(worker)
        if message is None:
            self._loop.run_in_executor(None, lambda: self._lost(worker, worker.lost_message("while idle"), True))
        else:
            self._loop.run_in_executor(None, self._lost, worker, f"predictor worker {worker.index} broke the "
                                       f"protocol while idle: {message!r:.200}", True)

    def _expired(self, run: _LoopRun) -> None:
        """The run passed its bound: the worker is SIGKILLed now, the run's requests answered now (6000), and
        the worker reaped and replaced off the loop."""
        self._end(run)
        worker = run.worker
        self._unwatch(worker)
        try:
            worker.proc.kill()
        except ProcessLookupError:
            pass
        why = f"its run passed {run.bound} {run.limit:g}s; killed"
        self._loop.run_in_executor(None, self._lost, worker, why, False)
        run.done(None, WorkerTimeout(f"the predictor did not answer within {run.bound} {run.limit:g}s; "
                                     f"its worker process was killed and is being replaced"))

    def _retire(self, run: _LoopRun, when: Optional[str], message: Optional[str] = None) -> None:
        """The worker died (``when``: at which point; its exit status is awaited off the loop, up to 2 s) or
        broke the protocol (``message``): it is replaced and the run fails with WorkerLost."""
        worker, loop = run.worker, self._loop
        self._unwatch(worker)

        def retire() -> str:
            why = message if message is not None else worker.lost_message(when)
            self._lost(worker, why, failure=True)
            return why

        def settle(future: asyncio.Future) -> None:
            try:
                why = future.result()
            except Exception as exc:  # noqa: BLE001 - the run still gets its answer
                why = f"predictor worker {worker.index} (pid {worker.pid}) lost: {exc}"
            run.done(None, WorkerLost(why))

        loop.run_in_executor(None, retire).add_done_callback(settle)

    def _lost(self, worker: _Worker, why: str, failure: bool) -> None:
        """Retire ``worker`` and have the supervisor start its replacement (after a backoff on failures)."""
        with self._lock:
            if worker.dead:
                return
            worker.dead = True
            slot = self._slots[worker.index]
            if failure:
                slot.failures += 1
            delay = backoff_delay(max(1, slot.failures), _BACKOFF_BASE_S, _BACKOFF_CAP_S) if failure else 0.0
            closing = self._closing
            if not closing and slot.worker is worker:
                slot.due = time.monotonic() + delay
        if worker.alive():
            worker.kill()
        worker.release()
        if not closing:
            logger.error("%s; replacing it in %.1fs (%d of %d workers ready)", why, delay, self.ready_workers(),
                         self.size)
            self._wake.set()

    # -- health ----------------------------------------------------------------------------------------
    def ready_workers(self) -> int:
        """Workers that can take a run now or will finish theirs within ``predict_timeout``."""
        now = time.monotonic()
        count = 0
        for slot in self._slots:
            w = slot.worker
            if w is not None and w.ready and not w.dead and (w.busy_since is None
                                                             or now - w.busy_since <= self.predict_timeout):
                count += 1
        return count

    def oldest_run_seconds(self) -> float:
        """Seconds the longest run in progress has taken so far (0 when none runs)."""
        starts = [s.worker.busy_since for s in self._slots if s.worker is not None and s.worker.busy_since]
        return time.monotonic() - min(starts) if starts else 0.0

    def runs_in_progress(self) -> int:
        """Workers running a batch now."""
        return sum(1 for s in self._slots if s.worker is not None and s.worker.busy_since is not None)

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self._slots)

    def worker_pids(self) -> list[int]:
        """Pids of the current workers (alive or not)."""
        return [s.worker.pid for s in self._slots if s.worker is not None]

    # -- supervisor thread -----------------------------------------------------------------------------
    def _supervise(self) -> None:
        first = True
        while True:
            with self._lock:
                if self._closing:
                    break
                due = [s for s in self._slots if s.due is not None and s.due <= time.monotonic()]
            if due:
                self._start_workers(due, first)
                if first:
                    first = False
                    self._started.set()
                    if self._start_error is not None:
                        return
                continue
            self._reap_idle()
            self._keep_spare()
            self._wake.wait(_SUPERVISE_S)
            self._wake.clear()
        self._started.set()

    def _start_workers(self, slots: list, first: bool) -> None:
        """Spawn a worker for each slot (loading in parallel), then wait for each to be ready."""
        spawned = []
        for slot in slots:
            slot.due = None
            worker = None if first else self._take_spare(slot.gpu_id)
            try:
                if worker is not None:
                    try:
                        worker.place(slot.index)
                    except OSError:   # the spare died meanwhile: a fresh process instead
                        worker.kill()
                        worker.release()
                        worker = None
                if worker is None:
                    worker = _Worker(slot.index, slot.gpu_id)
                    worker.begin(slot.index, self.options)
            except OSError as exc:
                if worker is not None:
                    worker.kill()
                    worker.release()
                self._failed_start(slot, f"predictor worker {slot.index} could not start: {exc}", first)
                continue
            spawned.append((slot, worker))
            with self._lock:
                self._loading.append(worker)
        deadline = time.monotonic() + self.load_timeout
        for slot, worker in spawned:
            if worker.ready:    # the spare, its model loaded already
                problem = None
                logger.info("predictor worker %d ready (pid %d, the spare)", worker.index, worker.pid)
            else:
                problem = worker.await_ready(deadline, self.load_timeout)
            with self._lock:
                self._loading.remove(worker)
            if problem is not None:
                worker.release()
                self._failed_start(slot, problem, first)
                continue
            with self._lock:
                closing = self._closing
                slot.worker = worker
                if not first:
                    slot.restarts += 1
            if closing:
                continue
            if not self.input_names:
                self.input_names, self.output_names = worker.input_names, worker.output_names
            self._idle.put(worker)
            self._notify_idle()
        if first and self._start_error is None:
            self._spare_due = time.monotonic()

    def _take_spare(self, gpu_id: Optional[int]) -> Optional[_Worker]:
        """The spare process when it is alive and sees ``gpu_id``'s GPU (a new spare is started after)."""
        with self._lock:
            spare = self._spare
            if spare is None or spare.gpu_id != gpu_id:
                return None
            self._spare = None
            self._spare_due = time.monotonic()
        if spare.alive():
            self._spare_failures = 0
            return spare
        spare.kill()
        spare.release()
        return None

    def _keep_spare(self) -> None:
        """Start the spare when it is due; a spare that died is logged and started again after a backoff."""
        if not self._use_spare:
            return
        spare = self._spare
        if spare is not None and not spare.ready and spare.proc.poll() is None and spare.readable():
            problem = spare.await_ready(time.monotonic() + 5, self.load_timeout)
            if problem is not None:
                logger.warning("the spare %s", problem)
        if spare is not None:
            if spare.proc.poll() is None:
                return
            with self._lock:
                self._spare = None
                self._spare_failures += 1
                delay = backoff_delay(self._spare_failures, _BACKOFF_BASE_S, _BACKOFF_CAP_S)
                self._spare_due = time.monotonic() + delay
            spare.release()
            logger.warning("the spare predictor worker (pid %d) %s; starting another in %.1fs", spare.pid,
                           exit_reason(spare.proc.returncode), delay)
            return
        if self._spare_due is None or time.monotonic() < self._spare_due:
            return
        spare = None
        try:
            spare = _Worker(-1, self._slots[0].gpu_id)
            spare.begin(-1, self.options)
        except OSError as exc:
            if spare is not None:
                spare.kill()
                spare.release()
            with self._lock:
                self._spare_failures += 1
                self._spare_due = time.monotonic() + backoff_delay(self._spare_failures, _BACKOFF_BASE_S,
                                                                    _BACKOFF_CAP_S)
            logger.warning("could not start a spare predictor worker: %s", exc)
            return
        with self._lock:
            if self._closing:
                closing = True
            else:
                closing = False
                self._spare, self._spare_due = spare, None
        if closing:
            spare.kill()
            spare.release()

    def _failed_start(self, slot: _Slot, problem: str, first: bool) -> None:
        if self._closing:
            return
        if first:
            self._start_error = self._start_error or problem
            return
        with self._lock:
            slot.failures += 1
            delay = backoff_delay(slot.failures, _BACKOFF_BASE_S, _BACKOFF_CAP_S)
            slot.due = time.monotonic() + delay
        logger.error("%s; trying again in %.1fs", problem, delay)

    def _reap_idle(self) -> None:
        """Idle workers that died (a signal from outside, the OOM killer) are replaced before a run finds them."""
        for slot in self._slots:
            w = slot.worker
            # a worker the event loop watches is retired by the loop (its reader sees the EOF): its socket must
            # be unregistered from the loop before it is closed, which only the loop's thread may do
            if w is not None and not w.dead and w.busy_since is None and w.proc.poll() is not None and \
                    self._watched.get(w.fd) is not w:
                self._lost(w, f"predictor worker {w.index} (pid {w.pid}) {exit_reason(w.proc.returncode)} while "
                              f"idle", failure=True)
