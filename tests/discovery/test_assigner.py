"""The assigner (discovery.assigner) against a real ZooKeeper: election, takeover after SIGKILL, fencing after a
session loss, agreement after random joins and leaves, the ACLs of a locked-down service, the stateless fallback.

Session timeout 2 s (the test server's minimum) so that expiries take seconds.
"""
import logging
import random
import signal
import subprocess
import threading
import time

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError, NotEmptyError
from kazoo.recipe.lock import Lock
from kazoo.security import Permissions, make_acl, make_digest_acl

from discovery.arguments import STUDENT_PREFIX, ServicePaths
from discovery.assigner import Assigner, Deposed
from discovery.nodes import Assignment, NodeDataError, parse_assignment
from discovery.share import teacher_loads
from discovery.student import TeacherSubscription
from tests.support.procs import ProcessGuard, wait_for
from tests.support.zookeeper import kazoo_client

from .test_discovery import SERVICE, SESSION, Recorder, acl_set, registration

CHILD_STUDENT = """
import sys, time
from discovery.student import TeacherSubscription
hosts, root = sys.argv[1:3]
TeacherSubscription(hosts, "mnist_teacher", lambda endpoints: None, require_max_teacher=2, root=root,
                    student_id="child", session_timeout=2.0).start()
while True:
    time.sleep(1)
"""


def student(hosts, root, name, require_max_teacher=2, **kwargs):
    recorder = Recorder()
    subscription = TeacherSubscription(hosts, SERVICE, recorder, require_max_teacher=require_max_teacher, root=root,
                                       student_id=name, session_timeout=SESSION, **kwargs).start()
    wait_for(subscription.node.created.is_set, 10, f"student {name} registered")
    return subscription, recorder


def node_of(subscription):
    return subscription.node.path.rsplit("/", 1)[-1]


def stored(client, root):
    """{student node: endpoints} of the assignment nodes in ZooKeeper."""
    path = ServicePaths(root, SERVICE).assignment_path
    result = {}
    for name in client.get_children(path) if client.exists(path) else []:
        if name.startswith(STUDENT_PREFIX):
            try:
                data = client.get(f"{path}/{name}")[0]
            except NoNodeError:      # deleted by the assigner between the listing and the read
                continue
            result[name] = list(parse_assignment(name, data).endpoints)
    return result


def contenders(client, root):
    return Lock(client, ServicePaths(root, SERVICE).assigner_lock_path).contenders()


def discovery_state(client, root, subscriptions) -> str:
    """What each student, its assigner and ZooKeeper hold, and where each assigner thread is (for a failure's
    message: a recovery that times out under load says which part did not come back)."""
    import sys
    import traceback

    lines = []
    frames = sys._current_frames()
    for s in subscriptions:
        thread = s.assigner._thread._thread
        lines.append(f"student {s.student_id}: session connected {s.session.connected} id "
                     f"{s.session.session_id}, node {s.node.path} created {s.node.created.is_set()}, endpoints "
                     f"{sorted(s.endpoints)}, fallback {s.fallback.is_set()}, leading {s.assigner.leading.is_set()} "
                     f"(terms {s.assigner.terms}), assigner thread alive {thread.is_alive()}")
        if thread.ident in frames:
            lines += ["  " + line for line in traceback.format_stack(frames[thread.ident])[-6:]]
    for what, read in (("stored", lambda: stored(client, root)), ("contenders", lambda: contenders(client, root))):
        try:
            lines.append(f"{what}: {read()}")
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the failure
            lines.append(f"{what}: unreadable ({type(exc).__name__}: {exc})")
    return "\n".join(lines)


