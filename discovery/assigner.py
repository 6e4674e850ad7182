"""The assigner: one student at a time keeps every student's teachers in ZooKeeper, moving as few as it can.

Every ``TeacherSubscription`` runs an ``Assigner``. They elect one with kazoo's ``Lock`` recipe under
``<service>/assignment/assigner`` (one ephemeral sequential contender node per student, each watching only its
predecessor; ``discovery.election``: with a retry that follows the session). The holder watches teachers and
students (``ServiceWatcher``), computes ``discovery.rebalance.rebalance(stored, view)`` and writes only the
per-student nodes that changed,
``<service>/assignment/<student-node>`` = ``{"teachers": [teacher node names], "endpoints": [...]}``
(``nodes.Assignment``), and deletes the nodes of departed students. The stored nodes are the state: a new
assigner reads them first, so a change of assigner moves nobody.

Fencing: every write is a ZooKeeper multi-op transaction that starts with a ``check`` of the assigner's own lock
node. That node is ephemeral, so once the assigner's session is gone (expired, or the process stopped) its
transactions fail as a whole and it can never overwrite its successor's work; it then stops leading and contends
again. It also watches its lock node, so a lock node deleted by hand (anyone may) makes it step down at once
rather than at its next (refused) write. A transaction that fails for another reason (a node changed behind its
back) makes it re-read the stored state and try again. It watches the data of every node it wrote: a node changed
or deleted by someone else (anyone may write the folder) is written back at once.

Grace: a student whose node vanishes (its session expired: a link cut for longer than the session timeout, or the
process gone) keeps its assignment node and its teachers for ``grace`` seconds (default: one session timeout); the
rebalance counts it as a student holding them meanwhile, so nobody else's teachers move. A student that comes back
registers under a new node name and names the old one (``previous`` in its node, ``nodes.StudentInfo``): it
inherits the kept teachers (the old node is deleted in the same transaction), so a brief cut costs no change at
all. After the grace the node is deleted and the rebalance frees its teachers. The grace clock starts when this
assigner first sees the node gone; a new assigner finds such nodes in ZooKeeper (an assignment node without a
student) and gives each a full grace from its takeover, so a change of assigner can lengthen a grace, never
shorten it (the assigner cut off itself: its successor takes over when its node vanishes, so nothing is lost).

Errors: ZooKeeper trouble is retried with backoff (``session.retry_forever``); a service where this student may
not create the assignment folder (locked down by a teacher identity before this folder existed) sets
``unavailable``, which makes the student fall back to its local ``fair_share`` (``discovery.student``); it tries
again every ``UNAVAILABLE_RETRY`` seconds (a registrar of this version creates the folder when it next starts).

Example::

    assigner = Assigner(session, ServicePaths("/distill", "mnist_teacher"), identifier="host-42").start()
    ...
    assigner.stop()
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from kazoo.exceptions import (
    BadVersionError,
    CancelledError,
    NoAuthError,
    NoNodeError,
    RolledBackError,
)
from kazoo.protocol.states import EventType, KazooState, WatchedEvent
from kazoo.retry import ForceRetryError
from kazoo.security import OPEN_ACL_UNSAFE

from .arguments import DEFAULT_SESSION_TIMEOUT, STUDENT_PREFIX, ServicePaths, node_sequence
from .election import ContenderLock
from .nodes import Assignment, NodeDataError, parse_assignment
from .rebalance import rebalance
from .reconciler import Reconciler, StopReconciling
from .session import ZK_ERRORS, RetryInterrupted, ZkSession, retry_forever
from .watcher import ServiceView, ServiceWatcher

logger = logging.getLogger(__name__)

OPS_PER_TRANSACTION = 200       # at most this many ops per multi-op transaction ...
BYTES_PER_TRANSACTION = 512 * 1024   # ... and this many bytes of paths and data: ZooKeeper drops the connection of
# a request over jute.maxbuffer (1 MiB by default); one node is ~200 B with 4 teachers, ~6 KB with 64, <= 300 KB


class Deposed(Exception):
    """The assigner's lock node is gone (session lost): its writes are refused, it must contend again."""


