"""ZooKeeper discovery against a real ZooKeeper, real teacher servers, real register-script processes and signals.

Session timeout in these tests: 2 s (the test server's minSessionTimeout), so that expiries take seconds.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.security import OPEN_ACL_UNSAFE, Permissions, make_acl, make_digest_acl

from discovery.arguments import TEACHER_PREFIX, NoTeachersError, ServicePaths
from discovery.register import main as register_main
from discovery.student import TeacherSubscription
from discovery.teacher_registration import TeacherRegistration
from tests.support.procs import REPO_ROOT, ProcessGuard, free_port, port_is_open, wait_for
from tests.support.teacher import TeacherServer
from tests.support.zookeeper import four_letter_word

SESSION = 2.0
SERVICE = "mnist_teacher"

# A small real gRPC server that answers only grpc.health.v1 (SERVING) on every port given; for the tests where
# what is under test is discovery, not the teacher (six teachers in one light process).
HEALTH_SERVER = """
import signal, sys, grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
for port in sys.argv[1:]:
    server.add_insecure_port("127.0.0.1:" + port)
server.start()
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
server.wait_for_termination()
"""


# -- helpers ----------------------------------------------------------------------------------------------
def teacher_nodes(client, root, service=SERVICE):
    """{node name: JSON document} of the service's teacher nodes (empty when the service does not exist)."""
    path = ServicePaths(root, service).service_path
    if not client.exists(path):
        return {}
    nodes = {}
    for name in client.get_children(path):
        if name.startswith(TEACHER_PREFIX):
            try:
                nodes[name] = json.loads(client.get(f"{path}/{name}")[0])
            except NoNodeError:   # vanished between list and read; any other error fails the test
                pass
    return nodes


def acl_set(acls):
    """{(scheme, id, perms)}; a digest id as its user only (ZooKeeper shows others 'user:x', not the hash)."""
    return {(acl.id.scheme, acl.id.id.split(":")[0] if acl.id.scheme == "digest" else acl.id.id, acl.perms)
            for acl in acls}


OWNED = {("digest", "teacher", Permissions.ALL), ("world", "anyone", Permissions.READ)}


def endpoints_of(nodes):
    return sorted(doc["endpoint"] for doc in nodes.values())


def start_register(guard, hosts, root, endpoint, *extra, env=None, log_dir=None):
    """The register script; without DISTILL_ZK_AUTH in ``env`` it registers with --allow_open_acl."""
    log = open(os.path.join(log_dir, f"register-{endpoint.replace(':', '_')}.log"), "ab")
    open_acl = [] if env and env.get("DISTILL_ZK_AUTH") else ["--allow_open_acl"]
    proc = guard.python("-m", "discovery.register", "--zk", hosts, "--service", SERVICE, "--root", root,
                        "--endpoint", endpoint, "--session_timeout", str(SESSION), "--health_interval", "0.2",
                        "--health_timeout", "0.5", *open_acl, *extra, env=env, stdout=log,
                        stderr=subprocess.STDOUT)
    log.close()
    return proc


def start_health_server(guard, ports):
    proc = guard.python("-c", HEALTH_SERVER, *map(str, ports))
    wait_for(lambda: all(port_is_open(p) for p in ports), 20, f"health server on {ports}")
    return proc


def alive_connections(server):
    """Client connections the server holds now (``mntr``)."""
    for line in four_letter_word("127.0.0.1", server.port, "mntr").splitlines():
        if line.startswith("zk_num_alive_connections"):
            return int(line.split()[1])
    return 0


class Recorder:
    """on_change target: remembers every list of endpoints it was given."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, endpoints):
        with self.lock:
            self.calls.append(sorted(endpoints))

    @property
    def last(self):
        with self.lock:
            return self.calls[-1] if self.calls else None


def assigner_view(subscription):
    """The service view of the subscription's assigner (None unless this student is the assigner)."""
    watcher = subscription.assigner.watcher
    return watcher.view if watcher is not None and subscription.assigner.leading.is_set() else None