def settled(client, root, subscriptions, teachers, wanted=None):
    """Every student uses exactly its stored assignment, the rules hold, nobody is in the fallback."""
    assignment = stored(client, root)
    nodes = {node_of(s): s for s in subscriptions if s.node.path}
    if set(assignment) != set(nodes) or any(s.fallback.is_set() for s in subscriptions):
        return False
    for name, s in nodes.items():
        m = (wanted or {}).get(s.student_id, 2)
        if sorted(s.endpoints) != sorted(assignment[name]) or len(set(assignment[name])) != min(m, len(teachers)):
            return False
    loads = teacher_loads(assignment, teachers)
    return set(loads) <= set(teachers) and max(loads.values()) - min(loads.values()) <= 1


def stop_all(*groups):
    """Stop every subscription or registration of ``groups``, in order (each ``stop`` is idempotent)."""
    for group in groups:
        for started in group:
            started.stop()


def teachers_up(hosts, root, ports, **kwargs):
    registrations = {f"127.0.0.1:{port}": registration(hosts, root, f"127.0.0.1:{port}", **kwargs)
                     for port in ports}
    for reg in registrations.values():
        reg.wait_registered(10)
    return registrations


def test_sigkilled_assigner_is_replaced_and_the_others_keep_their_teachers(zookeeper, zk, zk_root):
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 7), allow_open_acl=True)
    subscriptions = []
    try:
        with ProcessGuard() as guard:
            child = guard.python("-c", CHILD_STUDENT, zookeeper.hosts, zk_root, stdout=subprocess.DEVNULL)
            wait_for(lambda: contenders(zk, zk_root)[:1] == ["child"] and len(stored(zk, zk_root)) == 1, 30,
                     "the child student elected assigner and assigned")
            (child_node,) = stored(zk, zk_root)
            for name in ("s1", "s2"):
                subscriptions.append(student(zookeeper.hosts, zk_root, name)[0])
            wait_for(lambda: settled(zk, zk_root, subscriptions, list(registrations)) is not None
                     and len(stored(zk, zk_root)) == 3 and all(len(s.endpoints) == 2 for s in subscriptions),
                     15, "three students with two teachers each")
            before = {node_of(s): sorted(s.endpoints) for s in subscriptions}
            assert not any(s.assigner.leading.is_set() for s in subscriptions)

            child.send_signal(signal.SIGKILL)
            child.wait(10)
            late, late_calls = student(zookeeper.hosts, zk_root, "s3", assignment_wait=0.5)
            subscriptions.append(late)
            wait_for(lambda: late.endpoints, 10, "the student joining without an assigner getting teachers")
            wait_for(lambda: any(s.assigner.leading.is_set() for s in subscriptions), 15, "a new assigner")
            wait_for(lambda: settled(zk, zk_root, subscriptions, list(registrations)), 15, "the new assignment")
            assert child_node not in stored(zk, zk_root)                     # the dead student's node removed
            assert {node_of(s): sorted(s.endpoints) for s in subscriptions[:2]} == before   # nobody else moved
            assert [] not in late_calls.calls
            assert sorted(e for s in subscriptions for e in s.endpoints) == sorted(registrations)   # once each
    finally:
        stop_all(subscriptions, registrations.values())


def test_a_deposed_assigner_cannot_write(zookeeper, zk, zk_root):
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 5), allow_open_acl=True)
    first, _ = student(zookeeper.hosts, zk_root, "first")
    second = None
    try:
        wait_for(first.assigner.leading.is_set, 10, "the first student elected")
        second, _ = student(zookeeper.hosts, zk_root, "second")
        wait_for(lambda: settled(zk, zk_root, [first, second], list(registrations)), 15, "both assigned")
        lock_node = f"{first.assigner._lock.path}/{first.assigner._lock.node}"
        second_node = node_of(second)
        second_before = zk.get(ServicePaths(zk_root, SERVICE).assignment_of(second_node))[0]

        old_session = first.session.session_id
        thief = KazooClient(hosts=zookeeper.hosts, client_id=first.session.client.client_id, timeout=SESSION)
        thief.start(timeout=10)                          # the same session, closed: the first student's expires
        thief.stop()
        thief.close()
        wait_for(second.assigner.leading.is_set, 15, "the second student taking over")
        wait_for(lambda: first.session.connected and first.session.session_id != old_session, 15,
                 "the first student in a new session")
        forged = Assignment(second_node, ("teacher-0000000000",), ("127.0.0.1:9",))
        with pytest.raises(Deposed):                     # a write with the lost lock node is refused as a whole
            first.assigner._commit(lock_node, [(second_node, forged)])
        assert zk.get(ServicePaths(zk_root, SERVICE).assignment_of(second_node))[0] == second_before
        assert not zk.exists(lock_node)
        wait_for(lambda: first.node.created.is_set() and settled(zk, zk_root, [first, second], list(registrations)),
                 15, "the first student registered again and assigned by the second")
        assert not first.assigner.leading.is_set() and first.assigner.terms == 1
    finally:
        stop_all([first], [second] if second is not None else [], registrations.values())


