"""Watch a service's teachers and students with kazoo's recipes and hand out a consistent ``ServiceView``.

For each of the two folders (``<root>/<service>`` for teachers, ``.../students`` for students), a kazoo
``DataWatch`` follows the folder's existence and a kazoo ``ChildrenWatch`` its children; both re-arm by themselves
after a connection or session loss. A folder that is deleted and created again (new ``czxid``) gets a new
ChildrenWatch. The recipes only record names and wake a worker thread, so kazoo's event thread never waits on a
read; the worker reads the data of *new* children only (pipelined ``get`` requests), parses it as untrusted input
(``discovery.nodes``: a bad node is logged once and skipped) and calls ``on_view`` when the view changed.

ZooKeeper cost per student: 4 watches; per change of a folder's children, one ``getChildren`` (the re-armed watch)
plus one ``getData`` per new child. Sequential names are never reused within one incarnation of a folder, so the
cache is keyed by name and dropped when the folder's ``czxid`` changes. While ZooKeeper is unreachable nothing
is reported, so users keep the last known view.

Example::

    session = ZkSession("127.0.0.1:2181").start()
    watcher = ServiceWatcher(session, ServicePaths("/distill", "mnist_teacher"), on_view=print).start()
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from kazoo.exceptions import NoNodeError
from kazoo.recipe.watchers import ChildrenWatch, DataWatch
from kazoo.retry import ForceRetryError

from .arguments import STUDENT_PREFIX, TEACHER_PREFIX, ServicePaths, node_sequence
from .nodes import NodeDataError, StudentInfo, TeacherInfo, parse_student, parse_teacher
from .reconciler import Reconciler
from .session import ZK_ERRORS, ZkSession, retry_forever

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceView:
    """What ZooKeeper holds for a service at one moment: teachers and students in registration order."""

    teachers: tuple[TeacherInfo, ...]
    students: tuple[StudentInfo, ...]

    @property
    def endpoints(self) -> list[str]:
        """Unique teacher endpoints, oldest registration first."""
        seen: dict[str, None] = {}
        for teacher in self.teachers:
            seen.setdefault(teacher.endpoint, None)
        return list(seen)


class _Folder:
    """One watched folder: its children names (from ChildrenWatch) and the parsed data of each child."""

    def __init__(self, path: str, prefix: str, parse: Callable[[str, bytes], Any], kind: str):
        self.path, self.prefix, self.parse, self.kind = path, prefix, parse, kind
        self.known = False                 # the DataWatch has reported at least once
        self.czxid: Optional[int] = None   # the folder's incarnation (None: folder missing)
        self.watched: Optional[int] = None  # the incarnation a ChildrenWatch was started for
        self.names: list[str] = []
        self.cache: dict[str, Any] = {}    # name -> parsed info, or None for a node skipped for good
        self.reads = 0                     # getData requests so far (tests, docs: reads per change)


class ServiceWatcher:
    """Watch a service's teacher and student nodes; call ``on_view(ServiceView)`` whenever the view changes.

    ``on_view`` runs in the watcher's own thread; an exception in it, or an unexpected one while reading, is logged
    and the watch goes on.
    """

    def __init__(self, session: ZkSession, paths: ServicePaths, on_view: Callable[[ServiceView], None],
                 settle: float = 0.01):
        self.session = session
        self.paths = paths
        self.on_view = on_view
        self.settle = settle
        self.view: Optional[ServiceView] = None
        self.teachers = _Folder(paths.service_path, TEACHER_PREFIX, parse_teacher, "teacher")
        self.students = _Folder(paths.students_path, STUDENT_PREFIX, parse_student, "student")
        self._lock = threading.Lock()
        self._armed = False
        self._thread = Reconciler(f"zk-watch-{paths.service}", self._round, settle=settle)
        self._stopping = self._thread.stopping
        self._retry = retry_forever(self._stopping)
        session.subscribe(lambda state: self._thread.wake())

    def start(self) -> ServiceWatcher:
        self._thread.start(at_once=True)
        return self

    def stop(self) -> None:
        self._thread.stop(join=5)

    def refresh(self) -> None:
        """Recompute the view now (from what the watches last reported)."""
        self._thread.wake()

    # -- kazoo recipe callbacks (kazoo's event thread: record and wake, never block) -------------------------
    def _on_folder(self, folder: _Folder, data: Optional[bytes], stat: Any) -> Optional[bool]:
        if self._stopping.is_set():
            return False
        czxid = stat.czxid if stat is not None else None
        with self._lock:
            folder.known = True
            if czxid == folder.czxid:
                return None
            folder.czxid, folder.names, folder.cache = czxid, [], {}
        self._thread.wake()         # the round starts a ChildrenWatch for the new incarnation
        return None

    def _on_children(self, folder: _Folder, czxid: int, names: list[str]) -> Optional[bool]:
        if self._stopping.is_set() or folder.czxid != czxid:
            return False            # stopped, or an older incarnation of the folder: end this watch
        with self._lock:
            folder.names = list(names)
        self._thread.wake()
        return None

    # -- the reconciler's round (a burst of events settles into one read; a bug in it is retried) ---------------
    def _round(self) -> None:
        if not self.session.connected:
            return
        view = self._retry(self._attempt)
        if view is not None and view != self.view:
                self.view = view
                try:
                    self.on_view(view)
                except Exception:  # noqa: BLE001 - a failing callback must not stop the watch
                    logger.exception("service view callback failed")

    def _attempt(self) -> Optional[ServiceView]:
        try:
            if not self._armed:
                DataWatch(self.session.client, self.teachers.path, lambda d, s: self._on_folder(self.teachers, d, s))
                DataWatch(self.session.client, self.students.path, lambda d, s: self._on_folder(self.students, d, s))
                self._armed = True
            for folder in (self.teachers, self.students):
                self._watch_children(folder)
            if not (self.teachers.known and self.students.known):
                return None
            teachers = self._infos(self.teachers)
            students = self._infos(self.students)
        except ZK_ERRORS as exc:
            logger.warning("reading service %s failed (%s: %s); keeping the last known teachers, retrying",
                           self.paths.service_path, type(exc).__name__, exc)
            raise ForceRetryError(str(exc)) from exc
        return ServiceView(tuple(teachers), tuple(students))

    def _watch_children(self, folder: _Folder) -> None:
        """Start a ChildrenWatch when the folder exists in an incarnation no watch follows yet."""
        with self._lock:
            czxid = folder.czxid
        if czxid is not None and folder.watched != czxid:
            ChildrenWatch(self.session.client, folder.path,
                          func=lambda names: self._on_children(folder, czxid, names))
            folder.watched = czxid

    def _infos(self, folder: _Folder) -> list:
        """The parsed children of ``folder`` in registration order; reads the data of new children only."""
        with self._lock:
            czxid = folder.czxid
            names = sorted((n for n in folder.names if n.startswith(folder.prefix)),
                           key=lambda n: (node_sequence(n), n))
            new = [name for name in names if name not in folder.cache]
        requests = [(name, self.session.client.get_async(f"{folder.path}/{name}")) for name in new]
        folder.reads += len(requests)
        parsed = {name: self._parse(folder, name, request) for name, request in requests}
        with self._lock:
            if folder.czxid == czxid:
                folder.cache.update(parsed)
                listed = set(folder.names)   # forget nodes that are gone
                folder.cache = {name: info for name, info in folder.cache.items() if name in listed}
            cache = dict(folder.cache, **parsed)
        return [cache[name] for name in names if cache.get(name) is not None]

    def _parse(self, folder: _Folder, name: str, request: Any) -> Any:
        try:
            value, _ = request.get(timeout=self.session.request_timeout)
        except NoNodeError:
            return None               # gone between the listing and the read
        try:
            return folder.parse(name, value)
        except NodeDataError as exc:
            logger.warning("ignoring %s node %s/%s: %s", folder.kind, folder.path, name, exc)
            return None
