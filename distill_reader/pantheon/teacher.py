"""Pantheon ``Teacher``: serve a static-graph teacher's knowledge online (authenticated TCP) or offline (files).

Example (online; the student registers ``"<host>:8080"`` with the same token)::

    import numpy  # before paddle
    import paddle
    from distill_reader.pantheon import Teacher

    teacher = Teacher(out_port=8080, token="secret")       # or out_path="knowledge/" for offline mode
    teacher.start()                                        # waits for the student
    teacher.start_knowledge_service(feed_list=[x.name], schema={"x": x, "logits": logits}, program=program,
                                    reader_config={"batch_generator": batches}, exe=exe, times=2)
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

import numpy as np

from ..knowledge import KnowledgeError
from ..knowledge.spec import cast_checked
from ..snapshot import snapshot
from .knowledge_merge import describe
from .transport import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    Connection,
    ConnectionLost,
    Listener,
    PantheonError,
    ProtocolError,
    frame_limit,
    resolve_timeout,
    resolve_token,
)

logger = logging.getLogger(__name__)

__all__ = ["Teacher", "StudentDisconnected"]


class StudentDisconnected(PantheonError):
    """The student closed the connection or died while the teacher needed it."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Closed:
    """The student said goodbye."""


class Teacher:
    """The teacher side of Pantheon: knowledge goes out through a TCP port (online) or into files (offline).

    Args:
        out_path: offline mode: the knowledge directory to write (the project's knowledge file format).
        out_port: online mode: the TCP port the student connects to.
        out_host: the address to listen on in online mode: default ``"0.0.0.0"``, every IPv4 interface (students
            on other nodes, as Pantheon documents); give one address (e.g. ``"127.0.0.1"``, or ``"::"`` for IPv6)
            to bind only that one.
        token: the shared secret of online mode (default ``$DISTILL_PANTHEON_TOKEN``).
        timeout: seconds to wait for the student to connect, and the silence after which a connected
            student is declared dead (default ``$DISTILL_PANTHEON_TIMEOUT`` or 60).
        handshake_timeout: seconds each new connection has to complete the authentication handshake (online);
            handshakes run side by side, so connections that never speak cannot keep the student out.
        max_frame_bytes: the longest frame accepted from the student (online; default 64 MiB, see
            ``transport.frame_limit``).

    Raises:
        ValueError: both or neither of ``out_path`` / ``out_port``, no token online, a non-positive timeout.
        PantheonError (from ``start``): the port cannot be bound, or no student authenticated within the timeout.
    """

    def __init__(self, out_path: Union[str, os.PathLike, None] = None, out_port: Optional[int] = None,
                 out_host: str = "0.0.0.0",
                 token: str | bytes | None = None, timeout: Optional[float] = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT, max_frame_bytes: Optional[int] = None) -> None:
        """Check the arguments.

        Raises:
            ValueError: both or neither of ``out_path``/``out_port`` given.
        """
        if out_path and out_port:
            raise ValueError("out_path (offline mode) and out_port (online mode) cannot be set at the same time")
        if not out_path and not out_port:
            raise ValueError("one of out_path (offline mode) or out_port (online mode) must be given")
        self._out_path = os.fspath(out_path) if out_path else None
        self._out_port = int(out_port) if out_port else None
        self._out_host = out_host
        self._token = resolve_token(token) if out_port else None
        self._timeout = resolve_timeout(timeout)
        self._handshake_timeout = float(handshake_timeout)
        self._max_frame = frame_limit(max_frame_bytes=max_frame_bytes)
        self._knowledge_desc: OrderedDict[str, dict] = OrderedDict()
        self._started = False
        self._conn: Optional[Connection] = None
        self._writer = None
        self._s2t: queue.Queue[Any] = queue.Queue()
        self._commands: queue.Queue[Any] = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._student_said_bye = False
        self._read_failure: Optional[BaseException] = None  # why the reader thread stopped, if it failed

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Online: listen and wait (up to the timeout) for the student to connect. Offline: open the output.

        Raises:
            ValueError: started before.
            PantheonError: (online) no student connected within the timeout, or the port cannot be bound.
        """
        if self._started:
            raise ValueError("the teacher cannot be started more than once")
        self._started = True
        if self._out_path:
            return  # the knowledge file is opened when the description is known (first dump or service)
        listener = Listener(self._out_host, self._out_port, self._token, self._handshake_timeout, self._max_frame)
        logger.info("teacher listening on %s:%d, waiting up to %gs for the student", self._out_host,
                    listener.address[1], self._timeout)
        try:
            self._conn = listener.accept(self._timeout)
        finally:
            listener.close()
        logger.info("%s connected", self._conn.peer)
        self._reader = threading.Thread(target=self._read_loop, name="pantheon-teacher-reader", daemon=True)
        self._reader.start()

    def close(self) -> None:
        """Offline: commit the knowledge file and mark it complete (call it after the last ``dump()``: knowledge
        that was never closed stays incomplete and the student refuses it). Online: say goodbye to the student
        and close the connection."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.send("bye")
            except PantheonError:
                pass
            if self._reader is not None:
                self._reader.join(self._timeout)
            self._conn.close()

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._writer is not None:
            self._writer.abort()
            self._writer = None
        self.close()

    # ------------------------------------------------------------------ messages

    def send(self, data: Any) -> None:
        """Send one JSON-like value or numpy array to the student (online mode).

        Raises:
            StudentDisconnected: the student is gone.
        """
        conn = self._online("send data to the student")
        try:
            conn.send("data", data)
        except ConnectionLost as exc:
            raise StudentDisconnected(f"cannot send to the student: {exc}") from exc

    def recv(self) -> Any:
        """Receive one value the student sent with ``Student.send`` (online mode); blocks until it arrives."""
        self._online("receive data from the student")
        return self._take(self._s2t, "waiting for a message from the student")

    def dump(self, knowledge: Mapping[str, np.ndarray]) -> None:
        """Write one batch of knowledge (dict name -> array, batch first) to the offline knowledge file.

        The knowledge is complete (readable by the student) once ``close()`` is called after the last batch.

        Raises:
            ValueError: not started, an online teacher, ``knowledge`` not a mapping, or a description that differs from
                the earlier batches'.
        """
        if not self._started:
            raise ValueError("call start() before dump()")
        if not self._out_path:
            raise ValueError("dump() writes offline knowledge: this teacher is online (out_port); "
                             "use start_knowledge_service() to stream knowledge to the student")
        if not isinstance(knowledge, Mapping):
            raise ValueError(f"knowledge must be a dict of name -> array, got {type(knowledge).__name__}")
        batch = OrderedDict((name, np.asarray(value)) for name, value in knowledge.items())
        desc = describe(batch)
        if self._writer is None:
            self._knowledge_desc = desc
            self._writer = _open_offline_writer(self._out_path, desc, use_fp16=False)
        elif desc != self._knowledge_desc:
            raise ValueError(f"knowledge description {dict(desc)} differs from the earlier batches' "
                             f"{dict(self._knowledge_desc)}")
        self._writer.write(batch)

    # ------------------------------------------------------------------ knowledge service

    def start_knowledge_service(self, feed_list: list, schema: Mapping[str, Any], program: Any,
                                reader_config: Mapping[str, Any], exe: Any, buf_size: int = 10,
                                use_fp16: bool = False, times: int = 1) -> None:
        """Run ``program`` over the reader's data and serve the knowledge named by ``schema``.

        Args:
            feed_list: feed Variables (or their names) of ``program``, in the order of the reader's slots.
            schema: knowledge name -> Variable (or name) to fetch; a feed Variable is served as read.
            program: the teacher's static ``paddle.static.Program``.
            reader_config: one of ``{"sample_generator": g, "batch_size": n, "drop_last": True}``,
                ``{"sample_list_generator": g}`` or ``{"batch_generator": g}`` (tried in this order).
            exe: the ``paddle.static.Executor`` to run on. Devices: FLAGS_selected_gpus, else
                CUDA_VISIBLE_DEVICES, for a CUDA place; CPU_NUM for the CPU (see the docs: paddle 2.6 has no
                data-parallel inference executor, so prediction runs on ``exe.place``).
            buf_size: batches predicted ahead of the transport.
            use_fp16: send/store float32/float64 knowledge as float16; the student casts it back.
            times: passes to serve (online); one per ``Student.get_knowledge_generator`` call. Offline
                knowledge is written once and may be read any number of times.

        Raises:
            ValueError: not started, ``buf_size`` or ``times`` <= 0, or (offline) a description that differs from the
                earlier one.
        """
        if not self._started:
            raise ValueError("call start() before start_knowledge_service()")
        if buf_size <= 0:
            raise ValueError(f"buf_size must be positive, got {buf_size}")
        if times <= 0:
            raise ValueError(f"times must be positive, got {times}")
        plan = _PredictionPlan(feed_list, schema, program, reader_config, exe)
        if self._knowledge_desc and self._knowledge_desc != plan.desc and self._out_path:
            raise ValueError("the knowledge description must stay the same in offline mode")
        self._knowledge_desc = plan.desc
        logger.info("knowledge description %s", dict(plan.desc))
        if self._out_path:
            if times > 1:
                logger.warning("times=%d ignored in offline mode: the knowledge file is written once and the "
                               "student may read it any number of times", times)
            self._serve_offline(plan, buf_size, use_fp16)
        else:
            self._serve_online(plan, buf_size, use_fp16, times)

    def _serve_offline(self, plan: _PredictionPlan, buf_size: int, use_fp16: bool) -> None:
        if self._writer is None:
            self._writer = _open_offline_writer(self._out_path, plan.desc, use_fp16=use_fp16)
        samples = 0
        try:
            for batch in _prefetch(plan.batches, buf_size):
                self._writer.write(batch)
                samples += len(next(iter(batch.values())))
        except BaseException:
            self._writer.abort()
            self._writer = None
            raise
        self._writer.close()
        self._writer = None
        logger.info("wrote %d samples of knowledge to %s", samples, self._out_path)

    def _serve_online(self, plan: _PredictionPlan, buf_size: int, use_fp16: bool, times: int) -> None:
        conn = self._online("serve knowledge")
        for pass_index in range(times):
            while True:
                command = self._take(self._commands, f"waiting for the student to start pass {pass_index + 1}",
                                     closed_ok=True)
                if command is _Closed:
                    logger.warning("the student closed the connection after %d of %d passes", pass_index, times)
                    self._conn.close()
                    return
                if command == "desc?":
                    self._send(conn, "desc", plan.desc, times=times, served=pass_index)
                elif command == "start":
                    break
            logger.info("pass %d of %d: serving knowledge", pass_index + 1, times)
            batches = samples = 0
            try:
                for batch in _prefetch(plan.batches, buf_size):
                    if use_fp16:
                        batch = _to_fp16(batch)
                    self._send(conn, "batch", batch)
                    batches += 1
                    samples += len(next(iter(batch.values())))
            except StudentDisconnected as exc:
                raise StudentDisconnected(f"the student disconnected in the middle of pass {pass_index + 1} of "
                                          f"{times} (after {batches} batches): {exc}") from exc
            except Exception as exc:
                try:
                    conn.send("error", f"{type(exc).__name__}: {exc}")
                except PantheonError:
                    pass
                raise
            self._send(conn, "end", None, batches=batches, samples=samples, served=pass_index + 1, times=times)
            logger.info("pass %d of %d: served %d samples in %d batches", pass_index + 1, times, samples, batches)
        # Say goodbye and wait until the student has read everything (it answers 'bye' or closes); a dead
        # student is detected by the connection's heartbeat timeout.
        try:
            conn.send("bye")
        except ConnectionLost:
            pass
        if self._reader is not None:
            self._reader.join()
        conn.close()
        logger.info("teacher finished serving %d pass(es)", times)

    # ------------------------------------------------------------------ plumbing

    def _online(self, what: str) -> Connection:
        if not self._started:
            raise ValueError(f"call start() before trying to {what}")
        if self._conn is None:
            raise ValueError(f"cannot {what}: this teacher is in offline mode (out_path)")
        return self._conn

    def _send(self, conn: Connection, kind: str, value: Any = None, **fields: Any) -> None:
        try:
            conn.send(kind, value, **fields)
        except ConnectionLost as exc:
            cause = self._read_failure if isinstance(self._read_failure, ProtocolError) else exc
            raise StudentDisconnected(str(cause)) from cause

    def _take(self, source: queue.Queue[Any], what: str, closed_ok: bool = False) -> Any:
        item = source.get()
        if isinstance(item, _Failure) or item is _Closed:
            source.put(item)  # every later call fails the same way
        if isinstance(item, _Failure):
            raise StudentDisconnected(f"{what}: {item.error}") from item.error
        if item is _Closed and not closed_ok:
            raise StudentDisconnected(f"{what}: the student closed the connection")
        return item

    def _read_loop(self) -> None:
        conn = self._conn
        try:
            while True:
                kind, value, _ = conn.recv()
                if kind == "data":
                    self._s2t.put(value)
                elif kind in ("desc?", "start"):
                    self._commands.put(kind)
                elif kind == "bye":
                    self._student_said_bye = True
                    for target in (self._s2t, self._commands):
                        target.put(_Closed)
                    return
                else:
                    raise ProtocolError(f"unexpected message {kind!r} from the student")
        except Exception as exc:  # noqa: BLE001  (delivered to whoever waits; this thread must not die silently)
            if not isinstance(exc, PantheonError):
                logger.exception("unexpected error reading from %s", conn.peer)
                exc = ProtocolError(f"reading from {conn.peer} failed: {type(exc).__name__}: {exc}")
            self._read_failure = exc
            conn.close()
            for target in (self._s2t, self._commands):
                target.put(_Failure(exc))