def test_students_agree_after_random_joins_and_leaves(zookeeper, zk, zk_root):
    rng = random.Random(16)
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 9), allow_open_acl=True)
    subscriptions, wanted, serial = [], {}, 0
    try:
        for step in range(14):
            action = rng.choice(["student joins", "student joins", "student leaves", "teacher joins",
                                 "teacher leaves"])
            if action == "student joins" or not subscriptions:
                serial += 1
                wanted[f"s{serial}"] = rng.randint(1, 3)
                subscriptions.append(student(zookeeper.hosts, zk_root, f"s{serial}", wanted[f"s{serial}"])[0])
            elif action == "student leaves" and len(subscriptions) == 1:
                continue              # with no student left, no assigner removes the last one's node: by design
            elif action == "student leaves":
                subscriptions.pop(rng.randrange(len(subscriptions))).stop()
            elif action == "teacher joins":
                endpoint = f"127.0.0.1:{100 + step}"
                registrations[endpoint] = registration(zookeeper.hosts, zk_root, endpoint, allow_open_acl=True)
                registrations[endpoint].wait_registered(10)
            elif len(registrations) > 1:
                registrations.pop(rng.choice(sorted(registrations))).stop()
            wait_for(lambda: settled(zk, zk_root, subscriptions, list(registrations), wanted), 20,
                     f"students agreeing after step {step} ({action})")
            assert sum(s.assigner.leading.is_set() for s in subscriptions) == 1
    finally:
        stop_all(subscriptions, registrations.values())


def test_locked_down_service_anonymous_students_get_assignments_or_fall_back(zookeeper, zk, zk_root, caplog,
                                                                             monkeypatch):
    caplog.set_level(logging.WARNING, logger="discovery")
    monkeypatch.setattr(Assigner, "UNAVAILABLE_RETRY", 1.0)     # (30 s by default)
    paths = ServicePaths(zk_root, SERVICE)
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 5), auth="teacher:s3cret")
    subscriptions = []
    try:
        assert acl_set(zk.get_acls(paths.assignment_path)[0]) == {
            ("digest", "teacher", Permissions.ALL),
            ("world", "anyone", Permissions.READ | Permissions.CREATE | Permissions.DELETE)}
        for name in ("a", "b"):                                  # anonymous students
            subscriptions.append(student(zookeeper.hosts, zk_root, name)[0])
        wait_for(lambda: settled(zk, zk_root, subscriptions, list(registrations)), 15, "assigned anonymously")
        leader = next(s for s in subscriptions if s.assigner.leading.is_set())

        owner = KazooClient(hosts=zookeeper.hosts, timeout=SESSION, auth_data=[("digest", "teacher:s3cret")])
        owner.start(timeout=10)
        try:
            owner.set_acls(paths.assignment_path, [make_digest_acl("teacher", "s3cret", all=True),
                                                   make_acl("world", "anyone", read=True)])
            late, late_calls = student(zookeeper.hosts, zk_root, "late", assignment_wait=1.0)
            subscriptions.append(late)                           # the assigner may not create its node now
            wait_for(lambda: len(late_calls.last or []) == 2 and late.fallback.is_set(), 10, "the late one's share")
            wait_for(lambda: any("assignment transaction refused (NoAuthError" in r.getMessage()
                                 for r in caplog.records), 10, "the refused write logged")
            assert leader.assigner.leading.is_set() and leader.assigner._thread.is_alive()
            while subscriptions:
                subscriptions.pop().stop()
            owner.delete(paths.assignment_path, recursive=True)  # a service locked down before this folder existed
        finally:
            owner.stop()
            owner.close()
        lone, recorder = student(zookeeper.hosts, zk_root, "lone")
        subscriptions.append(lone)
        wait_for(lambda: len(recorder.last or []) == 2, 10, "the student's stateless share")
        assert lone.fallback.is_set() and lone.assigner.unavailable.is_set()
        assert not zk.exists(paths.assignment_path)
        assert any("may not create" in r.getMessage() for r in caplog.records)
        assert any("using the stateless fair share" in r.getMessage() for r in caplog.records)

        registrations["127.0.0.1:5"] = registration(zookeeper.hosts, zk_root, "127.0.0.1:5", auth="teacher:s3cret")
        registrations["127.0.0.1:5"].wait_registered(10)         # a registrar of this version creates the folder:
        wait_for(lambda: settled(zk, zk_root, [lone], list(registrations)), 10,   # the student leads, leaves the
                 "the stateless fallback left once the assignment folder exists")       # fallback
        assert lone.assigner.leading.is_set() and not lone.assigner.unavailable.is_set()
    finally:
        stop_all(subscriptions, registrations.values())


