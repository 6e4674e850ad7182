"""A student's subscription to a teacher service: register the student, watch, and compute its fair share.

``TeacherSubscription`` registers the student as an ephemeral node under ``<root>/<service>/students``, watches the
teachers and the other students, and calls ``on_change(endpoints)`` with this student's share (see
``discovery.share.fair_share``) every time it changes, from a background thread. The first call comes once
ZooKeeper has been read, even when no teacher is registered (``[]``).

ZooKeeper unreachable or restarting: nothing is reported, so the last known teachers stay in use; the client
reconnects with backoff and logs it; the process never exits because of ZooKeeper.

Example::

    def use(endpoints):
        print("teachers now", endpoints)

    subscription = TeacherSubscription("127.0.0.1:2181", "mnist_teacher", use, require_max_teacher=2).start()
    subscription.wait_for_teachers(timeout=30)
    ...
    subscription.stop()
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Optional, Sequence, Union

from .acls import ensure_service
from .arguments import (
    DEFAULT_ROOT,
    DEFAULT_SESSION_TIMEOUT,
    STUDENT_PREFIX,
    NoTeachersError,
    ServicePaths,
    default_student_id,
)
from .ephemeral import EphemeralNode
from .nodes import TeacherInfo
from .session import ZkSession
from .share import fair_share
from .watcher import ServiceView, ServiceWatcher

logger = logging.getLogger(__name__)


class TeacherSubscription:
    """Follow the teachers of ``service`` and hand this student's fair share to ``on_change``.

    Args:
        zk_hosts: ``'host:port,host:port'`` or a list of them.
        service: the teachers' service name.
        on_change: called with the list of endpoints this student should use, whenever that list changes.
            Called from a background thread; keep it short and do not raise.
        require_max_teacher: the most teachers this student uses at once.
        root: the ZooKeeper folder of all services.
        auth: ``'user:password'`` digest identity (reading needs none; only for a locked-down ensemble).
        student_id: a readable id stored in the student's node (default ``host-pid-random``).
        session_timeout: ZooKeeper session timeout in seconds.
    """

    def __init__(self, zk_hosts: Union[str, Sequence[str]], service: str,
                 on_change: Callable[[list[str]], None], require_max_teacher: int = 1, root: str = DEFAULT_ROOT,
                 auth: Optional[str] = None, student_id: Optional[str] = None,
                 session_timeout: float = DEFAULT_SESSION_TIMEOUT):
        if isinstance(require_max_teacher, bool) or not isinstance(require_max_teacher, int) \
                or require_max_teacher < 1:
            raise ValueError(f"require_max_teacher must be an integer >= 1, not {require_max_teacher!r}")
        self.paths = ServicePaths(root, service)
        self.on_change = on_change
        self.require_max_teacher = require_max_teacher
        self.student_id = student_id or default_student_id()
        self.session = ZkSession(zk_hosts, auth=auth, session_timeout=session_timeout)
        data = {"student_id": self.student_id, "host": socket.gethostname(), "pid": os.getpid(),
                "require_max_teacher": require_max_teacher}
        self.node = EphemeralNode(self.session, self.paths.students_path, STUDENT_PREFIX, data,
                                  ensure_parent=self._ensure_students_path, what=f"student {self.student_id}",
                                  auth_errors_fatal=False)
        self.node.on_created = lambda path: self.watcher.refresh()
        self.watcher = ServiceWatcher(self.session, self.paths, self._on_view)
        self._lock = threading.Lock()
        self._endpoints: Optional[list[str]] = None
        self._view: Optional[ServiceView] = None
        self._changed = threading.Condition(self._lock)
        self._started = False

    # -- public API ------------------------------------------------------------------------------------
    def start(self) -> TeacherSubscription:
        """Connect (in the background), register the student and start watching; returns at once."""
        if not self._started:
            self._started = True
            self.session.start()
            self.node.start()
            self.node.set_wanted(True)
            self.watcher.start()
        return self

    def stop(self) -> None:
        """Unregister the student and close the session. ``on_change`` is not called afterwards."""
        if not self._started:
            return
        self._started = False
        self.watcher.stop()
        self.node.stop(remove=True)
        self.session.close()

    @property
    def endpoints(self) -> list[str]:
        """This student's current share (last known while ZooKeeper is away; [] before the first read)."""
        with self._lock:
            return list(self._endpoints or [])

    @property
    def teachers(self) -> list[TeacherInfo]:
        """Every registered teacher of the service, as last read (node name, endpoint, JSON meta)."""
        with self._lock:
            return list(self._view.teachers) if self._view else []

    @property
    def connected(self) -> bool:
        return self.session.connected

    def wait_for_teachers(self, timeout: float) -> list[str]:
        """Block until this student's share is not empty; returns it. NoTeachersError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._endpoints:
                left = deadline - time.monotonic()
                if left <= 0:
                    state = "connected" if self.session.connected else "NOT connected"
                    raise NoTeachersError(f"no teacher registered for service {self.paths.service!r} under "
                                          f"{self.paths.service_path} on ZooKeeper {self.session.hosts} "
                                          f"({state}) within {timeout}s")
                self._changed.wait(min(left, 0.5))
            return list(self._endpoints)

    def __enter__(self) -> TeacherSubscription:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------------
    def _ensure_students_path(self) -> None:
        # Only needed before any teacher registered: without auth we create the open service folders ourselves.
        if not self.session.retry("exists", self.paths.students_path):
            ensure_service(self.session, self.paths, auth=None)

    def _on_view(self, view: ServiceView) -> None:
        endpoints = view.endpoints
        me = self.node.path.rsplit("/", 1)[-1] if self.node.path else None
        students = [s.node for s in view.students]
        wanted = {s.node: s.require_max_teacher for s in view.students}
        if me is None or me not in wanted:
            me = me or f"{STUDENT_PREFIX}~{self.student_id}"   # not registered (yet): count ourselves last
            students.append(me)
        wanted[me] = self.require_max_teacher
        share = fair_share(students, endpoints, wanted)[me]
        with self._changed:
            self._view = view
            if share == self._endpoints:
                return
            previous, self._endpoints = self._endpoints, share
            self._changed.notify_all()
        logger.info("service %s: %d teacher(s), %d student(s); this student uses %s (was %s)",
                    self.paths.service, len(endpoints), len(students), share, previous)
        try:
            self.on_change(list(share))
        except Exception:  # noqa: BLE001 - the subscriber's bug must not stop discovery
            logger.exception("on_change callback failed for teachers %s", share)
