"""ZooKeeper registry (kazoo): teacher and student nodes of a service, kept alive and watched across session loss.

Layout (root default ``/distill``)::

    <root>/<service>                      persistent; ACL: everyone reads, only the teachers' identity writes
    <root>/<service>/teacher-0000000007   ephemeral sequential, JSON {"endpoint": "host:port", "model": ..., ...}
    <root>/<service>/students             persistent; everyone may create and delete children
    <root>/<service>/students/student-0000000003   ephemeral sequential, JSON {"student_id": ..., ...}

Three pieces, each with one job:
- ``ZkSession``: one kazoo client that connects in the background, reconnects forever with exponential backoff
  and jitter, logs every state change, and tells its subscribers when it is connected again.
- ``EphemeralNode``: keeps one ephemeral sequential node present while it is wanted: creates it, re-creates it
  after a session loss (the server deleted it), deletes it when no longer wanted. A reconciling thread does the
  work, so kazoo's callbacks never block.
- ``ServiceWatcher``: reads the teacher and student nodes of a service whenever a watch fires or the session
  comes back, and hands a consistent ``ServiceView`` to a callback when it changed. While ZooKeeper is
  unreachable it reports nothing, so users keep the last known view.

Example::

    session = ZkSession("127.0.0.1:2181").start()
    watcher = ServiceWatcher(session, ServicePaths("/distill", "mnist_teacher"), on_view=print).start()
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from kazoo.client import KazooClient
from kazoo.exceptions import (
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    ZookeeperError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState
from kazoo.retry import KazooRetry
from kazoo.security import OPEN_ACL_UNSAFE, make_acl, make_digest_acl

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/distill"
# Why 6 s: a dead machine's teachers leave every student's list within 6-8 s, while a process stalled for up to
# 4 s (GC, a busy 2-core box, a ZooKeeper restart) keeps its session: kazoo drops the connection after 2/3 of the
# timeout without an answer and reconnects within the rest. A teacher whose server dies while its registrar lives
# is removed by the health check in about a second, independent of this. See docs/architecture.md "Discovery".
DEFAULT_SESSION_TIMEOUT = 6.0
AUTH_ENV = "DISTILL_ZK_AUTH"
TEACHER_PREFIX = "teacher-"
STUDENTS_NODE = "students"
STUDENT_PREFIX = "student-"
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_ENDPOINT = re.compile(r"^[^\s/:]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$")
_ZK_ERRORS = (KazooException, ZookeeperError, OSError, KazooTimeoutError)


class DiscoveryError(RuntimeError):
    """A discovery operation failed for a reason worth telling the user."""


class RegistryAuthError(DiscoveryError):
    """ZooKeeper refused a write: the identity in --zk_auth / DISTILL_ZK_AUTH may not create or delete there."""


class NoTeachersError(DiscoveryError):
    """No teacher was registered for a service within the allowed time."""


# -- arguments --------------------------------------------------------------------------------------------
def normalize_hosts(zk_hosts: Union[str, Sequence[str]]) -> str:
    """``'h1:2181,h2:2181'`` from a string or a list of ``host:port``; ValueError when empty."""
    hosts = zk_hosts.split(",") if isinstance(zk_hosts, str) else list(zk_hosts)
    hosts = [h.strip() for h in hosts if h and h.strip()]
    if not hosts:
        raise ValueError(f"no ZooKeeper hosts given ({zk_hosts!r}); expected 'host:port[,host:port...]'")
    return ",".join(hosts)


def validate_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if it looks like ``host:port``; ValueError naming it otherwise."""
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint.strip()):
        raise ValueError(f"teacher endpoint {endpoint!r} is not 'host:port'")
    if endpoint.strip().rsplit(":", 1)[0] in ("0.0.0.0", "[::]"):
        raise ValueError(f"teacher endpoint {endpoint!r}: students cannot dial a wildcard address; give the "
                         "teacher's host name or IP")
    return endpoint.strip()