def test_a_tampered_assignment_never_points_a_student_outside_the_registered_teachers(zookeeper, zk, zk_root,
                                                                                      caplog):
    caplog.set_level(logging.WARNING, logger="discovery")
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 3), allow_open_acl=True)
    lone, recorder = student(zookeeper.hosts, zk_root, "lone", require_max_teacher=1)
    try:
        wait_for(lambda: settled(zk, zk_root, [lone], list(registrations), {"lone": 1}), 15, "assigned")
        path = ServicePaths(zk_root, SERVICE).assignment_of(node_of(lone))
        (used,) = lone.endpoints
        (teacher_node,) = parse_assignment(node_of(lone), zk.get(path)[0]).teachers
        forgeries = {b"[" * 100: "JSON nested 17 deep",
                     b'{"teachers": ["../../x/teacher-0000000001"], "endpoints": ["10.6.6.6:1"]}': "teacher node names",
                     Assignment("x", (teacher_node,), ("10.6.6.6:1",)).document():
                         f"names teacher node {teacher_node} as 10.6.6.6:1 but it serves {used}"}
        check_suspects = lone.assigner._check_suspects
        lone.assigner._check_suspects = lambda: (check_suspects(), lone.assigner._repair.clear())
        for forged, warning in forgeries.items():          # (the assigner's repair held back: the student's
            zk.set(path, forged)                           # parsing is under test; anyone may write there)
            wait_for(lambda w=warning: any(w in r.getMessage() for r in caplog.records), 10, warning)
        wait_for(lambda: recorder.last == [], 10, "the forged endpoint left out")
        lone.assigner._check_suspects = check_suspects
        zk.set(path, b"garbage")                            # wakes the assigner: it writes the node again
        wait_for(lambda: recorder.last == [used], 10, "the assignment repaired by the assigner")
        assert all(set(call) <= {used} for call in recorder.calls)     # 10.6.6.6:1 never reported
    finally:
        stop_all([lone], registrations.values())