def subscribe(hosts, root, require_max_teacher=1, student_id=None):
    recorder = Recorder()
    subscription = TeacherSubscription(hosts, SERVICE, recorder, require_max_teacher=require_max_teacher,
                                       root=root, student_id=student_id, session_timeout=SESSION).start()
    return subscription, recorder


# -- the register script ----------------------------------------------------------------------------------
def test_register_script_follows_health_session_loss_and_sigterm(zookeeper, zk, zk_root, teacher_model, tmp_path):
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    with ProcessGuard() as guard:
        script = start_register(guard, zookeeper.hosts, zk_root, endpoint, "--model", "mnist_cnn",
                                "--max_batch_size", "64", "--meta", "owner=\"team-a\"", log_dir=tmp_path)
        time.sleep(1.5)
        assert script.poll() is None
        assert teacher_nodes(zk, zk_root) == {}, "registered before the teacher answered its health check"

        with TeacherServer(teacher_model.server_dir, port=port) as server:
            wait_for(lambda: teacher_nodes(zk, zk_root), 10, "registration after the first good health check")
            (first, doc), = teacher_nodes(zk, zk_root).items()
            assert doc["endpoint"] == endpoint and doc["model"] == "mnist_cnn"
            assert doc["max_batch_size"] == 64 and doc["owner"] == "team-a"
            assert zk.exists(f"{zk_root}/{SERVICE}/{first}").ephemeralOwner != 0

            os.kill(server.pid, signal.SIGSTOP)             # the teacher stops answering
            try:
                wait_for(lambda: teacher_nodes(zk, zk_root) == {}, 10, "deregistration of a silent teacher")
            finally:
                os.kill(server.pid, signal.SIGCONT)         # ... and recovers
            wait_for(lambda: teacher_nodes(zk, zk_root), 10, "re-registration after recovery")
            second = next(iter(teacher_nodes(zk, zk_root)))
            assert second != first

            os.kill(script.pid, signal.SIGSTOP)             # the script's session expires
            try:
                wait_for(lambda: teacher_nodes(zk, zk_root) == {}, 10, "ephemeral node gone with the session")
            finally:
                os.kill(script.pid, signal.SIGCONT)
            wait_for(lambda: teacher_nodes(zk, zk_root), 10, "node re-created in a new session")
            third, doc = next(iter(teacher_nodes(zk, zk_root).items()))
            assert third not in (first, second) and doc["endpoint"] == endpoint

            script.send_signal(signal.SIGTERM)
            assert script.wait(timeout=10) == 0
            assert teacher_nodes(zk, zk_root) == {}         # removed before exiting, not by session expiry


def test_teacher_server_registers_itself_and_leaves_on_sigterm(zookeeper, zk, zk_root, teacher_model, monkeypatch):
    monkeypatch.setenv("DISTILL_ZK_AUTH", "teacher:s3cret")          # the identity reaches the server's env only
    with TeacherServer(teacher_model.server_dir,
                       extra_args=["--zk", zookeeper.hosts, "--service", SERVICE, "--zk_root", zk_root]) as server:
        wait_for(lambda: teacher_nodes(zk, zk_root), 10, "teachers.serve --zk registration")
        (name, doc), = teacher_nodes(zk, zk_root).items()
        assert doc["endpoint"] == server.endpoint and doc["pid"] == server.pid
        wait_for(lambda: f"registered teacher {server.endpoint} {zk_root}/{SERVICE}/{name}" in server.log(), 10,
                 "the 'registered' line, once the node exists")
        assert f"registered {server.endpoint} as service" not in server.log()   # not claimed before it is true
        for path in (zk_root, f"{zk_root}/{SERVICE}", f"{zk_root}/{SERVICE}/{name}"):
            assert acl_set(zk.get_acls(path)[0]) == OWNED, path
        server.kill(signal.SIGTERM)
        assert server.wait_exit(30) == 0
        assert teacher_nodes(zk, zk_root) == {}


