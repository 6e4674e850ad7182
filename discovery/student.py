"""A student's subscription to a teacher service: register the student and follow the teachers assigned to it.

``TeacherSubscription`` registers the student as an ephemeral node under ``<root>/<service>/students`` and calls
``on_change(endpoints)`` with this student's teachers every time they change, from a background thread. The
teachers come from the student's own assignment node, ``<service>/assignment/<student-node>``, which the elected
assigner keeps (``discovery.assigner``: an incremental fair share stored in ZooKeeper, few moves per change).
Every student contends for the assigner role, so there is one as long as there is a student. The student watches
only its assignment node (a kazoo ``DataWatch``, re-armed after a session loss) and reads the data of the teacher
nodes it names (the endpoint and the ``tls`` flag come from the teacher's own node, which only the teachers'
identity may write in a locked-down service; the assignment only names them). The first call comes once the
assignment was read, even when no teacher is registered (``[]``).

Fallback: when no assignment arrives within ``assignment_wait`` seconds after the student registered (no assigner
yet: the previous one was SIGKILLed and its session has not expired), or the student may not use the assignment
folder (a service locked down before that folder existed), the student watches teachers and students itself and
uses its share of the stateless ``discovery.share.fair_share`` (logged at WARNING) until an assignment arrives.

ZooKeeper unreachable or restarting: nothing is reported, so the last known teachers stay in use; the client
reconnects with backoff and logs it; the process never exits because of ZooKeeper. A link cut for longer than the
session timeout expires the student's node: the student keeps using its last teachers, registers again under a
new node name that names the old one (``previous``), and the assigner, which kept the old node's teachers for
``grace`` seconds, hands them to the new node (``discovery.assigner``): no ``on_change`` at all.

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

from kazoo.exceptions import NoNodeError
from kazoo.recipe.watchers import DataWatch

from .acls import ensure_service
from .arguments import (
    DEFAULT_ROOT,
    DEFAULT_SESSION_TIMEOUT,
    STUDENT_PREFIX,
    NoTeachersError,
    ServicePaths,
    default_student_id,
)
from .assigner import Assigner
from .ephemeral import EphemeralNode
from .nodes import NodeDataError, TeacherInfo, parse_assignment, parse_teacher
from .reconciler import Reconciler
from .session import ZK_ERRORS, ZkSession
from .share import fair_share
from .watcher import ServiceView, ServiceWatcher

logger = logging.getLogger(__name__)


class TeacherSubscription:
    """Follow the teachers of ``service`` and hand this student's fair share to ``on_change``.

    Args:
        zk_hosts: ``'host:port,host:port'`` or a list of them.
        service: the teachers' service name.
        on_change: called with the list of endpoints this student should use, whenever the set of them changes
            (the same teachers in another order is no change).
            Called from a background thread; keep it short and do not raise.
        require_max_teacher: the most teachers this student uses at once.
        root: the ZooKeeper folder of all services.
        auth: ``'user:password'`` digest identity (reading needs none; only for a locked-down ensemble).
        student_id: a readable id stored in the student's node (default ``host-pid-random``).
        session_timeout: ZooKeeper session timeout in seconds.
        tls: whether this student talks TLS to its teachers (None: use every teacher). A teacher whose node says
            otherwise (``"tls": true`` from a TLS teacher's registration) is left out of the share with a
            warning, never dialed the wrong way; the share is computed on all teachers, so students agree.
        assignment_wait: seconds after registering without an assignment before falling back to the local
            stateless fair share (see the module docstring); ValueError unless a positive number.
        grace: while this student is the assigner, seconds a student whose node vanished keeps its teachers
            (``discovery.assigner``; None: ``session_timeout``); every student of a service should use the same.

    Attributes:
        assigner: this student's ``discovery.assigner.Assigner`` (``assigner.leading`` while it is the assigner).
        fallback: an Event set while the student uses the stateless share; ``watcher`` is then its ServiceWatcher.
        teacher_reads: teacher nodes read so far (only those named by its assignments, each once).
    """

    def __init__(self, zk_hosts: Union[str, Sequence[str]], service: str,
                 on_change: Callable[[list[str]], None], require_max_teacher: int = 1, root: str = DEFAULT_ROOT,
                 auth: Optional[str] = None, student_id: Optional[str] = None,
                 session_timeout: float = DEFAULT_SESSION_TIMEOUT, tls: Optional[bool] = None,
                 assignment_wait: float = 5.0, grace: Optional[float] = None):
        """Check the arguments.

        Raises:
            ValueError: ``require_max_teacher`` is not an integer >= 1, ``assignment_wait`` not a positive number of
                seconds, or ``grace`` a negative one.
        """
        if isinstance(require_max_teacher, bool) or not isinstance(require_max_teacher, int) \
                or require_max_teacher < 1:
            raise ValueError(f"require_max_teacher must be an integer >= 1, not {require_max_teacher!r}")
        if isinstance(assignment_wait, bool) or not isinstance(assignment_wait, (int, float)) \
                or not assignment_wait > 0:
            raise ValueError(f"assignment_wait must be a positive number of seconds, not {assignment_wait!r}")
        self.paths = ServicePaths(root, service)
        self.on_change = on_change
        self.require_max_teacher = require_max_teacher
        self.tls = tls
        self._warned_tls: set[str] = set()
        self.student_id = student_id or default_student_id()
        self.session = ZkSession(zk_hosts, auth=auth, session_timeout=session_timeout)
        data = {"student_id": self.student_id, "host": socket.gethostname(), "pid": os.getpid(),
                "require_max_teacher": require_max_teacher}
        self.node = EphemeralNode(self.session, self.paths.students_path, STUDENT_PREFIX, data,
                                  ensure_parent=self._ensure_students_path, what=f"student {self.student_id}",
                                  auth_errors_fatal=False)
        self.node.on_created = self._on_registered
        self.assigner = Assigner(self.session, self.paths, identifier=self.student_id,
                                 grace=session_timeout if grace is None else grace)
        self.assignment_wait = assignment_wait
        self.watcher: Optional[ServiceWatcher] = None   # the fallback's, while it runs
        self.fallback = threading.Event()          # set while the student uses the stateless fair share
        self.teacher_reads = 0                     # teacher nodes read (tests, docs: reads per change)
        self._teacher_cache: dict[str, Optional[TeacherInfo]] = {}
        self._lock = threading.Lock()
        self._endpoints: Optional[list[str]] = None
        self._view: Optional[ServiceView] = None
        self._assigned: Optional[list[TeacherInfo]] = None
        self._changed = threading.Condition(self._lock)
        self._started = False
        self._data: Optional[tuple[str, Optional[bytes]]] = None   # (student node, assignment data) last reported
        self._followed: dict = {"watched": None, "registered_at": 0.0}   # the node whose assignment is watched
        self._follower = Reconciler(f"zk-assignment-{service}", self._follow_round, interval=0.5)
        self._stopping = self._follower.stopping

    # -- public API ------------------------------------------------------------------------------------
    def start(self) -> TeacherSubscription:
        """Connect (in the background), register the student and start watching; returns at once."""
        if not self._started:
            self._started = True
            self.session.start()
            self.node.start()
            self.node.set_wanted(True)
            self.assigner.start()
            self._follower.start()
        return self

    def stop(self) -> None:
        """Unregister the student and close the session. ``on_change`` is not called afterwards."""
        if not self._started:
            return
        self._started = False
        self._follower.stop()
        self.assigner.stop()
        self._follower.join(5)
        self._stop_fallback()
        self.node.stop(remove=True)
        self.session.close()
        self.assigner.join(5)

    @property
    def endpoints(self) -> list[str]:
        """This student's current share (last known while ZooKeeper is away; [] before the first read)."""
        with self._lock:
            return list(self._endpoints or [])

    @property
    def teachers(self) -> list[TeacherInfo]:
        """The teachers assigned to this student as last read (node name, endpoint, JSON meta); in fallback,
        every registered teacher of the service."""
        with self._lock:
            if self._assigned is not None and not self.fallback.is_set():
                return list(self._assigned)
            return list(self._view.teachers) if self._view else []

    @property
    def connected(self) -> bool:
        return self.session.connected

    def wait_for_teachers(self, timeout: float) -> list[str]:
        """Block until this student's share is not empty; returns it. NoTeachersError after ``timeout``.

        Raises:
            NoTeachersError: no teacher was assigned to this student within ``timeout`` seconds (names the service,
                ZooKeeper and the connection state).
        """
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

    def _on_registered(self, path: str) -> None:
        """The node thread created our node: the next registration (after a session expiry) names this one, so
        that the assigner hands it the teachers it kept for this one (the grace)."""
        self.node.data = dict(self.node.data, previous=path.rsplit("/", 1)[-1])
        self._follower.wake()

    def _usable(self, share: list[str], teachers: Sequence[TeacherInfo]) -> list[str]:
        """The share less the teachers this student cannot talk to (TLS on one side only)."""
        if self.tls is None:
            return share
        wants_tls = {t.endpoint: bool(t.meta.get("tls", False)) for t in teachers}
        usable = [e for e in share if wants_tls.get(e, False) == self.tls]
        for endpoint in set(share) - set(usable) - self._warned_tls:
            self._warned_tls.add(endpoint)
            logger.warning("teacher %s %s TLS but this student %s: left out (give the reader %s)", endpoint,
                           "serves" if wants_tls.get(endpoint) else "does not serve",
                           "does" if self.tls else "does not",
                           "tls_ca=" if not self.tls else "no tls_ca, or serve the teacher with --tls_cert")
        return usable

    # -- following the assignment (the follower thread) ----------------------------------------------------------
    def _follow_round(self) -> None:
        """The follower's round (when woken, or every 0.5 s): watch the current node's assignment, use a new
        assignment, or fall back when overdue. ZooKeeper trouble or a bug: the reconciler logs it and retries
        with backoff; the last teachers stay in use meanwhile."""
        state = self._followed
        path = self.node.path
        me = path.rsplit("/", 1)[-1] if path else None
        if me is not None and me != state["watched"]:        # (re-)registered: follow the new node's assignment
            DataWatch(self.session.client, self.paths.assignment_of(me),
                      lambda data, stat, name=me: self._on_assignment(name, data))
            state["watched"], state["registered_at"] = me, time.monotonic()
        watched, registered_at = state["watched"], state["registered_at"]
        with self._lock:
            data = self._data
        if data is not None and data[0] == watched and data[1] is not None:
            self._use_assignment(watched, data[1])
        elif (not self.fallback.is_set() and self._endpoints is None and watched is not None
              and (self.assigner.unavailable.is_set() or time.monotonic() - registered_at > self.assignment_wait)):
            self._start_fallback()

    def _on_assignment(self, name: str, data: Optional[bytes]) -> Optional[bool]:
        """kazoo's DataWatch callback (its event thread): record and wake the follower, never block."""
        if self._stopping.is_set() or (self.node.path and not self.node.path.endswith("/" + name)):
            return False                              # stopped, or an older registration: end this watch
        with self._lock:
            self._data = (name, data)
        self._follower.wake()
        return None

    def _use_assignment(self, me: str, data: bytes) -> None:
        """Read the teacher nodes the assignment names and report them (once per new assignment)."""
        try:
            assignment = parse_assignment(me, data)
        except NodeDataError as exc:
            logger.warning("ignoring assignment node %s: %s", self.paths.assignment_of(me), exc)
            with self._lock:
                self._data = (me, None)
            return
        try:
            teachers = self._read_teachers(assignment.teachers, assignment.endpoints)
        except ZK_ERRORS as exc:
            logger.warning("reading the teachers of %s failed (%s: %s); retrying", self.paths.assignment_of(me),
                           type(exc).__name__, exc)
            self._follower.wait(0.5)
            self._follower.wake()
            return
        with self._lock:
            if self._data is not None and self._data[1] == data:
                self._data = (me, None)                   # done with this version
        if self.fallback.is_set():
            logger.info("service %s: an assignment arrived; leaving the stateless fallback", self.paths.service)
            self._stop_fallback()
        share = self._usable([t.endpoint for t in teachers], teachers)
        self._report(share, teachers=teachers, view=None)

    def _read_teachers(self, nodes: Sequence[str], endpoints: Sequence[str]) -> list[TeacherInfo]:
        """The teacher nodes named by the assignment; reads (pipelined) only those not read before with the same
        endpoint. Gone or mismatching ones are left out (the assigner replaces them soon)."""
        cache = self._teacher_cache
        stale = [node for node, endpoint in zip(nodes, endpoints)      # new, gone or another teacher since:
                 if cache.get(node) is None or cache[node].endpoint != endpoint]   # (a re-created service folder)
        requests = [(node, self.session.client.get_async(f"{self.paths.service_path}/{node}"))
                    for node in dict.fromkeys(stale)]
        self.teacher_reads += len(requests)
        for node, request in requests:
            try:
                value, _ = request.get(timeout=self.session.request_timeout)
                cache[node] = parse_teacher(node, value)
            except NoNodeError:
                cache[node] = None                        # gone since the assignment was written
            except NodeDataError as exc:
                logger.warning("ignoring teacher node %s/%s: %s", self.paths.service_path, node, exc)
                cache[node] = None
        self._teacher_cache = {node: cache[node] for node in nodes}   # forget the teachers no longer assigned
        teachers = []
        for node, endpoint in zip(nodes, endpoints):
            teacher = cache[node]
            if teacher is not None and teacher.endpoint != endpoint:
                logger.warning("the assignment names teacher node %s as %s but it serves %s: left out", node,
                               endpoint, teacher.endpoint)
            elif teacher is not None:
                teachers.append(teacher)
        return teachers

    # -- fallback: the stateless share of every student -------------------------------------------------------
    def _start_fallback(self) -> None:
        reason = ("this student may not use the assignment folder" if self.assigner.unavailable.is_set()
                  else f"no assignment within {self.assignment_wait:g}s (no assigner yet)")
        logger.warning("service %s: %s; using the stateless fair share until an assignment arrives",
                       self.paths.service, reason)
        self.fallback.set()
        self.watcher = ServiceWatcher(self.session, self.paths, self._on_view).start()

    def _stop_fallback(self) -> None:
        self.fallback.clear()
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()

    def _on_view(self, view: ServiceView) -> None:
        if not self.fallback.is_set():
            return
        endpoints = view.endpoints
        me = self.node.path.rsplit("/", 1)[-1] if self.node.path else None
        students = [s.node for s in view.students]
        wanted = {s.node: s.require_max_teacher for s in view.students}
        if me is None or me not in wanted:
            me = me or f"{STUDENT_PREFIX}~{self.student_id}"   # not registered (yet): count ourselves last
            students.append(me)
        wanted[me] = self.require_max_teacher
        share = self._usable(fair_share(students, endpoints, wanted)[me], view.teachers)
        self._report(share, teachers=None, view=view)

    def _report(self, share: list[str], teachers: Optional[list[TeacherInfo]], view: Optional[ServiceView]) -> None:
        with self._changed:
            if view is not None:
                self._view = view
            if teachers is not None:
                self._assigned = teachers
            if self._endpoints is not None and sorted(share) == sorted(self._endpoints):
                return             # the same teachers in another order (e.g. after a new session): no change
            previous, self._endpoints = self._endpoints, share
            self._changed.notify_all()
        logger.info("service %s: this student uses %s (was %s)%s", self.paths.service, share, previous,
                    " (stateless fallback)" if self.fallback.is_set() else "")
        try:
            self.on_change(list(share))
        except Exception:  # noqa: BLE001 - the subscriber's bug must not stop discovery
            logger.exception("on_change callback failed for teachers %s", share)