def test_background_threads_end_cleanly_when_stopped_during_a_retry(zookeeper, zk_root, monkeypatch):
    """kazoo's KazooRetry ends with its own InterruptedError (a KazooException, not the builtin): a thread stopped
    while retrying must end quietly, not with an unhandled exception."""
    import threading

    from kazoo.exceptions import ConnectionLoss

    from discovery.session import ZkSession
    from discovery.watcher import ServiceWatcher

    unhandled = []
    monkeypatch.setattr(threading, "excepthook", lambda args: unhandled.append(args.exc_value))
    session = ZkSession(zookeeper.hosts, session_timeout=SESSION).start()
    try:
        assert session.wait_connected(10)
        watcher = ServiceWatcher(session, ServicePaths(zk_root, SERVICE), on_view=lambda view: None)
        attempts = []

        def failing():
            attempts.append(1)
            raise ConnectionLoss("injected")
        watcher._attempt = failing
        watcher.start()
        wait_for(lambda: len(attempts) >= 2, 10, "the watcher retrying")
        watcher.stop()
        assert not watcher._thread.is_alive()
        assert unhandled == []
    finally:
        session.close()


def test_a_service_folder_wiped_and_recreated_reuses_names_for_other_teachers(zookeeper, zk, zk_root):
    """Sequence numbers restart in a new folder: teacher-0000000000 may now be another teacher. The student must
    not keep the old node's data (it would drop its only teacher as 'serving another endpoint')."""
    paths = ServicePaths(zk_root, SERVICE)
    first = registration(zookeeper.hosts, zk_root, "127.0.0.1:1", allow_open_acl=True)
    first.wait_registered(10)
    lone, recorder = student(zookeeper.hosts, zk_root, "lone", require_max_teacher=1)
    second = None
    try:
        wait_for(lambda: recorder.last == ["127.0.0.1:1"], 15, "the first teacher")
        (old_name,) = parse_assignment(node_of(lone), zk.get(paths.assignment_of(node_of(lone)))[0]).teachers
        first.stop()
        wait_for(lambda: zk.exists(f"{paths.service_path}/{old_name}") is None, 10, "the first teacher gone")
        def wiped() -> bool:   # the whole service wiped (an operator, a test), racing the student re-creating its node
            try:
                zk.delete(paths.service_path, recursive=True)
                return True
            except (NotEmptyError, NoNodeError):
                return False

        # a time bound, not a count: on a loaded machine 50 tries in a row all lost the race once (fresh-clone CI)
        wait_for(wiped, 10, "the service folder wiped", interval=0.005)
        second = registration(zookeeper.hosts, zk_root, "127.0.0.1:2", allow_open_acl=True)
        second.wait_registered(10)
        wait_for(lambda: zk.exists(f"{paths.service_path}/{old_name}") is not None, 10, "the name reused")
        wait_for(lambda: recorder.last == ["127.0.0.1:2"], 20, "the student following the new teacher")
    finally:
        lone.stop()
        first.stop()
        if second is not None:
            second.stop()


def test_zookeeper_restarted_with_its_data_wiped_students_teachers_and_assigner_recover(private_zookeeper, zk_root,
                                                                                       caplog):
    """A wiped (or restored) server refuses every client that saw a later transaction id than its own, and kazoo
    would offer the same id forever: every session must start afresh, the assignment be written again."""
    caplog.set_level(logging.INFO, logger="discovery")   # in the report of a failure
    hosts = private_zookeeper.hosts
    registrations = teachers_up(hosts, zk_root, range(1, 4), allow_open_acl=True)
    subscriptions = [student(hosts, zk_root, name)[0] for name in ("a", "b")]
    try:
        with kazoo_client(hosts, SESSION) as client:
            wait_for(lambda: settled(client, zk_root, subscriptions, list(registrations)), 15, "assigned")
        private_zookeeper.restart(wipe=True)
        with kazoo_client(hosts, SESSION) as client:
            try:
                wait_for(lambda: all(s.session.connected and s.node.created.is_set() for s in subscriptions)
                         and len({node_of(s) for s in subscriptions}) == len(subscriptions)   # (names start
                         and settled(client, zk_root, subscriptions, list(registrations)), 30,  # again at 0)
                         "teachers registered again, students assigned again in the empty server")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{discovery_state(client, zk_root, subscriptions)}") from None
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []   # no callback failed
    finally:
        stop_all(subscriptions, registrations.values())