def test_sigkill_teacher_and_its_register_script_moves_its_share(zookeeper, zk, zk_root, teacher_model, tmp_path):
    with ProcessGuard() as guard, TeacherServer(teacher_model.server_dir) as one, \
            TeacherServer(teacher_model.server_dir) as two:
        scripts = {server.endpoint: start_register(guard, zookeeper.hosts, zk_root, server.endpoint,
                                                   log_dir=tmp_path) for server in (one, two)}
        servers = {one.endpoint: one, two.endpoint: two}
        subscription, recorder = subscribe(zookeeper.hosts, zk_root, require_max_teacher=1)
        try:
            wait_for(lambda: len(teacher_nodes(zk, zk_root)) == 2, 15, "two registrations")
            wait_for(lambda: assigner_view(subscription) and len(assigner_view(subscription).teachers) == 2
                     and recorder.last, 10, "student sees both")
            (used,) = recorder.last
            other = next(e for e in servers if e != used)
            servers[used].kill(signal.SIGKILL)
            scripts[used].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda: recorder.last == [other], 15, "share moving to the surviving teacher")
            moved_after = time.monotonic() - killed_at
            assert endpoints_of(teacher_nodes(zk, zk_root)) == [other]
            assert [] not in recorder.calls[recorder.calls.index([used]):]   # never without a teacher
            assert moved_after < SESSION + 5, moved_after
        finally:
            subscription.stop()


# -- ZooKeeper restart ------------------------------------------------------------------------------------
def test_zookeeper_restart_keeps_last_known_teachers_and_registrations_come_back(private_zookeeper, zk_root,
                                                                                tmp_path):
    zk_server = private_zookeeper
    ports = [free_port(), free_port()]
    endpoints = sorted(f"127.0.0.1:{p}" for p in ports)

    def registered_now():
        client = KazooClient(hosts=zk_server.hosts, timeout=SESSION)
        try:
            client.start(timeout=5)
            return endpoints_of(teacher_nodes(client, zk_root))
        except Exception:  # noqa: BLE001 - not up yet
            return []
        finally:
            client.stop()
            client.close()

    with ProcessGuard() as guard:
        start_health_server(guard, ports)
        scripts = [start_register(guard, zk_server.hosts, zk_root, e, log_dir=tmp_path) for e in endpoints]
        subscription, recorder = subscribe(zk_server.hosts, zk_root, require_max_teacher=2)
        try:
            wait_for(lambda: recorder.last == endpoints, 15, "student using both teachers")
            calls_before = len(recorder.calls)

            zk_server.stop(kill=True)                               # ZooKeeper dies ...
            wait_for(lambda: not subscription.connected, 10, "student noticing the outage")
            time.sleep(SESSION + 1.5)                               # ... for longer than the session timeout
            assert sorted(subscription.endpoints) == endpoints      # last known teachers kept
            assert len(recorder.calls) == calls_before              # and no change reported
            assert all(s.poll() is None for s in scripts)           # nobody exits

            zk_server.start()                                       # same port, same data dir
            wait_for(lambda: registered_now() == endpoints, 20, "registrations back after the restart")
            wait_for(lambda: subscription.connected and recorder.last == endpoints, 15, "student reconnected")
            wait_for(lambda: alive_connections(zk_server) >= 3, 15, "both register scripts reconnected")

            zk_server.stop()                                        # a restart that lost all data:
            shutil.rmtree(os.path.join(zk_server.data_dir, "version-2"), ignore_errors=True)
            zk_server.start()                                       # every session and node is gone
            wait_for(lambda: registered_now() == endpoints, 20, "registrations re-created in new sessions")
            wait_for(lambda: subscription.connected and subscription.node.created.is_set(), 15,
                     "student node re-created")
            wait_for(lambda: recorder.last == endpoints, 15, "student using both teachers again")
            assert all(s.poll() is None for s in scripts)
        finally:
            subscription.stop()