# ---------------------------------------------------------------------- prediction


class _PredictionPlan:
    """The checked arguments of ``start_knowledge_service`` and the batches of knowledge they produce."""

    def __init__(self, feed_list: list, schema: Mapping[str, Any], program: Any,
                 reader_config: Mapping[str, Any], exe: Any) -> None:
        from distill_base.paddle_compat import import_paddle, is_pir_program

        paddle = import_paddle("the Pantheon teacher's knowledge service")
        from paddle.base.data_feeder import convert_dtype

        pir = is_pir_program(program)
        if not (pir or isinstance(program, paddle.static.Program)):
            raise ValueError(f"program must be a paddle.static.Program, got {type(program).__name__}")
        if not isinstance(exe, paddle.static.Executor):
            raise ValueError(f"exe must be a paddle.static.Executor, got {type(exe).__name__}")
        if not isinstance(feed_list, (list, tuple)) or not feed_list:
            raise ValueError("feed_list must be a non-empty list of feed Variables or their names")
        if not isinstance(schema, Mapping) or not schema:
            raise ValueError("schema must be a non-empty dict of knowledge name -> Variable")
        if not isinstance(reader_config, Mapping):
            raise ValueError("reader_config must be a dict")
        var_of = _pir_values(program) if pir else _legacy_vars(program)
        self.feed_vars = [var_of(item, "feed") for item in feed_list]
        self.feed_names = [_feed_name(v, pir) for v in self.feed_vars]
        self.feed_dtypes = [convert_dtype(v.dtype) for v in self.feed_vars]
        self.feed_shapes = [list(v.shape) for v in self.feed_vars]
        # What exe.run fetches: variable names in legacy programs, Values in PIR programs (most have no name).
        self.schema_targets: OrderedDict[str, Any] = OrderedDict()
        self.desc: OrderedDict[str, dict] = OrderedDict()
        feed_of = dict(zip(self.feed_vars if pir else self.feed_names, self.feed_names))
        for key, item in schema.items():
            var = var_of(item, f"schema entry {key!r}:")
            self.schema_targets[key] = var if pir else var.name
            self.desc[key] = {"shape": [int(d) for d in var.shape], "dtype": convert_dtype(var.dtype),
                              "lod_level": 0 if pir else int(getattr(var, "lod_level", 0) or 0)}
        self.feed_of = feed_of  # fetch target -> feed name, for schema entries that are feeds
        self.fetch_targets = [t for t in dict.fromkeys(self.schema_targets.values()) if t not in feed_of]
        # Legacy programs are pruned for inference (dropout/batch-norm in test mode); build PIR teachers in eval mode.
        self.program = program if pir else program._inference_optimize(prune_read_op=True)
        self.exe = exe
        self.devices = _devices(exe)
        self.reader = _feed_batches(reader_config, self.feed_names, self.feed_dtypes, self.feed_shapes)

    def batches(self) -> Iterator[OrderedDict[str, np.ndarray]]:
        """Predict every batch the reader yields and return the schema's knowledge, in reader order."""
        for feed in self.reader():
            outputs = self.exe.run(self.program, feed=feed, fetch_list=self.fetch_targets, return_numpy=True) \
                if self.fetch_targets else []
            fetched: Dict[Any, np.ndarray] = dict(zip(self.fetch_targets, outputs))
            for target, name in self.feed_of.items():
                fetched[target] = feed[name]
            yield OrderedDict((key, np.asarray(fetched[t])) for key, t in self.schema_targets.items())