def parse_auth(auth: Optional[str]) -> Optional[tuple[str, str]]:
    """``'user:password'`` -> ``('user', 'password')``; None stays None; ValueError on any other form."""
    if auth is None or auth == "":
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("ZooKeeper auth must be 'user:password' (from --zk_auth or the "
                         f"{AUTH_ENV} environment variable)")
    return user, password


def resolve_auth(value: Optional[str]) -> Optional[str]:
    """The auth string to use: ``value`` when given, else the ``DISTILL_ZK_AUTH`` environment variable."""
    return value if value else (os.environ.get(AUTH_ENV) or None)


@dataclass(frozen=True)
class ServicePaths:
    """Where a service lives in ZooKeeper."""

    root: str
    service: str

    def __post_init__(self) -> None:
        if not self.root.startswith("/") or self.root.endswith("/") and self.root != "/":
            raise ValueError(f"ZooKeeper root must be an absolute path like '/distill', not {self.root!r}")
        if not _SERVICE_NAME.match(self.service):
            raise ValueError(f"service name {self.service!r} may only hold letters, digits, '_', '-' and '.'")

    @property
    def service_path(self) -> str:
        return f"{self.root.rstrip('/')}/{self.service}"

    @property
    def students_path(self) -> str:
        return f"{self.service_path}/{STUDENTS_NODE}"


def node_sequence(name: str) -> int:
    """The sequence number ZooKeeper appended to a sequential node's name (-1 when there is none)."""
    digits = name[-10:]
    return int(digits) if digits.isdigit() else -1


class Backoff:
    """Exponential backoff with jitter: ``delay, delay*factor, ...`` capped at ``max_delay``, each +-``jitter``."""

    def __init__(self, delay: float = 0.1, factor: float = 2.0, max_delay: float = 5.0, jitter: float = 0.4):
        self.initial, self.factor, self.max_delay, self.jitter = delay, factor, max_delay, jitter
        self._next = delay

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * self.factor, self.max_delay)
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self._next = self.initial