# -- fair share across real students ----------------------------------------------------------------------
def test_three_students_six_teachers_then_a_student_leaves(zookeeper, zk_root):
    ports = [free_port() for _ in range(6)]
    endpoints = [f"127.0.0.1:{p}" for p in ports]
    registrations = {}
    subscriptions = []
    with ProcessGuard() as guard:
        start_health_server(guard, ports)
        try:
            for endpoint in endpoints:
                registrations[endpoint] = TeacherRegistration(zookeeper.hosts, SERVICE, endpoint, root=zk_root,
                                                              health_interval=0.2, session_timeout=SESSION,
                                                              allow_open_acl=True).start()
            for endpoint in endpoints:
                registrations[endpoint].wait_registered(10)
            for name in ("s1", "s2", "s3"):   # join in this order
                subscriptions.append(subscribe(zookeeper.hosts, zk_root, require_max_teacher=2, student_id=name))
                wait_for(lambda: subscriptions[-1][0].node.created.is_set(), 10, f"student {name} registered")
            (s1, r1), (s2, r2), (s3, r3) = subscriptions

            def shares():
                return [set(s.endpoints) for s, _ in subscriptions if s.session.connected]

            def each_teacher_once(expected_teachers, students):
                sets = [set(s.endpoints) for s in students]
                used = [e for share in sets for e in share]
                return all(len(x) == 2 for x in sets) and sorted(used) == sorted(expected_teachers)

            wait_for(lambda: each_teacher_once(endpoints, [s1, s2, s3]), 10, "each teacher serving one student")
            before = {name: set(s.endpoints) for name, s in zip(("s1", "s2", "s3"), (s1, s2, s3))}

            s2.stop()                                              # the middle student leaves
            subscriptions.pop(1)
            wait_for(lambda: len(shares()) == 2 and
                     len(set(s1.endpoints) | set(s3.endpoints)) == 4, 10, "two students, two teachers each")
            time.sleep(0.3)
            assert set(s1.endpoints) == before["s1"]               # the older student keeps its teachers
            assert not set(s1.endpoints) & set(s3.endpoints)

            for endpoint in sorted(before["s1"]):                  # s1 loses both its teachers ...
                registrations.pop(endpoint).stop()
            remaining = sorted(set(endpoints) - before["s1"])
            wait_for(lambda: each_teacher_once(remaining, [s1, s3]), 10, "the others taking the leaver's teachers")
            assert before["s2"] <= set(s1.endpoints) | set(s3.endpoints)   # ... and the leaver's are in use again
            assert all(len(call) <= 2 for call in r1.calls + r3.calls)      # never more than require_max_teacher
        finally:
            for subscription, _ in subscriptions:
                subscription.stop()
            for registration in registrations.values():
                registration.stop()


