"""Pantheon ``Student``: receive knowledge from online and offline teachers, merge it, re-batch it.

Example::

    from distill_reader.pantheon import Student

    student = Student(merge_strategy={"result": "mean"}, token="secret")
    student.register_teacher(in_address="127.0.0.1:8080")     # teacher 0, online
    student.register_teacher(in_path="teacher2_knowledge")     # teacher 1, offline knowledge files
    student.start()
    desc = student.get_knowledge_desc()
    for batch in student.get_knowledge_generator(batch_size=32)():
        ...                                                    # dict name -> array, 32 rows
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Union

import numpy as np

from .knowledge_merge import check_desc, check_strategy, conform, merge_descs, merged_stream
from .transport import (
    Connection,
    ConnectionLost,
    PantheonError,
    ProtocolError,
    connect,
    frame_limit,
    resolve_timeout,
    resolve_token,
)

logger = logging.getLogger(__name__)

__all__ = ["Student", "TeacherDisconnected"]

_QUEUE_CAPACITY = 100  # merged batches ready for the training loop, as in Pantheon
_TEACHER_BUFFER = 32  # batches received from one online teacher and not yet merged
_POLL_S = 0.25  # how often a wait on a teacher re-checks that its connection still lives


class TeacherDisconnected(PantheonError):
    """An online teacher closed the connection, died, went silent, or reported an error."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class _OnlineTeacher:
    """One connected teacher: a reader thread sorts its messages into data, description and knowledge queues."""

    def __init__(self, teacher_id: int, address: str, conn: Connection, max_frame_bytes: Optional[int]) -> None:
        self.name = f"teacher {teacher_id} at {address}"
        self.conn = conn
        self.max_frame_bytes = max_frame_bytes
        self.t2s: queue.Queue[Any] = queue.Queue()
        self.descs: queue.Queue[Any] = queue.Queue()
        self.knowledge: queue.Queue[Any] = queue.Queue(_TEACHER_BUFFER)
        self.times: Optional[int] = None
        self.served = 0
        self.in_pass = False
        self.batches_in_pass = 0
        self.finished = False
        self.failure: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._read_loop, name=f"pantheon-{self.name}", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        try:
            while True:
                kind, value, header = self.conn.recv()
                if kind == "data":
                    self.t2s.put(value)
                elif kind == "desc":
                    value = check_desc(value, self.name)
                    self.times = _count(header, "times", 1, self.name)
                    # knowledge frames may now be as large as the description says (or as the user allows)
                    self.conn.max_frame_bytes = frame_limit(value, self.max_frame_bytes)
                    self.descs.put(value)
                elif kind == "batch":
                    if not self.in_pass:   # the queue below fills only while a pass reads it
                        raise ProtocolError(f"{self.name} sent a knowledge batch outside a pass")
                    self.batches_in_pass += 1
                    self._put(self.knowledge, value)
                elif kind == "end":
                    self.served = _count(header, "served", self.served + 1, self.name)
                    self.in_pass = False
                    self._put(self.knowledge, _END)
                elif kind == "error":
                    raise TeacherDisconnected(f"{self.name} failed: {value}")
                elif kind == "bye":
                    self.finished = True
                    try:
                        self.conn.send("bye")
                    except PantheonError:
                        pass
                    self.conn.close()
                    raise TeacherDisconnected(f"{self.name} has finished serving "
                                              f"({self.served} of times={self.times} passes) and closed")
                else:
                    raise ProtocolError(f"unexpected message {kind!r} from {self.name}")
        except Exception as exc:  # noqa: BLE001  (delivered to whoever waits; this thread must not die silently)
            if not isinstance(exc, PantheonError):
                logger.exception("unexpected error reading from %s", self.name)
                exc = ProtocolError(f"{self.name} sent a message that could not be handled: "
                                    f"{type(exc).__name__}: {exc}")
            self.conn.close()
            if isinstance(exc, ConnectionLost) and self.in_pass:
                exc = TeacherDisconnected(f"{self.name} disconnected in the middle of pass {self.served + 1} "
                                          f"(after {self.batches_in_pass} batches): {exc}; did the teacher die?")
            elif isinstance(exc, ConnectionLost):
                exc = TeacherDisconnected(f"{self.name}: {exc}")
            self.failure = exc
            failure = _Failure(exc)
            for target in (self.t2s, self.descs, self.knowledge):
                try:
                    target.put_nowait(failure)
                except queue.Full:   # take() raises self.failure once the batches before it are read
                    pass

    def _put(self, target: queue.Queue[Any], item: Any) -> None:
        """Queue ``item`` for the training loop, waiting while it is full, as long as the connection lives."""
        while True:
            try:
                target.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if self.conn.closed:
                    raise ConnectionLost(f"{self.name}: connection closed") from None

    def take(self, source: queue.Queue[Any], timeout: Optional[float] = None) -> Any:
        """The next item of ``source``; the reader thread's failure if it ended, TeacherDisconnected if nothing
        came within ``timeout`` seconds (None: as long as the reader thread lives)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = source.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if self.failure is not None and source.empty():
                    raise self.failure from None
                if not self._thread.is_alive() and source.empty():
                    raise TeacherDisconnected(f"{self.name}: the connection's reader has stopped") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TeacherDisconnected(f"{self.name} sent no knowledge description within {timeout:g}s "
                                              f"of being asked") from None
        if isinstance(item, _Failure):
            source.put(item)  # every later call fails the same way
            raise item.error
        return item

    def request_desc(self) -> Dict[str, dict]:
        if self.finished or (self.times is not None and self.served >= self.times):
            raise PantheonError(f"{self.name} was started with times={self.times} and has served all its passes")
        self._send("desc?")
        return self.take(self.descs, timeout=self.conn.timeout)

    def start_pass(self) -> None:
        self.in_pass = True
        self.batches_in_pass = 0
        self._send("start")

    def stream(self) -> Iterator[Mapping[str, np.ndarray]]:
        while True:
            item = self.take(self.knowledge)
            if item is _END:
                return
            yield item

    def _send(self, kind: str, value: Any = None) -> None:
        try:
            self.conn.send(kind, value)
        except ConnectionLost as exc:
            raise TeacherDisconnected(f"{self.name}: {exc}") from exc


def _count(header: dict, key: str, default: int, name: str) -> int:
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise ProtocolError(f"{name} sent {key}={value!r}, not a count")
    return value


class _OfflineTeacher:
    """Knowledge files written by an offline teacher; every pass reads them from the start."""

    def __init__(self, teacher_id: int, path: str) -> None:
        from .knowledge_files import OfflineKnowledgeReader

        self.name = f"teacher {teacher_id} (offline, {path})"
        self.reader = OfflineKnowledgeReader(path)

    def request_desc(self) -> Dict[str, dict]:
        return self.reader.desc

    def stream(self) -> Iterator[Mapping[str, np.ndarray]]:
        return self.reader.batches()


class Student:
    """The student side of Pantheon: registers teachers, merges and re-batches their knowledge.

    Args:
        merge_strategy: knowledge key shared by several teachers -> ``"sum"`` or ``"mean"``.
        token: the shared secret of online teachers (default ``$DISTILL_PANTHEON_TOKEN``).
        timeout: seconds to wait for an online teacher to come up, and the silence after which a connected
            teacher is declared dead (default ``$DISTILL_PANTHEON_TIMEOUT`` or 60).
        max_frame_bytes: the longest frame accepted from an online teacher. Default: 64 MiB until the teacher's
            knowledge description is known, then room for 4096 samples of it (``transport.frame_limit``); raise
            it when a teacher sends larger batches (the student then fails with a ``ProtocolError`` naming it).

    Raises:
        ValueError: an unknown merge strategy, a non-positive timeout or ``max_frame_bytes``.
    """

    def __init__(self, merge_strategy: Optional[Mapping[str, str]] = None, token: str | bytes | None = None,
                 timeout: Optional[float] = None, max_frame_bytes: Optional[int] = None) -> None:
        self._merge_strategy = check_strategy(merge_strategy)
        self._max_frame = max_frame_bytes
        frame_limit(max_frame_bytes=max_frame_bytes)  # checked now
        self._token_arg = token
        self._timeout = resolve_timeout(timeout)
        self._teachers: List[Any] = []
        self._in_paths: List[Optional[str]] = []
        self._in_addresses: List[Optional[str]] = []
        self._started = False
        self._knowledge_desc: Optional[OrderedDict[str, dict]] = None
        self._teacher_descs: List[Dict[str, dict]] = []
        self._knowledge_queue: queue.Queue[Any] = queue.Queue(_QUEUE_CAPACITY)
        self._generator_active = False

    # ------------------------------------------------------------------ setup

    def register_teacher(self, in_path: Union[str, os.PathLike, None] = None, in_address: Optional[str] = None) -> int:
        """Register a teacher (ids from 0 in registration order): offline knowledge at ``in_path`` or an online
        teacher at ``in_address`` ("host:port"; waits up to the timeout for it to come up). Returns its id.

        Raises:
            ValueError: the student was started, both or neither of ``in_path``/``in_address`` given, or the teacher is
                already registered.
            PantheonError: the offline knowledge cannot be opened, or the online teacher is not reachable within the
                timeout.
        """
        if self._started:
            raise ValueError("the student has been started: register every teacher before start()")
        if in_path and in_address:
            raise ValueError("give in_path (offline teacher) or in_address (online teacher), not both")
        if not in_path and not in_address:
            raise ValueError("one of in_path (offline teacher) or in_address (online teacher) must be given")
        in_path = os.fspath(in_path) if in_path else None
        teacher_id = len(self._teachers)
        if in_address:
            if in_address in self._in_addresses:
                raise ValueError(f"teacher at {in_address} is already registered as teacher "
                                 f"{self._in_addresses.index(in_address)}")
            logger.info("connecting to teacher %d at %s (waiting up to %gs)", teacher_id, in_address, self._timeout)
            conn = connect(in_address, resolve_token(self._token_arg), self._timeout,
                           max_frame_bytes=frame_limit(max_frame_bytes=self._max_frame))
            teacher: Any = _OnlineTeacher(teacher_id, in_address, conn, self._max_frame)
        else:
            if in_path in self._in_paths:
                raise ValueError(f"knowledge at {in_path} is already registered as teacher "
                                 f"{self._in_paths.index(in_path)}")
            teacher = _OfflineTeacher(teacher_id, in_path)
        self._teachers.append(teacher)
        self._in_paths.append(in_path)
        self._in_addresses.append(in_address)
        logger.info("registered %s", teacher.name)
        return teacher_id

    def start(self) -> None:
        """End the registration of teachers.

        Raises:
            ValueError: started before, or no teacher registered.
        """
        if self._started:
            raise ValueError("the student cannot be started more than once")
        if not self._teachers:
            raise ValueError("register at least one teacher before start()")
        self._started = True

    def close(self) -> None:
        """Say goodbye to the online teachers and close their connections."""
        for teacher in self._teachers:
            if isinstance(teacher, _OnlineTeacher) and not teacher.conn.closed:
                try:
                    teacher.conn.send("bye")
                except PantheonError:
                    pass
                teacher.conn.close()

    def __enter__(self) -> Student:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ messages

    def send(self, data: Any, teacher_ids: Optional[Iterable[int]] = None) -> None:
        """Send one JSON-like value or numpy array to the online teachers in ``teacher_ids`` (default all)."""
        self._check_started("send")
        ids = range(len(self._teachers)) if teacher_ids is None else list(teacher_ids)
        for teacher_id in ids:
            teacher = self._teacher(teacher_id)
            if isinstance(teacher, _OnlineTeacher):
                teacher._send("data", data)
            else:
                logger.warning("not sent to %s: it is offline", teacher.name)

    def recv(self, teacher_id: int) -> Any:
        """Receive one value that online teacher ``teacher_id`` sent with ``Teacher.send``.

        Raises:
            ValueError: the student is not started, or the teacher is offline.
            PantheonError: the connection to the teacher failed (its error).
        """
        self._check_started("recv")
        teacher = self._teacher(teacher_id)
        if not isinstance(teacher, _OnlineTeacher):
            raise ValueError(f"cannot receive from {teacher.name}: it is offline")
        return teacher.take(teacher.t2s)

    # ------------------------------------------------------------------ knowledge

    def get_knowledge_desc(self) -> OrderedDict[str, dict]:
        """The merged knowledge description: key -> {"shape", "dtype", "lod_level"}, in teacher order."""
        self._check_started("get_knowledge_desc")
        if self._knowledge_desc is None:
            self._teacher_descs = [dict(t.request_desc()) for t in self._teachers]
            self._knowledge_desc = merge_descs(self._teacher_descs, self._merge_strategy,
                                               [t.name for t in self._teachers])
            logger.info("knowledge merge strategy %s, merged description %s", self._merge_strategy,
                        dict(self._knowledge_desc))
        return OrderedDict((k, dict(v)) for k, v in self._knowledge_desc.items())

    def get_knowledge_qsize(self) -> int:
        """Merged batches waiting for the knowledge generator (at most 100)."""
        self._check_started("get_knowledge_qsize")
        return self._knowledge_queue.qsize()

    def get_knowledge_generator(self, batch_size: int, drop_last: bool = False):
        """Start one pass over every teacher's knowledge and return a callable that yields merged batches.

        Each batch is a dict key -> array of ``batch_size`` rows (the last one smaller unless ``drop_last``).
        Online teachers serve ``times`` passes, one per call; offline knowledge can be read any number of times.

        Raises:
            ValueError: ``batch_size`` <= 0.
            PantheonError: (from the generator) the previous pass was not read to its end, this generator was read
                already, or a teacher failed (its error).
        """
        self._check_started("get_knowledge_generator")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if self._generator_active:
            raise PantheonError("the previous knowledge generator has not been read to its end: a teacher serves "
                                "one pass at a time")
        desc = self.get_knowledge_desc()
        self._generator_active = True
        for teacher in self._teachers:
            if isinstance(teacher, _OnlineTeacher):
                teacher.start_pass()
        streams = [self._conformed(t, d) for t, d in zip(self._teachers, self._teacher_descs)]
        merger = threading.Thread(target=self._merge_pass, args=(streams, desc, batch_size),
                                  name="pantheon-merge", daemon=True)
        merger.start()
        consumed = []

        def knowledge_generator() -> Iterator[OrderedDict[str, np.ndarray]]:
            if consumed:
                raise PantheonError("this knowledge generator was already read; call get_knowledge_generator() "
                                    "for another pass")
            consumed.append(True)
            while True:
                item = self._knowledge_queue.get()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    self._generator_active = False
                    raise item.error
                if drop_last and len(next(iter(item.values()))) < batch_size:
                    continue
                yield item
            self._knowledge_desc = None  # each pass asks the teachers again
            self._generator_active = False

        return knowledge_generator

    def _conformed(self, teacher: Any, desc: Dict[str, dict]) -> Iterator[Dict[str, np.ndarray]]:
        for batch in teacher.stream():
            yield conform(batch, desc, teacher.name)

    def _merge_pass(self, streams: list, desc: Mapping[str, dict], batch_size: int) -> None:
        try:
            for merged in merged_stream(streams, desc, self._merge_strategy, batch_size,
                                        [t.name for t in self._teachers]):
                self._knowledge_queue.put(merged)
            self._knowledge_queue.put(_END)
        except Exception as exc:  # re-raised in the training loop
            self._knowledge_queue.put(_Failure(exc))

    # ------------------------------------------------------------------ helpers

    def _check_started(self, what: str) -> None:
        if not self._started:
            raise ValueError(f"call start() before {what}()")

    def _teacher(self, teacher_id: int) -> Any:
        if not 0 <= int(teacher_id) < len(self._teachers):
            raise ValueError(f"no teacher {teacher_id}: {len(self._teachers)} registered (ids 0..)")
        return self._teachers[int(teacher_id)]