# -- session ---------------------------------------------------------------------------------------------
class ZkSession:
    """One kazoo client that keeps (re)connecting in the background and never gives up.

    ``start()`` returns at once; ``wait_connected(timeout)`` blocks. Subscribers (``subscribe(fn)``) are called
    with the new ``KazooState`` from kazoo's event thread and must not block.

    Example::

        session = ZkSession("127.0.0.1:2181", auth="teacher:secret").start()
        session.wait_connected(10)
    """

    def __init__(self, zk_hosts: Union[str, Sequence[str]], auth: Optional[str] = None,
                 session_timeout: float = DEFAULT_SESSION_TIMEOUT, command_deadline: float = 10.0,
                 max_reconnect_delay: float = 3.0):
        self.hosts = normalize_hosts(zk_hosts)
        credentials = parse_auth(auth)
        self.auth_user = credentials[0] if credentials else None
        self.session_timeout = session_timeout
        self.request_timeout = max(2.0, session_timeout)
        connection_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.4,
                                      max_delay=max_reconnect_delay)
        command_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.4, max_delay=2.0,
                                   deadline=command_deadline)
        auth_data = [("digest", f"{credentials[0]}:{credentials[1]}")] if credentials else None
        self.client = KazooClient(hosts=self.hosts, timeout=session_timeout, connection_retry=connection_retry,
                                  command_retry=command_retry, auth_data=auth_data,
                                  logger=logging.getLogger("discovery.kazoo"))
        self.client.add_listener(self._on_state)
        self._subscribers: list[Callable[[str], None]] = []
        self._connected = threading.Event()
        self._started = False
        self._last_session: Optional[int] = None

    def start(self) -> ZkSession:
        if not self._started:
            self._started = True
            logger.info("connecting to ZooKeeper %s (session timeout %.1fs)", self.hosts, self.session_timeout)
            self.client.start_async()
        return self

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self.client.connected

    @property
    def session_id(self) -> Optional[int]:
        client_id = self.client.client_id
        return client_id[0] if client_id else None

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self._subscribers.append(callback)

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<operation>(...)`` that waits at most ``request_timeout`` for the answer.

        kazoo's blocking calls wait forever for a request that a session expiry dropped from its queue; the
        ``_async`` form with a timeout does not. Raises what kazoo raises, or KazooTimeoutError.
        """
        return getattr(self.client, f"{operation}_async")(*args, **kwargs).get(timeout=self.request_timeout)

    def retry(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """``call`` retried with backoff, jitter and the command deadline (connection loss, session expiry)."""
        return self.client.retry(self.call, operation, *args, **kwargs)

    def close(self) -> None:
        """Close the session (its ephemeral nodes vanish at once) and stop reconnecting."""
        if not self._started:
            return
        self._started = False
        try:
            self.client.stop()
        except _ZK_ERRORS as exc:  # already disconnected: nothing to close
            logger.debug("closing ZooKeeper session: %s", exc)
        self.client.close()

    def _on_state(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            session = self.session_id
            if self._last_session is not None and session != self._last_session:
                logger.warning("ZooKeeper %s: new session 0x%x (the previous one expired)", self.hosts, session or 0)
            elif self._last_session is not None:
                logger.info("ZooKeeper %s: reconnected, session kept", self.hosts)
            else:
                logger.info("ZooKeeper %s: connected, session 0x%x", self.hosts, session or 0)
            self._last_session = session
            self._connected.set()
        else:
            self._connected.clear()
            if self._started:
                if state == KazooState.SUSPENDED:
                    logger.warning("ZooKeeper %s unreachable; keeping the last known state and reconnecting "
                                   "with backoff", self.hosts)
                else:
                    logger.warning("ZooKeeper %s: session lost; reconnecting with a new session", self.hosts)
        for callback in list(self._subscribers):
            try:
                callback(state)
            except Exception:  # noqa: BLE001 - one bad subscriber must not break the others
                logger.exception("ZooKeeper state subscriber failed")


# -- service nodes and ACLs -------------------------------------------------------------------------------
def service_acls(auth: Optional[str]) -> tuple[list, list]:
    """ACLs of (service node, students node): with auth, only that identity writes; everyone reads."""
    credentials = parse_auth(auth)
    if credentials is None:
        return list(OPEN_ACL_UNSAFE), list(OPEN_ACL_UNSAFE)
    owner = make_digest_acl(credentials[0], credentials[1], all=True)
    readers = make_acl("world", "anyone", read=True)
    students = make_acl("world", "anyone", read=True, create=True, delete=True)
    return [owner, readers], [owner, students]


def teacher_node_acl(auth: Optional[str]) -> list:
    return service_acls(auth)[0]


def ensure_service(session: ZkSession, paths: ServicePaths, auth: Optional[str]) -> None:
    """Create the root, service and students nodes if missing; with auth, claim them with the service ACLs.

    Raises RegistryAuthError when ZooKeeper refuses (another identity owns the service).
    """
    service_acl, students_acl = service_acls(auth)
    try:
        if not session.retry("exists", paths.root) and paths.root != "/":
            _create_quietly(session, paths.root, list(OPEN_ACL_UNSAFE), makepath=True)
        _create_quietly(session, paths.service_path, service_acl)
        _create_quietly(session, paths.students_path, students_acl)
        if auth:
            for path, wanted in ((paths.service_path, service_acl), (paths.students_path, students_acl)):
                current, _ = session.retry("get_acls", path)
                if _acl_set(current) != _acl_set(wanted):
                    session.retry("set_acls", path, wanted)
                    logger.info("set ACLs of %s: %s may write, everyone may read", path, session.auth_user)
    except NoAuthError as exc:
        raise RegistryAuthError(f"ZooKeeper refused to set up {paths.service_path}: not authorized as "
                                f"{session.auth_user or 'an anonymous client'} (another identity owns the "
                                f"service; check --zk_auth or {AUTH_ENV})") from exc


def _create_quietly(session: ZkSession, path: str, acl: list, makepath: bool = False) -> None:
    try:
        session.retry("create", path, b"", acl=acl, makepath=makepath)
    except NodeExistsError:
        pass


def _acl_set(acls: Sequence) -> set:
    return {(acl.perms, acl.id.scheme, acl.id.id) for acl in acls}


# -- one ephemeral node kept alive ---------------------------------------------------------------------------
class EphemeralNode:
    """Keep one ephemeral sequential node ``<parent>/<prefix>NNNNNNNNNN`` present while ``wanted``.

    Re-created after a session loss, removed when unwanted or on ``stop()``. Failures are retried with backoff
    and jitter; an authorization failure is final (``error`` holds a RegistryAuthError, ``failed`` is set) unless
    ``auth_errors_fatal`` is False (students: the teachers' identity may not have created the students folder yet).

    Example::

        node = EphemeralNode(session, "/distill/mnist", "teacher-", {"endpoint": "127.0.0.1:9292"}).start()
        node.set_wanted(True); node.created.wait(5)
    """

    def __init__(self, session: ZkSession, parent: str, prefix: str, data: dict,
                 acl: Optional[list] = None, ensure_parent: Optional[Callable[[], None]] = None,
                 check_interval: float = 2.0, what: str = "node", auth_errors_fatal: bool = True):
        self.session = session
        self.parent = parent
        self.prefix = prefix
        self.registration_id = uuid.uuid4().hex
        self.data = dict(data, registration_id=self.registration_id)
        self.acl = acl
        self.ensure_parent = ensure_parent
        self.check_interval = check_interval
        self.what = what
        self.auth_errors_fatal = auth_errors_fatal
        self.path: Optional[str] = None
        self.error: Optional[Exception] = None
        self.created = threading.Event()
        self.failed = threading.Event()
        self.on_created: Optional[Callable[[str], None]] = None
        self._wanted = False
        self._uncertain = False
        self._parent_ready = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"zk-{prefix.rstrip('-')}", daemon=True)
        session.subscribe(self._on_state)

    def start(self) -> EphemeralNode:
        self._thread.start()
        return self

    @property
    def wanted(self) -> bool:
        return self._wanted

    def set_wanted(self, wanted: bool) -> None:
        self._wanted = wanted
        self._wake.set()

    def stop(self, remove: bool = True, timeout: float = 3.0) -> None:
        """Stop reconciling; with ``remove`` delete the node (bounded by ``timeout`` if ZooKeeper is away)."""
        self._wanted = False
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout + 2)
        if remove:
            with self._lock:
                self._delete(timeout, final=True)

    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST:
            self.created.clear()
        self._wake.set()

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            self._wake.wait(self.check_interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                with self._lock:
                    self._reconcile()
                backoff.reset()
            except (NoAuthError, RegistryAuthError) as exc:
                if not self.auth_errors_fatal:
                    delay = backoff.next()
                    logger.warning("%s under %s: not allowed yet (%s); retrying in %.1fs", self.what, self.parent,
                                   exc, delay)
                    self._parent_ready = False
                    self._stopping.wait(delay)
                    self._wake.set()
                    continue
                self.error = exc if isinstance(exc, RegistryAuthError) else RegistryAuthError(
                    f"ZooKeeper refused to create the {self.what} under {self.parent}: not authorized as "
                    f"{self.session.auth_user or 'an anonymous client'}; only the service's identity may write "
                    f"there (check --zk_auth or {AUTH_ENV})")
                logger.error("%s", self.error)
                self.failed.set()
                return
            except _ZK_ERRORS as exc:
                delay = backoff.next()
                logger.warning("%s under %s: %s: %s; retrying in %.1fs", self.what, self.parent,
                               type(exc).__name__, exc, delay)
                self._stopping.wait(delay)
                self._wake.set()

    def _reconcile(self) -> None:
        if not self.session.connected:
            return
        if not self._wanted:
            if self.path is not None:
                self._delete(None)
            return
        if self.path is not None:
            stat = self.session.call("exists", self.path)
            if stat is not None and stat.ephemeralOwner == self.session.session_id:
                self.created.set()
                return
            logger.warning("%s %s is gone (session expired or deleted); re-creating it", self.what, self.path)
            self.path = None
            self.created.clear()
        if self._uncertain and self._adopt():
            return
        if not self._parent_ready and self.ensure_parent is not None:
            self.ensure_parent()
            self._parent_ready = True
        value = json.dumps(dict(self.data, registered_at=time.time())).encode()
        self._uncertain = True   # a lost answer may still have created the node: look for it next time
        try:
            path = self.session.call("create", f"{self.parent}/{self.prefix}", value, acl=self.acl, ephemeral=True,
                                     sequence=True)
        except NoNodeError:
            self._parent_ready = False
            if self.ensure_parent is None:
                raise
            self._wake.set()
            return
        self._uncertain = False
        self._created(path)

    def _adopt(self) -> bool:
        """After a create whose answer was lost: find our node by registration id and session."""
        try:
            children = self.session.call("get_children", self.parent)
        except NoNodeError:
            return False
        for name in children:
            if not name.startswith(self.prefix):
                continue
            try:
                value, stat = self.session.call("get", f"{self.parent}/{name}")
            except NoNodeError:
                continue
            if stat.ephemeralOwner == self.session.session_id and self.registration_id.encode() in value:
                self._uncertain = False
                self._created(f"{self.parent}/{name}")
                return True
        self._uncertain = False
        return False

    def _created(self, path: str) -> None:
        self.path = path
        self.created.set()
        logger.info("registered %s %s", self.what, path)
        if self.on_created is not None:
            self.on_created(path)

    def _delete(self, timeout: Optional[float], final: bool = False) -> None:
        """Delete our node. Not ``final`` (unwanted while running): errors propagate and the loop retries.
        ``final`` (stop): errors are logged; closing the session removes the node anyway."""
        path = self.path
        if path is None:
            return
        self.created.clear()
        wait = timeout or self.session.request_timeout
        try:
            stat = self.session.client.exists_async(path).get(timeout=wait)
            if stat is not None and stat.ephemeralOwner == self.session.session_id:   # not a namesake after a wipe
                self.session.client.delete_async(path).get(timeout=wait)
                logger.info("removed %s %s", self.what, path)
        except NoNodeError:
            pass
        except NotEmptyError:
            logger.warning("%s %s has children; not removed", self.what, path)
        except Exception as exc:  # noqa: BLE001 - ZooKeeper away: the session's end removes the node anyway
            if not final:
                raise
            logger.warning("could not remove %s %s now (%s); it vanishes when the session ends", self.what, path,
                           type(exc).__name__)
        self.path = None


# -- watching a service ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherInfo:
    """One registered teacher: its node name (``teacher-0000000007``), endpoint and the rest of its JSON."""

    node: str
    endpoint: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def sequence(self) -> int:
        return node_sequence(self.node)


@dataclass(frozen=True)
class StudentInfo:
    """One registered student: node name, its id and how many teachers it wants."""

    node: str
    student_id: str
    require_max_teacher: int = 1

    @property
    def sequence(self) -> int:
        return node_sequence(self.node)


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


class ServiceWatcher:
    """Watch a service's teacher and student nodes; call ``on_view(ServiceView)`` whenever the view changes.

    Watches are re-armed on every read and re-read whenever the session comes back (same or new session), so
    they survive session loss. A poll every ``poll_interval`` seconds is the safety net. While disconnected,
    nothing is reported: users keep their last known view.
    """

    def __init__(self, session: ZkSession, paths: ServicePaths, on_view: Callable[[ServiceView], None],
                 poll_interval: float = 10.0, settle: float = 0.01):
        self.session = session
        self.paths = paths
        self.on_view = on_view
        self.poll_interval = poll_interval
        self.settle = settle
        self.view: Optional[ServiceView] = None
        self._teacher_cache: dict[str, Optional[TeacherInfo]] = {}
        self._student_cache: dict[str, StudentInfo] = {}
        self._cache_session: Optional[int] = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"zk-watch-{paths.service}", daemon=True)
        session.subscribe(lambda state: self._wake.set())

    def start(self) -> ServiceWatcher:
        self._wake.set()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def refresh(self) -> None:
        """Ask for a re-read now."""
        self._wake.set()

    def _on_event(self, event: Any) -> None:
        self._wake.set()

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            self._wake.wait(self.poll_interval)
            if self._stopping.is_set():
                return
            time.sleep(self.settle)   # let a burst of events settle into one read
            self._wake.clear()
            if not self.session.connected:
                continue
            try:
                view = self._read()
                backoff.reset()
            except _ZK_ERRORS as exc:
                delay = backoff.next()
                logger.warning("reading service %s failed (%s: %s); keeping the last known teachers, retrying in "
                               "%.1fs", self.paths.service_path, type(exc).__name__, exc, delay)
                self._stopping.wait(delay)
                self._wake.set()
                continue
            if view != self.view:
                self.view = view
                try:
                    self.on_view(view)
                except Exception:  # noqa: BLE001 - a failing callback must not stop the watch
                    logger.exception("service view callback failed")

    def _read(self) -> ServiceView:
        call = self.session.call
        if self.session.session_id != self._cache_session:     # a new session: node names may have been reused
            self._teacher_cache, self._student_cache = {}, {}
            self._cache_session = self.session.session_id
        try:
            names = call("get_children", self.paths.service_path, watch=self._on_event)
        except NoNodeError:
            if call("exists", self.paths.service_path, watch=self._on_event) is not None:
                self._wake.set()      # created meanwhile: read again (an exists watch misses its children)
            return ServiceView((), ())
        teacher_names = sorted((n for n in names if n.startswith(TEACHER_PREFIX)), key=node_sequence)
        teachers = [t for t in (self._teacher(name) for name in teacher_names) if t is not None]
        listed = set(teacher_names)   # forget nodes that are gone (names come back after a ZooKeeper data loss)
        self._teacher_cache = {name: info for name, info in self._teacher_cache.items() if name in listed}
        try:
            student_names = call("get_children", self.paths.students_path, watch=self._on_event)
        except NoNodeError:
            if call("exists", self.paths.students_path, watch=self._on_event) is not None:
                self._wake.set()
            student_names = []
        student_names = sorted((n for n in student_names if n.startswith(STUDENT_PREFIX)), key=node_sequence)
        students = [s for s in (self._student(name) for name in student_names) if s is not None]
        self._student_cache = {s.node: s for s in students}
        return ServiceView(tuple(teachers), tuple(students))

    def _teacher(self, name: str) -> Optional[TeacherInfo]:
        """The teacher in node ``name`` (cached; None for a node that is gone or not a valid document)."""
        if name in self._teacher_cache:
            return self._teacher_cache[name]
        try:
            value, _ = self.session.call("get", f"{self.paths.service_path}/{name}")
        except NoNodeError:
            return None
        info = None
        try:
            doc = json.loads(value.decode())
            info = TeacherInfo(node=name, endpoint=validate_endpoint(doc["endpoint"]), meta=doc)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            logger.warning("ignoring teacher node %s/%s: not a JSON document with a valid 'endpoint' (%s)",
                           self.paths.service_path, name, exc)
        self._teacher_cache[name] = info
        return info

    def _student(self, name: str) -> Optional[StudentInfo]:
        if name in self._student_cache:
            return self._student_cache[name]
        try:
            value, _ = self.session.call("get", f"{self.paths.students_path}/{name}")
        except NoNodeError:
            return None
        try:
            doc = json.loads(value.decode())
            wanted = int(doc.get("require_max_teacher", 1))
            return StudentInfo(node=name, student_id=str(doc.get("student_id", name)),
                               require_max_teacher=max(1, wanted))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
            return StudentInfo(node=name, student_id=name)


def default_student_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