def readable(client, path):
    """The assignment node at ``path`` exists and parses."""
    try:
        parse_assignment("x", client.get(path)[0])
        return True
    except (NoNodeError, NodeDataError):
        return False


def test_the_assigner_repairs_an_assignment_node_changed_or_deleted_behind_its_back(zookeeper, zk, zk_root, caplog):
    """Anyone may write the assignment folder: a node rewritten (garbage, too big, other registered teachers) or
    deleted by hand must be written again by the assigner, not left until the next membership change."""
    caplog.set_level(logging.WARNING, logger="discovery")
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 3), allow_open_acl=True)
    wanted = {"a": 1, "b": 1}
    subscriptions = [student(zookeeper.hosts, zk_root, name, require_max_teacher=1)[0] for name in wanted]
    try:
        wait_for(lambda: settled(zk, zk_root, subscriptions, list(registrations), wanted), 15, "assigned")
        leader = next(s for s in subscriptions if s.assigner.leading.is_set())
        victim = subscriptions[0]
        path = ServicePaths(zk_root, SERVICE).assignment_of(node_of(victim))
        other = subscriptions[1]
        (other_teacher,) = parse_assignment(node_of(other), zk.get(
            ServicePaths(zk_root, SERVICE).assignment_of(node_of(other)))[0]).teachers
        forgeries = [Assignment(node_of(victim), (other_teacher,), tuple(other.endpoints)).document(),
                     b"garbage", b"{" + b" " * 200_000 + b"}", None]
        for forged in forgeries:
            if forged is None:
                zk.delete(path)
            else:
                zk.set(path, forged)
            wait_for(lambda: readable(zk, path) and settled(zk, zk_root, subscriptions, list(registrations), wanted),
                     10, f"the assignment repaired after {str(forged)[:40]}")
        assert leader.assigner.leading.is_set() and leader.assigner._thread.is_alive()
        assert victim._follower.is_alive()
    finally:
        stop_all(subscriptions, registrations.values())


def children_event(client, path, predicate):
    """An Event set (by a ZooKeeper children watch, no polling) once ``predicate(children of path)`` is true."""
    reached = threading.Event()

    def on_children(children):
        if predicate(children):
            reached.set()
            return False           # stop watching
        return None

    client.ChildrenWatch(path, on_children)
    return reached


TAKEOVER = 2.0   # seconds from a lock node vanishing to the next contender leading (issue 25's bound)


def test_an_assigner_whose_lock_node_is_deleted_by_hand_steps_down_at_once(zookeeper, zk, zk_root):
    """Anyone may delete a contender node: the next contender then leads within TAKEOVER seconds, and the old one
    must know it now (it could not write anyway: its transactions check the node), not at its next write.

    Waits on events (the assigners' ``leading``, a children watch), never on sleeps. The deletion waits until both
    students contend: a student that is assigned need not contend yet on a loaded machine, and the old leader, if
    it re-contends first, rightly leads again (the race that failed this test 6 of 10 times under load)."""
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 3), allow_open_acl=True)
    subscriptions = [student(zookeeper.hosts, zk_root, name, require_max_teacher=1)[0] for name in ("a", "b")]
    lock_path = ServicePaths(zk_root, SERVICE).assigner_lock_path
    try:
        wanted = {"a": 1, "b": 1}
        wait_for(lambda: settled(zk, zk_root, subscriptions, list(registrations), wanted), 15, "assigned")
        assert children_event(zk, lock_path, lambda nodes: len(nodes) == 2).wait(15), "both students contending"
        leader = next(s for s in subscriptions if s.assigner.leading.is_set())
        follower = next(s for s in subscriptions if s is not leader)
        assert contenders(zk, zk_root) == [leader.student_id, follower.student_id]
        old_node = leader.assigner._lock.node
        deleted_at = time.monotonic()
        zk.delete(f"{lock_path}/{old_node}")
        assert follower.assigner.leading.wait(10), "the next contender leading"
        takeover = follower.assigner.led_since - deleted_at
        logging.getLogger(__name__).info("assigner takeover %.3fs after the lock node was deleted", takeover)
        assert 0 <= takeover <= TAKEOVER, f"the next contender led {takeover:.2f}s after the lock node vanished"
        assert children_event(zk, lock_path, lambda nodes: len(nodes) == 2 and old_node not in nodes).wait(10), \
            "the old assigner contending again"
        assert not leader.assigner.leading.is_set()     # cleared before it contends again
        assert contenders(zk, zk_root) == [follower.student_id, leader.student_id]
        assert follower.assigner.leading.is_set() and follower.assigner.terms == 1
        assert settled(zk, zk_root, subscriptions, list(registrations), wanted)
    finally:
        stop_all(subscriptions, registrations.values())