def _legacy_vars(program: Any):
    """Resolver of feed/schema items (Variables or names) in a legacy static program."""
    block = program.global_block()

    def var_of(item: Any, what: str):
        name = item if isinstance(item, str) else getattr(item, "name", None)
        if name is None or not block.has_var(name):
            raise ValueError(f"{what} {item!r} is not a variable of the teacher program")
        return block.var(name)

    return var_of


def _pir_values(program: Any):
    """Resolver of feed/schema items in a paddle 3 PIR program: Values, or the names of its data and parameters."""
    named = {}
    for op in program.global_block().ops:
        if op.name() == "pd_op.data":
            named[op.attrs()["name"]] = op.result(0)
        elif op.name() == "builtin.parameter":
            named[op.attrs()["parameter_name"]] = op.result(0)

    def var_of(item: Any, what: str):
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"{what} {item!r} is not a feed or parameter of the teacher's PIR program (only "
                                 "those have names in PIR: pass the Value itself)")
            return named[item]
        if type(item).__name__ != "Value":
            raise ValueError(f"{what} {item!r} is not a Value of the teacher's PIR program")
        return item

    return var_of


def _feed_name(var: Any, pir: bool) -> str:
    if not pir:
        return var.name
    op = var.get_defining_op()
    if op is None or op.name() != "pd_op.data":
        raise ValueError(f"feed {var!r} is not a paddle.static.data input of the teacher's PIR program")
    return op.attrs()["name"]


