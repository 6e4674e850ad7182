"""Keep one ephemeral sequential ZooKeeper node present while it is wanted (a teacher's or a student's node).

Example::

    node = EphemeralNode(session, "/distill/mnist_teacher", "teacher-", {"endpoint": "10.0.0.5:9292"}).start()
    node.set_wanted(True)
    node.created.wait(10)
    node.stop()
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Callable, Optional

from kazoo.exceptions import NoAuthError, NoNodeError, NotEmptyError
from kazoo.protocol.states import KazooState
from kazoo.retry import ForceRetryError

from .arguments import AUTH_ENV, RegistryAuthError
from .reconciler import Reconciler, StopReconciling
from .session import ZK_ERRORS, ZkSession, retry_forever

logger = logging.getLogger(__name__)


class EphemeralNode:
    """Keep one ephemeral sequential node ``<parent>/<prefix>NNNNNNNNNN`` present while ``wanted``.

    A reconciling thread (so kazoo's callbacks never block) creates it, re-creates it after a session loss (the
    server deleted it), deletes it when unwanted or on ``stop()``. A ZooKeeper watch on the node and the session's
    state changes wake it at once; besides, it checks the node every ``check_interval`` seconds (one ``exists``).
    Failures are retried by kazoo's KazooRetry (backoff 0.1 s doubling to 5 s, jitter); an authorization failure
    is final (``error`` holds a RegistryAuthError, ``failed`` is set) unless ``auth_errors_fatal`` is False
    (students: the teachers' identity may not have created the students folder yet). A create whose answer was
    lost is found again by its ``registration_id`` and session instead of being duplicated.

    Args:
        session: the ZooKeeper session.
        parent: the folder of the node.
        prefix: the node name before ZooKeeper's sequence number (``"teacher-"``).
        data: the node's JSON document (``registration_id`` and ``registered_at`` are added).
        acl: the node's ACL (None: kazoo's default, open).
        ensure_parent: creates the parent folder(s) when missing.
        what: how log lines name the node ("teacher 10.0.0.5:9292").
    """

    def __init__(self, session: ZkSession, parent: str, prefix: str, data: dict,
                 acl: Optional[list] = None, ensure_parent: Optional[Callable[[], None]] = None,
                 check_interval: float = 30.0, what: str = "node", auth_errors_fatal: bool = True):
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
        self._lock = threading.Lock()
        self._thread = Reconciler(f"zk-{prefix.rstrip('-')}", self._round, interval=check_interval)
        self._stopping = self._thread.stopping
        self._retry = retry_forever(self._stopping)
        session.subscribe(self._on_state)

    def start(self) -> EphemeralNode:
        self._thread.start()
        return self

    @property
    def wanted(self) -> bool:
        return self._wanted

    def set_wanted(self, wanted: bool) -> None:
        self._wanted = wanted
        self._thread.wake()

    def stop(self, remove: bool = True, timeout: float = 3.0) -> None:
        """Stop reconciling; with ``remove`` delete the node (bounded by ``timeout`` if ZooKeeper is away)."""
        self._wanted = False
        self._thread.stop(join=timeout + 2)
        if remove:
            with self._lock:
                self._delete(timeout, final=True)

    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST:
            self.created.clear()
        self._thread.wake()

    def _on_node_event(self, event: object) -> None:
        self._thread.wake()       # our node was deleted or changed: check it now

    def _round(self) -> None:
        """The reconciler's round (when woken, or every ``check_interval``); a bug in it is logged and retried
        with backoff by the reconciler, so the node is never left missing for good."""
        try:
            self._retry(self._attempt)
        except (NoAuthError, RegistryAuthError) as exc:
            self.error = exc if isinstance(exc, RegistryAuthError) else RegistryAuthError(
                f"ZooKeeper refused to create the {self.what} under {self.parent}: not authorized as "
                f"{self.session.auth_user or 'an anonymous client'}; only the service's identity may write "
                f"there (check --zk_auth or {AUTH_ENV})")
            logger.error("%s", self.error)
            self.failed.set()
            raise StopReconciling from exc

    def _attempt(self) -> None:
        """One reconciliation; ZooKeeper trouble becomes ForceRetryError so that KazooRetry backs off."""
        with self._lock:
            try:
                self._reconcile()
            except (NoAuthError, RegistryAuthError) as exc:
                if self.auth_errors_fatal:
                    raise
                self._parent_ready = False
                logger.warning("%s under %s: not allowed yet (%s); retrying with backoff", self.what, self.parent,
                               exc)
                raise ForceRetryError(str(exc)) from exc
            except ZK_ERRORS as exc:
                logger.warning("%s under %s: %s: %s; retrying with backoff", self.what, self.parent,
                               type(exc).__name__, exc)
                raise ForceRetryError(str(exc)) from exc

    def _reconcile(self) -> None:
        if not self.session.connected:
            return
        if not self._wanted:
            if self.path is not None:
                self._delete(None)
            return
        if self.path is not None:
            stat = self.session.call("exists", self.path, watch=self._on_node_event)
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
        self._create()

    def _create(self) -> None:
        value = json.dumps(dict(self.data, registered_at=time.time())).encode()
        self._uncertain = True   # a lost answer may still have created the node: look for it next time
        try:
            path = self.session.call("create", f"{self.parent}/{self.prefix}", value, acl=self.acl, ephemeral=True,
                                     sequence=True)
        except NoNodeError:
            self._uncertain = False
            self._parent_ready = False
            if self.ensure_parent is None:
                raise
            self._thread.wake()
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
        self._thread.wake()       # check it once more at once: that sets the watch on it
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