def test_a_contender_whose_calls_failed_for_seconds_leads_at_once_when_they_succeed_and_stops_when_told(
        zookeeper, zk_root):
    """While a session is expired and not yet re-established every call fails at once (kazoo raises
    SessionExpiredError; here a real session's get_children is made to for 4 s, the only stand-in). kazoo's Lock
    retried with its own backoff, doubling to 60 s: the contender then slept about as long again (3-9 s) before it
    looked at its predecessor, and stopping could not end the sleep. The assigner's ContenderLock backs off to at
    most 0.5 s: it leads within a second of the calls succeeding, and stops within one when told."""
    from kazoo.exceptions import SessionExpiredError

    from discovery.election import ContenderLock
    from discovery.session import ZkSession

    session = ZkSession(zookeeper.hosts, session_timeout=SESSION).start()
    lock_path = ServicePaths(zk_root, SERVICE).assigner_lock_path
    real = session.client.get_children
    failing = {"until": 0.0}

    def get_children(*args, **kwargs):
        if time.monotonic() < failing["until"]:
            raise SessionExpiredError()
        return real(*args, **kwargs)

    try:
        assert session.wait_connected(10)
        session.client.get_children = get_children
        failing["until"] = time.monotonic() + 4.0
        assert ContenderLock(session.client, lock_path, "a", threading.Event()).acquire()
        late = time.monotonic() - failing["until"]
        assert 0 <= late <= 1.0, f"led {late:.2f}s after its calls succeeded again"

        stopping = threading.Event()
        failing["until"] = time.monotonic() + 60.0
        outcome = []
        waiter = threading.Thread(target=lambda: outcome.append(
            ContenderLock(session.client, lock_path, "b", stopping).acquire()))
        waiter.start()
        time.sleep(3.0)   # long enough for kazoo's own backoff to reach seconds
        stopped = time.monotonic()
        stopping.set()
        waiter.join(5)
        assert not waiter.is_alive() and outcome == [False], "stopping ends a contender's retry: not acquired"
        assert time.monotonic() - stopped <= 1.0
        failing["until"] = 0.0
        assert Lock(session.client, lock_path).contenders() == ["a"], "the stopped contender's node is gone"
    finally:
        failing["until"] = 0.0
        session.close()


def test_a_bug_in_one_round_does_not_end_the_watch_or_the_node_keeper(zookeeper, zk_root, monkeypatch):
    """Discovery's background threads (the assigner's ServiceWatcher, the student's and teacher's EphemeralNode)
    must outlive an unexpected exception, not only ZooKeeper errors."""
    import threading

    from discovery.ephemeral import EphemeralNode
    from discovery.session import ZkSession
    from discovery.watcher import ServiceWatcher

    unhandled = []
    monkeypatch.setattr(threading, "excepthook", lambda args: unhandled.append(args.exc_value))
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 2), allow_open_acl=True)
    session = ZkSession(zookeeper.hosts, session_timeout=SESSION).start()
    try:
        assert session.wait_connected(10)
        views = []
        watcher = ServiceWatcher(session, ServicePaths(zk_root, SERVICE), on_view=views.append)
        attempt, failures = watcher._attempt, []

        def buggy():
            if not failures:
                failures.append(1)
                raise KeyError("injected bug")
            return attempt()
        watcher._attempt = buggy
        watcher.start()
        wait_for(lambda: views and views[-1].endpoints == ["127.0.0.1:1"], 10, "the view after the bug")
        assert watcher._thread.is_alive() and unhandled == []
        watcher.stop()

        node = EphemeralNode(session, ServicePaths(zk_root, SERVICE).students_path, STUDENT_PREFIX, {})
        reconcile = node._reconcile

        def buggy_reconcile():
            if len(failures) == 1:
                failures.append(2)
                raise KeyError("injected bug")
            return reconcile()
        node._reconcile = buggy_reconcile
        node.start().set_wanted(True)                  # the same for the thread that keeps a node present
        wait_for(node.created.is_set, 10, "the node created after the bug")
        assert node._thread.is_alive() and unhandled == [] and failures == [1, 2]
        node.stop()
    finally:
        session.close()
        stop_all(registrations.values())