def _devices(exe: Any) -> List[str]:
    """The devices the seed names: FLAGS_selected_gpus / CUDA_VISIBLE_DEVICES on CUDA, CPU_NUM on the CPU."""
    import paddle

    place = exe.place
    if isinstance(place, paddle.CUDAPlace) or "gpu" in str(place).lower():
        ids = os.environ.get("FLAGS_selected_gpus") or os.environ.get("CUDA_VISIBLE_DEVICES") or "0"
        devices = [f"gpu:{d.strip()}" for d in ids.split(",") if d.strip()]
    else:
        devices = ["cpu"] * max(1, int(os.environ.get("CPU_NUM", "1")))
    if len(devices) > 1:
        logger.warning("%d devices requested (%s), but paddle 2.6 static graph has no data-parallel inference "
                       "executor: this teacher predicts on %s only; start one teacher per device to use them all",
                       len(devices), ",".join(devices), place)
    else:
        logger.info("teacher predicts on %s", place)
    return devices


def _feed_batches(reader_config: Mapping[str, Any], names: List[str], dtypes: List[str],
                  shapes: List[list]) -> Callable[[], Iterator[Dict[str, np.ndarray]]]:
    """A callable that yields feed dicts from the three Pantheon reader kinds (tried in this order)."""

    def to_array(values: Any, slot: int) -> np.ndarray:
        array = np.asarray(values, dtype=dtypes[slot])
        tail = shapes[slot][1:]
        if tail and all(d >= 0 for d in tail) and list(array.shape[1:]) != tail:
            try:
                array = array.reshape([-1] + tail)
            except ValueError as exc:
                raise ValueError(f"feed {names[slot]!r}: data of shape {list(array.shape)} does not fit the "
                                 f"variable's shape {shapes[slot]}") from exc
        return array

    def samples_to_feed(samples: list) -> Dict[str, np.ndarray]:
        rows = [s if isinstance(s, (list, tuple)) else (s,) for s in samples]
        for row in rows:
            if len(row) != len(names):
                raise ValueError(f"a sample has {len(row)} slots but feed_list has {len(names)} ({names})")
        return {name: to_array([row[i] for row in rows], i) for i, name in enumerate(names)}

    if "sample_generator" in reader_config:
        if "batch_size" not in reader_config:
            raise ValueError("reader_config with a sample_generator needs a batch_size")
        generator = reader_config["sample_generator"]
        batch_size = int(reader_config["batch_size"])
        drop_last = bool(reader_config.get("drop_last", True))
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")

        def from_samples() -> Iterator[Dict[str, np.ndarray]]:
            pending: list = []
            for sample in generator():
                pending.append(snapshot(sample))   # the generator may reuse its buffer at its next step
                if len(pending) == batch_size:
                    yield samples_to_feed(pending)
                    pending = []
            if pending and not drop_last:
                yield samples_to_feed(pending)

        return from_samples
    if "sample_list_generator" in reader_config:
        generator = reader_config["sample_list_generator"]

        def from_sample_lists() -> Iterator[Dict[str, np.ndarray]]:
            for sample_list in generator():
                yield samples_to_feed(list(sample_list))

        return from_sample_lists
    if "batch_generator" in reader_config:
        generator = reader_config["batch_generator"]

        def from_batches() -> Iterator[Dict[str, np.ndarray]]:
            for batch in generator():
                if isinstance(batch, Mapping):
                    batch = [batch[name] for name in names]
                elif not isinstance(batch, (list, tuple)):
                    batch = [batch]
                if len(batch) != len(names):
                    raise ValueError(f"a batch has {len(batch)} slots but feed_list has {len(names)} ({names})")
                yield {name: _owned(to_array(np.asarray(value), i), value) for i, (name, value) in
                       enumerate(zip(names, batch))}

        return from_batches
    raise ValueError("reader_config has no generator: give one of 'sample_generator' (with 'batch_size'), "
                     "'sample_list_generator' or 'batch_generator'")