class Assigner:
    """Contend for the assigner role of a service and, while holding it, keep the assignment nodes up to date.

    Args:
        session: the student's ZooKeeper session.
        paths: the service's paths.
        identifier: stored in the contender node (readable with ``kazoo`` ``Lock.contenders()``).
        grace: seconds a vanished student's teachers are kept for it (see the module docstring); ValueError when
            negative or not a number.

    Attributes:
        leading: set while this process is the assigner.
        unavailable: set while this student may not create the assignment folder (see the module docstring).
        terms, writes, transactions: how many times it became the assigner, nodes written, transactions committed.
        applied: the last ``ServiceView`` whose assignment is all written (None before the first).
        led_since: ``time.monotonic()`` when this process last became the assigner (None before the first term);
            with the time a predecessor's lock node vanished it gives the takeover delay.
        kept: node name -> ``time.monotonic()`` when the grace of a vanished student began (this term's).
        inherited, expired: vanished students' assignments handed to their new registration / dropped after the
            grace, counted over all terms.
    """

    UNAVAILABLE_RETRY = 30.0   # seconds between two attempts to create a missing, forbidden assignment folder

    def __init__(self, session: ZkSession, paths: ServicePaths, identifier: str = "",
                 grace: float = DEFAULT_SESSION_TIMEOUT):
        """Check the arguments.

        Raises:
            ValueError: ``grace`` is not a number of seconds >= 0.
        """
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
            raise ValueError(f"grace must be a number of seconds >= 0, not {grace!r}")
        self.grace = float(grace)
        self.kept: dict[str, float] = {}
        self.inherited = self.expired = 0
        self.session = session
        self.paths = paths
        self.identifier = identifier
        self.leading = threading.Event()
        self.unavailable = threading.Event()
        self.terms = self.writes = self.transactions = 0
        self.applied: Optional[ServiceView] = None
        self.led_since: Optional[float] = None
        self.watcher: Optional[ServiceWatcher] = None   # the current term's (None before the first)
        self._view: Optional[ServiceView] = None
        self._stored: dict[str, Optional[Assignment]] = {}   # node name -> parsed (None: unreadable, rewrite)
        self._repair: dict[str, bool] = {}     # node name -> it exists: changed or deleted behind our back, rewrite
        self._suspects: set[str] = set()       # node names whose data watch fired: compare with what we wrote
        self._lock: Optional[ContenderLock] = None
        self._lock_node: Optional[str] = None    # this term's lock node (its deletion deposes this assigner)
        self._suspect_lock = threading.Lock()
        self._wake = threading.Event()        # the leading term's: something to apply
        self._deposed = threading.Event()
        self._thread = Reconciler(f"zk-assigner-{paths.service}", self._term)
        self._stopping = self._thread.stopping
        session.subscribe(self._on_state)

    def start(self) -> Assigner:
        self._thread.start(at_once=True)
        return self

    def stop(self) -> None:
        """Stop contending or leading; returns at once (a pending acquire ends when the session closes, and
        the lock node goes with the session). ``join`` waits for the thread."""
        self._thread.stop()
        self._wake.set()
        lock = self._lock
        if lock is not None:
            lock.cancel()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # -- election ------------------------------------------------------------------------------------------
    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST and self.leading.is_set():
            self._deposed.set()
        self._wake.set()

    def _term(self) -> float:
        """The reconciler's round: contend for the lock, lead until deposed or stopped, step down. Returns the
        seconds before contending again. A bug while leading steps down and is retried by the reconciler with
        backoff: the service is never left without an assigner for good."""
        if not self.session.connected:                    # every call would fail meanwhile
            return 0.2
        retry = retry_forever(self._stopping)
        self._lock = ContenderLock(self.session.client, self.paths.assigner_lock_path, self.identifier,
                                   self._stopping)
        if self._stopping.is_set():   # stop() ran before this lock existed: it could not cancel it
            raise StopReconciling
        try:
            if not retry(self._lock.acquire):             # False: its retry was ended by stopping
                raise StopReconciling
        except CancelledError as exc:
            raise StopReconciling from exc
        except NoAuthError:
            if not self.unavailable.is_set():
                logger.warning("this student may not create %s (service locked down without it): no assigner; "
                               "students share teachers by the stateless fair share; trying again every %gs",
                               self.paths.assignment_path, self.UNAVAILABLE_RETRY)
            self.unavailable.set()
            return self.UNAVAILABLE_RETRY                 # a newer registrar may create the folder later
        except ZK_ERRORS as exc:   # not retried by KazooRetry (e.g. a refused create): try again later
            if self._stopping.is_set():                   # the session closed under a pending acquire
                raise StopReconciling from exc
            logger.warning("contending for the assigner of %s failed (%s: %s); retrying",
                           self.paths.service_path, type(exc).__name__, exc)
            return 1.0
        self.unavailable.clear()
        try:
            self._lead(f"{self._lock.path}/{self._lock.node}")
        except ZK_ERRORS as exc:          # not retryable (e.g. NoAuth after an ACL change): step down, try again
            logger.warning("assigner of %s stepping down after %s: %s", self.paths.service_path,
                           type(exc).__name__, exc)
            return 1.0
        finally:
            self.leading.clear()
            self._release()
        return 0.0

    def _release(self) -> None:
        try:
            self.session.call("delete", f"{self._lock.path}/{self._lock.node}")
        except NoNodeError:
            pass
        except ZK_ERRORS as exc:
            logger.debug("releasing the assigner lock: %s", exc)

    # -- leading -------------------------------------------------------------------------------------------
    def _lead(self, lock_node: str) -> None:
        self._lock_node = lock_node
        self._deposed.clear()
        self._view = None
        self.kept = {}                    # a new term gives every vanished student a full grace (module docstring)
        self.terms += 1
        self.led_since = time.monotonic()
        self.leading.set()
        logger.info("%s is now the assigner of service %s", self.identifier, self.paths.service_path)
        watcher = self.watcher = ServiceWatcher(self.session, self.paths, self._on_view).start()
        retry = retry_forever(self._stopping, max_delay=2.0)
        try:
            retry(self._watch_lock, lock_node)
            self._stored, self._repair = retry(self._read_stored), {}
            self._wake.set()
            while not (self._stopping.is_set() or self._deposed.is_set()):
                self._wake.wait(self._until_grace_ends())
                self._wake.clear()
                if self._view is not None and self.session.connected and not self._deposed.is_set():
                    retry(self._apply, lock_node)
        except (Deposed, RetryInterrupted):
            pass
        finally:
            self._lock_node = None        # a late event about this term's node must not depose the next term
            watcher.stop()
        if not self._stopping.is_set():
            logger.warning("%s is no longer the assigner of service %s (lock lost); contending again",
                           self.identifier, self.paths.service_path)

    def _watch_lock(self, lock_node: str) -> None:
        """Watch this term's lock node: deleted (by hand: anyone may), the next contender leads, so step down now."""
        if self.session.call("exists", lock_node, watch=self._on_lock_event) is None:
            self._deposed.set()
            raise Deposed(lock_node)

    def _on_lock_event(self, event: WatchedEvent) -> None:
        if event.type == EventType.DELETED and event.path == self._lock_node:   # this term's node only
            logger.warning("the assigner lock node %s was deleted; stepping down", event.path)
            self._deposed.set()
            self._wake.set()

    def _until_grace_ends(self) -> Optional[float]:
        """Seconds until the next grace ends (then a round drops that student's node); None: no grace runs."""
        now = time.monotonic()
        ends = [since + self.grace for since in self.kept.values() if since + self.grace > now]
        return min(ends) - now + 0.01 if ends else None

    def _on_view(self, view: ServiceView) -> None:
        self._view = view
        self._wake.set()

    def _on_node_event(self, event: WatchedEvent) -> None:
        """A data watch on an assignment node fired (kazoo's event thread): check that node before the next write.
        A session loss fires every watch with no path: nothing to check (the next term reads every node)."""
        if not event.path:
            return
        with self._suspect_lock:
            self._suspects.add(event.path.rsplit("/", 1)[-1])
        self._wake.set()

    def _read_stored(self) -> dict[str, Optional[Assignment]]:
        """The stored assignment nodes, parsed as untrusted data (None for a node to rewrite); watches each."""
        try:
            names = self.session.call("get_children", self.paths.assignment_path)
        except NoNodeError:
            return {}
        requests = [(name, self.session.client.get_async(self.paths.assignment_of(name), watch=self._on_node_event))
                    for name in names if name.startswith(STUDENT_PREFIX)]
        stored: dict[str, Optional[Assignment]] = {}
        for name, request in requests:
            try:
                value, _ = request.get(timeout=self.session.request_timeout)
                stored[name] = parse_assignment(name, value)
            except NoNodeError:
                continue
            except NodeDataError as exc:
                logger.warning("ignoring assignment node %s: %s", self.paths.assignment_of(name), exc)
                stored[name] = None
        return stored

    def _check_suspects(self) -> None:
        """Compare the nodes whose watch fired with what this assigner wrote; mark those changed or deleted by
        someone else for rewriting (anyone may write the folder: see docs/security.md). Re-arms their watches."""
        with self._suspect_lock:
            names = sorted(self._suspects)
        requests = [(name, self.session.client.get_async(self.paths.assignment_of(name), watch=self._on_node_event))
                    for name in names if name.startswith(STUDENT_PREFIX)]
        for name, request in requests:
            written = self._stored.get(name)
            try:
                value, _ = request.get(timeout=self.session.request_timeout)
            except NoNodeError:
                if written is not None:
                    self._repair[name] = False          # deleted by hand: create it again
                else:
                    self._stored.pop(name, None)        # a foreign or unreadable node, gone: nothing to delete
                continue
            if name not in self._stored:
                self._stored[name] = None               # not ours: rewrite it, or delete it if no such student
            elif written is not None and value != written.document():
                logger.warning("assignment node %s was changed by someone else; writing it again",
                               self.paths.assignment_of(name))
                self._repair[name] = True
        with self._suspect_lock:
            self._suspects.difference_update(names)

    def _apply(self, lock_node: str) -> None:
        """Rebalance from the stored nodes to the current view and write what changed (fenced)."""
        self._check_suspects()
        view = self._view
        wanted = {s.node: s.require_max_teacher for s in view.students}
        node_of: dict[str, str] = {}
        for teacher in view.teachers:
            node_of.setdefault(teacher.endpoint, teacher.node)
        previous = {name: list(a.endpoints) for name, a in self._stored.items() if a is not None}
        self._keep_vanished(view, wanted, previous)
        students = sorted(wanted, key=lambda name: (node_sequence(name), name))   # join order, kept ones included
        share = rebalance(previous, students, view.endpoints, wanted)
        changes: list[tuple[str, Optional[Assignment]]] = []
        for student, endpoints in share.items():
            assignment = Assignment(student, tuple(node_of[e] for e in endpoints), tuple(endpoints))
            if self._stored.get(student) != assignment or student in self._repair:
                changes.append((student, assignment))
        changes += [(name, None) for name in self._stored if name not in wanted]
        for batch in self._batches(changes):
            self._commit(lock_node, batch)
        self.applied = view
        if changes:
            moved = sum(len(set(previous.get(s, ())) - set(e)) for s, e in share.items() if s in previous)
            logger.info("service %s: %d teacher(s), %d student(s); wrote %d assignment node(s), %d pair(s) moved",
                        self.paths.service, len(view.endpoints), len(wanted), len(changes), moved)

    def _keep_vanished(self, view: ServiceView, wanted: dict[str, int], previous: dict[str, list[str]]) -> None:
        """Apply the grace (module docstring) to the stored nodes whose student is gone: hand a node's teachers to
        the student's new registration (``previous`` names it), or keep it as a student holding its teachers
        while its grace runs (added to ``wanted``), or let it go (not added: the caller deletes it)."""
        now = time.monotonic()
        live, endpoints = set(wanted), set(view.endpoints)
        heirs = {s.previous: s.node for s in view.students if s.previous}
        self.kept = {name: since for name, since in self.kept.items() if name in self._stored and name not in live}
        for name in [name for name in self._stored if name not in live and name in previous]:
            heir = heirs.get(name)
            if heir is not None:
                self.kept.pop(name, None)
                if heir not in previous:                # its first assignment: the teachers kept for it
                    previous[heir] = previous.pop(name)
                    self.inherited += 1
                    logger.info("student %s is back as %s: it keeps its teachers %s", name, heir, previous[heir])
                continue
            since = self.kept.setdefault(name, now)
            if endpoints.intersection(previous[name]) and now - since < self.grace:
                if since == now:
                    logger.info("student %s vanished (session expired or process gone); keeping its teachers %s "
                                "for it for %gs", name, previous[name], self.grace)
                wanted[name] = len(previous[name])
                continue
            self.expired += 1     # (its grace entry goes with its node: a refused delete does not start it again)
            logger.info("student %s did not come back within %gs: its teachers are shared again", name, self.grace)

    def _batches(self, changes: list[tuple[str, Optional[Assignment]]]) -> list[list[tuple[str, Optional[Assignment]]]]:
        """``changes`` cut into transactions of at most OPS_PER_TRANSACTION ops and BYTES_PER_TRANSACTION bytes."""
        batches: list[list[tuple[str, Optional[Assignment]]]] = [[]]
        size = 0
        for change in changes:
            name, assignment = change
            cost = len(self.paths.assignment_of(name)) + 64 + (len(assignment.document()) if assignment else 0)
            if batches[-1] and (len(batches[-1]) >= OPS_PER_TRANSACTION or size + cost > BYTES_PER_TRANSACTION):
                batches.append([])
                size = 0
            batches[-1].append(change)
            size += cost
        return batches if batches[0] else []

    def _commit(self, lock_node: str, changes: list[tuple[str, Optional[Assignment]]]) -> None:
        """One transaction: check the lock node, then create/set/delete (None) the students' nodes."""
        transaction = self.session.client.transaction()
        transaction.check(lock_node, 0)
        for name, assignment in changes:
            path = self.paths.assignment_of(name)
            if assignment is None:
                transaction.delete(path)
            elif name in self._stored and self._repair.get(name, True):
                transaction.set_data(path, assignment.document())
            else:
                transaction.create(path, assignment.document(), acl=OPEN_ACL_UNSAFE)
        results = transaction.commit_async().get(timeout=self.session.request_timeout)
        if isinstance(results[0], (NoNodeError, BadVersionError)):
            self._deposed.set()
            raise Deposed(lock_node)
        failed = [r for r in results if isinstance(r, Exception) and not isinstance(r, RolledBackError)]
        if failed:
            logger.warning("assignment transaction refused (%s: %s); re-reading the stored nodes",
                           type(failed[0]).__name__, failed[0])
            self._stored, self._repair = self._read_stored(), {}   # someone changed a node: start again
            raise ForceRetryError(f"assignment transaction refused ({type(failed[0]).__name__}); re-read")
        self.transactions += 1
        self.writes += len(changes)
        for name, assignment in changes:
            if assignment is None:
                self._stored.pop(name, None)
            else:
                if name not in self._stored or not self._repair.get(name, True):
                    self._on_node_event(WatchedEvent(None, None, self.paths.assignment_of(name)))   # arm its watch
                self._stored[name] = assignment
            self._repair.pop(name, None)