def test_large_assignments_are_written_in_transactions_within_zookeepers_request_limit(zookeeper, zk, zk_root):
    """64 teachers each for 250 students, teachers with long host names: ~6 KB per node, so 200 nodes per
    transaction would be over ZooKeeper's 1 MiB request limit (jute.maxbuffer) and never go through."""
    from discovery.acls import ensure_service
    from discovery.arguments import TEACHER_PREFIX
    from discovery.assigner import Assigner
    from discovery.session import ZkSession

    paths = ServicePaths(zk_root, SERVICE)
    session = ZkSession(zookeeper.hosts, session_timeout=SESSION).start()
    assigner = None
    try:
        assert session.wait_connected(10)
        ensure_service(session, paths, auth=None)
        host = "teacher-" + "x" * 50 + ".cluster.example.com"
        endpoints = [f"{host}:{9000 + i}" for i in range(64)]
        requests = [zk.create_async(f"{paths.service_path}/{TEACHER_PREFIX}", f'{{"endpoint": "{e}"}}'.encode(),
                                    ephemeral=True, sequence=True) for e in endpoints]
        requests += [zk.create_async(f"{paths.students_path}/{STUDENT_PREFIX}", b'{"require_max_teacher": 64}',
                                     ephemeral=True, sequence=True) for _ in range(250)]
        for request in requests:
            request.get(timeout=10)
        assigner = Assigner(session, paths, identifier="big").start()
        wait_for(lambda: len(stored(zk, zk_root)) == 250, 20, "250 assignment nodes written")
        assert all(sorted(e) == sorted(endpoints) for e in stored(zk, zk_root).values())
    finally:
        if assigner is not None:
            assigner.stop()
        session.close()


def test_the_same_teachers_in_another_order_is_no_change_for_on_change(zookeeper, zk, zk_root):
    """Issue 25: ``on_change`` fires when the set of teachers changes, not their order. The student's assignment
    node is rewritten by hand with its teachers reversed (the assigner then writes its own order back), and the
    student's report path is given the reversed list directly: no call either way (before the fix: one or two)."""
    registrations = teachers_up(zookeeper.hosts, zk_root, range(1, 3), allow_open_acl=True)
    lone, recorder = student(zookeeper.hosts, zk_root, "lone", require_max_teacher=2)
    try:
        wait_for(lambda: settled(zk, zk_root, [lone], list(registrations)), 15, "assigned")
        calls = list(recorder.calls)
        assert calls[-1] == sorted(registrations)
        path = ServicePaths(zk_root, SERVICE).assignment_of(node_of(lone))
        written = parse_assignment(node_of(lone), zk.get(path)[0])
        reversed_ = Assignment(written.student, written.teachers[::-1], written.endpoints[::-1])
        zk.set(path, reversed_.document())
        wait_for(lambda: zk.get(path)[0] == written.document(), 15, "the assigner writing its order back")
        lone._report(list(reversed(lone.endpoints)), teachers=None, view=None)
        assert recorder.calls == calls
        assert sorted(lone.endpoints) == sorted(registrations)
    finally:
        stop_all([lone], registrations.values())