def _owned(array: np.ndarray, source: Any) -> np.ndarray:
    """``array``, copied if it still shares the user's memory: the batch is predicted and sent after the
    generator's next steps (prefetch), and the generator may reuse its buffer."""
    return array.copy() if isinstance(source, np.ndarray) and np.may_share_memory(array, source) else array


def _to_fp16(batch: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Float fields as float16; a finite value that float16 cannot hold (over 65504) raises PantheonError, as
    the offline writer refuses it (never inf at the student)."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, value in batch.items():
        if value.dtype not in (np.float32, np.float64):
            out[key] = value
            continue
        try:
            out[key] = cast_checked(value, np.dtype(np.float16), f"knowledge {key!r}")
        except KnowledgeError as exc:
            raise PantheonError(f"cannot send knowledge as float16 (use_fp16=True): {exc}") from None
    return out


_DONE = object()


def _prefetch(make: Callable[[], Iterator[Any]], depth: int) -> Iterator[Any]:
    """Run the iterator ``make()`` in a daemon thread, ``depth`` items ahead; its errors re-raise here."""
    items: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in make():
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_DONE)
        except BaseException as exc:  # noqa: B036  (re-raised in the consumer)
            items.put(_Failure(exc))

    thread = threading.Thread(target=produce, name="pantheon-predict", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _open_offline_writer(path: str, desc: Mapping[str, dict], use_fp16: bool):
    from .knowledge_files import OfflineKnowledgeWriter

    return OfflineKnowledgeWriter(path, desc, use_fp16=use_fp16)