# -- ACLs -------------------------------------------------------------------------------------------------
def test_with_auth_only_the_teachers_identity_writes_and_everyone_reads(zookeeper, zk, zk_root, tmp_path):
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    service_path = ServicePaths(zk_root, SERVICE).service_path
    with ProcessGuard() as guard:
        start_health_server(guard, [port])
        registration = TeacherRegistration(zookeeper.hosts, SERVICE, endpoint, root=zk_root, auth="teacher:s3cret",
                                           health_interval=0.2, session_timeout=SESSION).start()
        subscription, recorder = subscribe(zookeeper.hosts, zk_root)
        try:
            node = registration.wait_registered(10)
            wait_for(lambda: recorder.last == [endpoint], 10, "an anonymous student reading the teacher")
            wait_for(subscription.node.created.is_set, 10, "the anonymous student registering itself")

            assert json.loads(zk.get(node)[0])["endpoint"] == endpoint   # the anonymous client reads
            with pytest.raises(NoAuthError):
                zk.create(f"{service_path}/{TEACHER_PREFIX}", b'{"endpoint": "10.9.9.9:1"}', ephemeral=True,
                          sequence=True)
            with pytest.raises(NoAuthError):
                zk.delete(node)
            with pytest.raises(NoAuthError):
                zk.set(node, b'{"endpoint": "10.9.9.9:1"}')
            with pytest.raises(NoAuthError):
                zk.delete(f"{service_path}/students")
            assert teacher_nodes(zk, zk_root) == {node.rsplit("/", 1)[1]: json.loads(zk.get(node)[0])}

            impostor = start_register(guard, zookeeper.hosts, zk_root, endpoint, log_dir=tmp_path,
                                      env={"DISTILL_ZK_AUTH": "teacher:wrong"})
            assert impostor.wait(timeout=20) == 1
            log = (tmp_path / f"register-{endpoint.replace(':', '_')}.log").read_text()
            assert "not authorized as teacher" in log and "DISTILL_ZK_AUTH" in log
            assert len(teacher_nodes(zk, zk_root)) == 1
        finally:
            subscription.stop()
            registration.stop()
    assert teacher_nodes(zk, zk_root) == {}


def test_unreachable_zookeeper_is_waited_for_not_fatal(zk_root):
    dead = f"127.0.0.1:{free_port()}"
    recorder = Recorder()
    subscription = TeacherSubscription(dead, SERVICE, recorder, root=zk_root, session_timeout=SESSION)
    started = time.monotonic()
    subscription.start()                                   # returns at once, keeps reconnecting in the background
    try:
        assert time.monotonic() - started < 1.0
        with pytest.raises(NoTeachersError, match=rf"no teacher registered for service '{SERVICE}'.*NOT connected"):
            subscription.wait_for_teachers(timeout=1.5)
        assert recorder.calls == [] and subscription.endpoints == []
    finally:
        stopping = time.monotonic()
        subscription.stop()
        assert time.monotonic() - stopping < 5.0


def test_register_script_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        register_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--zk", "--service", "--endpoint", "--root", "--zk_auth", "--session_timeout", "--health_interval",
                 "--health_timeout", "--unhealthy_after", "--model", "--max_batch_size", "--version", "--meta",
                 "--log_level", "DISTILL_ZK_AUTH", "--allow_open_acl"):
        assert flag in text
    for argv, message in ((["--endpoint", "nohost"], "teacher endpoint 'nohost' is not 'host:port'"),
                          (["--endpoint", "0.0.0.0:9292"], "a wildcard address cannot be dialed"),
                          (["--endpoint", "h:70000"], "port '70000' is not a number in 1-65535"),
                          (["--endpoint", "127.0.0.1:1", "--zk_auth", "nopassword"], "must be 'user:password'"),
                          (["--endpoint", "127.0.0.1:1", "--service", "a/b"], "service name 'a/b'"),
                          (["--endpoint", "127.0.0.1:1", "--zk", "zk1:2181,bad host:1"],
                           "ZooKeeper host 'bad host:1'")):
        base = ["--zk", "127.0.0.1:1", "--service", SERVICE, "--allow_open_acl"]
        with pytest.raises(SystemExit) as exit_info:
            register_main(base + argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    env = dict(os.environ)
    env.pop("DISTILL_ZK_AUTH", None)
    code = subprocess.run([sys.executable, "-m", "discovery.register", "--zk", "127.0.0.1:1", "--service", SERVICE,
                           "--endpoint", "127.0.0.1:1"], env=env, capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert code.returncode == 2
    assert "no ZooKeeper identity" in code.stderr and "--allow_open_acl" in code.stderr, code.stderr


# -- untrusted nodes, squatting, open ACLs ----------------------------------------------------------------
def registration(hosts, root, endpoint, **kwargs):
    """An in-process registration of a teacher that is always healthy (what is under test is ZooKeeper)."""
    return TeacherRegistration(hosts, SERVICE, endpoint, root=root, health_interval=0.2, session_timeout=SESSION,
                               health_check=lambda: True, **kwargs).start()


def test_a_squatted_service_is_named_and_the_register_script_exits_1(zookeeper, zk, zk_root, tmp_path):
    zk.create(zk_root, b"", makepath=True)                              # an open root (created by anyone) ...
    mallory = KazooClient(hosts=zookeeper.hosts, timeout=SESSION, auth_data=[("digest", "mallory:evil")])
    mallory.start(timeout=10)
    try:                                                               # ... where another identity came first
        mallory.create(f"{zk_root}/{SERVICE}", b"", acl=[make_digest_acl("mallory", "evil", all=True),
                                                         make_acl("world", "anyone", read=True)])
        endpoint = f"127.0.0.1:{free_port()}"
        with ProcessGuard() as guard:
            start_health_server(guard, [int(endpoint.rsplit(":", 1)[1])])
            script = start_register(guard, zookeeper.hosts, zk_root, endpoint, log_dir=tmp_path,
                                    env={"DISTILL_ZK_AUTH": "teacher:s3cret"})
            assert script.wait(timeout=30) == 1
        log = (tmp_path / f"register-{endpoint.replace(':', '_')}.log").read_text()
        assert f"service {zk_root}/{SERVICE} is squatted: it was created first by identity mallory" in log, log
        assert "SQUATTED SERVICE" in log and "not by teacher" in log
        assert teacher_nodes(zk, zk_root) == {}
    finally:
        mallory.stop()
        mallory.close()


def test_an_open_service_is_claimed_and_teachers_registered_while_it_was_open_are_removed(zookeeper, zk, zk_root):
    service_path = f"{zk_root}/{SERVICE}"
    zk.create(f"{service_path}/students", b"", makepath=True, acl=OPEN_ACL_UNSAFE)   # e.g. an early student
    planted = zk.create(f"{service_path}/{TEACHER_PREFIX}", b'{"endpoint": "10.9.9.9:1"}', ephemeral=True,
                        sequence=True)                                 # an endpoint that would receive inputs
    subscription, recorder = subscribe(zookeeper.hosts, zk_root)
    real = registration(zookeeper.hosts, zk_root, "127.0.0.1:1", auth="teacher:s3cret")
    try:
        real.wait_registered(10)
        wait_for(lambda: recorder.last == ["127.0.0.1:1"], 10, "the student following only the real teacher")
        assert not zk.exists(planted)
        assert acl_set(zk.get_acls(service_path)[0]) == OWNED
        with pytest.raises(NoAuthError):                               # no second planting
            zk.create(f"{service_path}/{TEACHER_PREFIX}", b'{"endpoint": "10.9.9.9:1"}', ephemeral=True,
                      sequence=True)
        wait_for(subscription.node.created.is_set, 10, "the anonymous student still registering itself")
    finally:
        subscription.stop()
        real.stop()


def test_registration_without_identity_needs_allow_open_acl():
    with pytest.raises(ValueError, match="no ZooKeeper identity: set DISTILL_ZK_AUTH.*--allow_open_acl"):
        TeacherRegistration("127.0.0.1:1", SERVICE, "127.0.0.1:2")


def test_bad_nodes_are_skipped_with_a_warning_and_students_keep_following(zookeeper, zk, zk_root, caplog):
    first = registration(zookeeper.hosts, zk_root, "127.0.0.1:1", allow_open_acl=True)
    subscription, recorder = subscribe(zookeeper.hosts, zk_root, require_max_teacher=2)
    second = None
    try:
        first.wait_registered(10)
        wait_for(lambda: recorder.last == ["127.0.0.1:1"], 10, "the student following the first teacher")
        students = f"{zk_root}/{SERVICE}/students"
        bad_students = {
            "deeply nested": b"[" * 20000 + b"]" * 20000,
            "huge": b'{"student_id": "' + b"x" * 900_000 + b'"}',
            "not UTF-8": b"\xff\xfe\x00{",
            "not an object": b"[1, 2]",
            "absurd maximum": b'{"student_id": "greedy", "require_max_teacher": 1000000000}',
        }
        for data in bad_students.values():
            zk.create(f"{students}/student-", data, ephemeral=True, sequence=True)
        for data in (b"{" * 30 + b"}" * 30, b'{"endpoint": "0.0.0.0:1"}', b'{"model": "no endpoint"}'):
            zk.create(f"{zk_root}/{SERVICE}/{TEACHER_PREFIX}", data, ephemeral=True, sequence=True)
        second = registration(zookeeper.hosts, zk_root, "127.0.0.1:2", allow_open_acl=True)
        wait_for(lambda: recorder.last == ["127.0.0.1:1", "127.0.0.1:2"], 10, "the student following a new teacher")
        assert subscription.assigner.watcher._thread.is_alive()
        assert [s.student_id for s in assigner_view(subscription).students] == [subscription.student_id]
        assert [t.endpoint for t in assigner_view(subscription).teachers] == ["127.0.0.1:1", "127.0.0.1:2"]
        warnings = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
        assert sum("JSON nested 17 deep (at most 16 accepted)" in w for w in warnings) == 2   # the scan stops there
        for reason in ("bytes of data (at most 65536 accepted)", "not UTF-8 JSON",
                       "JSON list, not an object", "'require_max_teacher' 1000000000 is not an integer",
                       "a wildcard address cannot be dialed", "no 'endpoint' field"):
            assert any(reason in w for w in warnings), (reason, warnings)
        assert len(warnings) == 8                                     # each bad node is reported once
    finally:
        subscription.stop()
        first.stop()
        if second is not None:
            second.stop()


def test_a_student_reads_each_teacher_node_once(zookeeper, zk_root):
    teachers = [registration(zookeeper.hosts, zk_root, f"127.0.0.1:{port}", allow_open_acl=True)
                for port in range(1, 6)]
    subscription, recorder = subscribe(zookeeper.hosts, zk_root, require_max_teacher=8)
    try:
        wait_for(lambda: recorder.last is not None and len(recorder.last) == 5, 15, "five teachers")
        reads = subscription.assigner.watcher.teachers     # the assigner (this only student) reads every node
        assert reads.reads == 5 and subscription.teacher_reads == 5   # the student only those assigned to it
        teachers.append(registration(zookeeper.hosts, zk_root, "127.0.0.1:6", allow_open_acl=True))
        wait_for(lambda: len(recorder.last) == 6, 10, "the sixth teacher")
        assert reads.reads == 6 and subscription.teacher_reads == 6   # only the new node was read
        teachers.pop(0).stop()
        wait_for(lambda: len(recorder.last) == 5, 10, "a teacher leaving")
        assert reads.reads == 6 and subscription.teacher_reads == 6   # a node leaving costs no read
    finally:
        subscription.stop()
        for teacher in teachers:
            teacher.stop()


def test_zookeeper_hosts_are_checked_and_keep_kazoo_forms():
    from discovery.arguments import normalize_hosts
    assert normalize_hosts("zk1, zk2:2182/distill/prod") == "zk1:2181,zk2:2182/distill/prod"   # default port, chroot
    assert normalize_hosts(["[::1]:2181", "zk3:2183"]) == "[::1]:2181,zk3:2183"
    for bad, message in (("", "no ZooKeeper host given"), ("zk1:21x", "ZooKeeper host 'zk1:21x': port '21x'"),
                         ("zk1,bad host", "ZooKeeper host 'bad host'")):
        with pytest.raises(ValueError, match=message):
            TeacherSubscription(bad, SERVICE, print)
