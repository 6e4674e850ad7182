"""DistillReader with teachers found in ZooKeeper (set_dynamic_teacher), against a real ZooKeeper, real teacher
servers, real register-script processes and real signals, while an epoch runs: teachers scale 1 -> 4 -> 1, a
teacher and its register script are SIGKILLed, ZooKeeper restarts. Every sample comes out exactly once, in order,
with the teacher's prediction for it."""
from __future__ import annotations

import signal
import subprocess
import threading
import time

import numpy as np  # noqa: I001  (numpy before paddle)
import pytest
from kazoo.client import KazooClient

from distill_reader import DistillReader
from tests.support.procs import ProcessGuard, wait_for
from tests.support.teacher import TeacherServer, mnist_like_images, reference_predict
from tests.support.zookeeper import registered_endpoints

pytestmark = pytest.mark.one_line   # run on one paddle line (tests/conftest.py)

SERVICE = "mnist_teacher"
SESSION = 2.0          # ZooKeeper session timeout of the students and register scripts in these tests


def dynamic_reader(teacher_model, hosts, root, require_max_teacher):
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"], all_teachers_down_timeout=60.0,
                       probe_backoff=0.1, max_probe_backoff=0.5)
    dr.set_serving_conf_file(teacher_model.client_conf)
    dr.set_teacher_batch_size(8)
    dr.set_dynamic_teacher(hosts, SERVICE, require_max_teacher=require_max_teacher, root=root,
                           session_timeout=SESSION)
    return dr


def sample_lists(images, list_size):
    def generator():
        for start in range(0, len(images), list_size):
            yield [(images[i], i) for i in range(start, min(start + list_size, len(images)))]
    return generator


def check_epoch(out, images, reference):
    assert [s[1] for s in out] == list(range(len(images))), "every sample exactly once, in order"
    np.testing.assert_allclose(np.stack([s[2] for s in out]), reference, rtol=1e-5, atol=1e-6)


def registered(hosts, root):
    """Endpoints registered under the service now ([] when ZooKeeper does not answer)."""
    try:
        return registered_endpoints(hosts, root, SERVICE, start_timeout=5)
    except Exception:  # noqa: BLE001 - down or a node vanished while reading: ask again
        return []


def start_servers(servers):
    """Start teacher servers side by side (each start waits for SERVING); returns them."""
    errors = []

    def start(server):
        try:
            server.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(server,)) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return servers


def start_register(guard, hosts, root, endpoint, log_path):
    log = open(log_path, "ab")
    proc = guard.python("-m", "discovery.register", "--zk", hosts, "--service", SERVICE, "--root", root,
                        "--endpoint", endpoint, "--session_timeout", str(SESSION), "--health_interval", "0.2",
                        "--health_timeout", "0.5", "--allow_open_acl", stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def test_scale_one_to_four_to_one_teachers_during_an_epoch(zookeeper, zk_root, teacher_model):
    n, list_size = 1600, 16
    images = mnist_like_images(n, seed=31)
    reference = reference_predict(teacher_model.server_dir, images)
    zk_args = ["--zk", zookeeper.hosts, "--service", SERVICE, "--zk_root", zk_root,   # teachers register themselves
               "--allow_open_acl"]
    servers = [TeacherServer(teacher_model.server_dir, extra_args=zk_args) for _ in range(4)]
    first, added = servers[0], servers[1:]
    dr = None
    try:
        first.start()
        dr = dynamic_reader(teacher_model, zookeeper.hosts, zk_root, require_max_teacher=4)
        wait_for(lambda: dr.pool.endpoints == [first.endpoint], 15, "the reader finding the first teacher")
        scale_up = threading.Thread(target=start_servers, args=(added,))
        out = []
        for step, batch in enumerate(dr.set_sample_list_generator(sample_lists(images, list_size))()):
            out.extend(batch)
            if step == 5:
                scale_up.start()                               # 1 -> 4 while the epoch runs
            if step == 30:
                scale_up.join(120)
                wait_for(lambda: len(dr.pool.endpoints) == 4, 10, "the reader using four teachers")
            if step == 70:
                assert sorted(dr.pool.endpoints) == sorted(s.endpoint for s in servers)
                for server in added:                           # 4 -> 1: SIGTERM deregisters, then drains
                    server.kill(signal.SIGTERM)
            time.sleep(0.01)
        check_epoch(out, images, reference)
        requests = {e: t["requests"] for e, t in dr.last_epoch_stats.teachers.items()}
        assert all(requests.get(s.endpoint, 0) > 0 for s in servers), requests   # each of the four was used
        wait_for(lambda: dr.pool.endpoints == [first.endpoint], 10, "the reader back to one teacher")
        assert all(server.wait_exit(30) == 0 for server in added)

        few = images[:320]
        out = [s for batch in dr.set_sample_list_generator(sample_lists(few, list_size))() for s in batch]
        check_epoch(out, few, reference[:320])                 # the next epoch runs on the one left
        assert set(dr.last_epoch_stats.teachers) == {first.endpoint}
    finally:
        if dr is not None:
            dr.close()
        for server in servers:
            server.close()


def test_sigkill_teacher_and_register_script_mid_epoch_loses_nothing(zookeeper, zk_root, teacher_model, tmp_path):
    n, list_size = 1200, 16
    images = mnist_like_images(n, seed=32)
    reference = reference_predict(teacher_model.server_dir, images)
    servers = {}
    dr = None
    with ProcessGuard() as guard:
        try:
            servers = {s.endpoint: s for s in start_servers([TeacherServer(teacher_model.server_dir)
                                                             for _ in range(3)])}
            scripts = {e: start_register(guard, zookeeper.hosts, zk_root, e, tmp_path / f"reg{i}.log")
                       for i, e in enumerate(servers)}
            wait_for(lambda: registered(zookeeper.hosts, zk_root) == sorted(servers), 20, "three registrations")
            dr = dynamic_reader(teacher_model, zookeeper.hosts, zk_root, require_max_teacher=2)
            wait_for(lambda: len(dr.pool.endpoints) == 2, 15, "the reader using its two teachers")
            victim = spare = None
            out = []
            for step, batch in enumerate(dr.set_sample_list_generator(sample_lists(images, list_size))()):
                out.extend(batch)
                if step == 15:
                    victim = dr.pool.endpoints[0]
                    spare = next(e for e in servers if e not in dr.pool.endpoints)
                    servers[victim].kill(signal.SIGKILL)       # the teacher and its register script die
                    scripts[victim].send_signal(signal.SIGKILL)
                if step == 40:                                 # its node expires; its share moves to the spare
                    wait_for(lambda v=victim, s=spare: s in dr.pool.endpoints and v not in dr.pool.endpoints,
                             SESSION + 10, "the victim's share moving to the spare teacher")
                time.sleep(0.01)
            check_epoch(out, images, reference)
            stats = dr.last_epoch_stats.teachers
            assert stats[victim]["requests"] > 0 and stats[spare]["requests"] > 0, stats
            assert registered(zookeeper.hosts, zk_root) == sorted(e for e in servers if e != victim)
        finally:
            if dr is not None:
                dr.close()
            for server in servers.values():
                server.close()


def test_zookeeper_restart_during_an_epoch(private_zookeeper, zk_root, teacher_model, tmp_path):
    n, list_size = 1200, 16
    images = mnist_like_images(n, seed=33)
    reference = reference_predict(teacher_model.server_dir, images)
    zk_server = private_zookeeper
    servers = []
    dr = None
    with ProcessGuard() as guard:
        try:
            servers = start_servers([TeacherServer(teacher_model.server_dir) for _ in range(2)])
            endpoints = sorted(s.endpoint for s in servers)
            scripts = [start_register(guard, zk_server.hosts, zk_root, e, tmp_path / f"reg{i}.log")
                       for i, e in enumerate(endpoints)]
            dr = dynamic_reader(teacher_model, zk_server.hosts, zk_root, require_max_teacher=2)
            wait_for(lambda: sorted(dr.pool.endpoints) == endpoints, 20, "the reader using both teachers")
            out = []
            down_at = None
            for step, batch in enumerate(dr.set_sample_list_generator(sample_lists(images, list_size))()):
                out.extend(batch)
                if step == 10:
                    zk_server.stop(kill=True)                  # ZooKeeper dies mid-epoch
                    down_at = time.monotonic()
                if step == 40:
                    assert sorted(dr.pool.endpoints) == endpoints   # training went on with the last known teachers
                    time.sleep(max(0.0, SESSION + 1.0 - (time.monotonic() - down_at)))
                    zk_server.start()                          # ... and comes back after the session timeout
                if step == 50:
                    wait_for(lambda: registered(zk_server.hosts, zk_root) == endpoints, 20, "registrations back")
                time.sleep(0.01)
            check_epoch(out, images, reference)
            stats = dr.last_epoch_stats.teachers            # a teacher never asked has no entry: look each one up
            assert all(stats.get(e, {}).get("requests", 0) > 0 for e in endpoints), stats
            assert sorted(dr.pool.endpoints) == endpoints
            assert all(script.poll() is None for script in scripts)
        finally:
            if dr is not None:
                dr.close()
            for server in servers:
                server.close()


CHILD_STUDENT = """
import sys, time
from discovery.student import TeacherSubscription
hosts, root, name = sys.argv[1:4]
TeacherSubscription(hosts, "mnist_teacher", lambda endpoints: None, require_max_teacher=1, root=root,
                    student_id=name, session_timeout=float(sys.argv[4])).start()
while True:
    time.sleep(1)
"""


def test_the_assigner_stopped_then_killed_mid_epoch_the_reader_follows_its_assignment(zookeeper, zk_root,
                                                                                      teacher_model, tmp_path):
    """Another student process is the assigner; it is SIGSTOPped past its session (deposed), resumed, then
    SIGKILLed while the reader iterates and students come and go: nothing lost, and the reader ends on exactly
    the teachers its stored assignment names."""
    from discovery.arguments import ServicePaths
    from discovery.nodes import parse_assignment

    n, list_size = 1200, 16
    images = mnist_like_images(n, seed=34)
    reference = reference_predict(teacher_model.server_dir, images)
    servers, dr = [], None
    paths = ServicePaths(zk_root, SERVICE)
    client = KazooClient(hosts=zookeeper.hosts, timeout=SESSION)
    client.start(timeout=10)
    with ProcessGuard() as guard:
        try:
            servers = start_servers([TeacherServer(teacher_model.server_dir) for _ in range(3)])
            for i, server in enumerate(servers):
                start_register(guard, zookeeper.hosts, zk_root, server.endpoint, tmp_path / f"reg{i}.log")
            wait_for(lambda: len(registered(zookeeper.hosts, zk_root)) == 3, 20, "three registrations")
            assigner = guard.python("-c", CHILD_STUDENT, zookeeper.hosts, zk_root, "assigner", str(SESSION),
                                    stdout=subprocess.DEVNULL)
            wait_for(lambda: client.exists(paths.assigner_lock_path) and client.get_children(paths.assigner_lock_path),
                     20, "the child student contending first")
            dr = dynamic_reader(teacher_model, zookeeper.hosts, zk_root, require_max_teacher=2)
            wait_for(lambda: len(dr.pool.endpoints) == 2, 15, "the reader using its two teachers")
            subscription = dr._resources.subscription
            assert not subscription.assigner.leading.is_set()
            others, out = [], []
            for step, batch in enumerate(dr.set_sample_list_generator(sample_lists(images, list_size))()):
                out.extend(batch)
                if step == 5:
                    assigner.send_signal(signal.SIGSTOP)        # past its session: deposed
                    others.append(guard.python("-c", CHILD_STUDENT, zookeeper.hosts, zk_root, "late", str(SESSION),
                                               stdout=subprocess.DEVNULL))
                if step == 25:
                    wait_for(subscription.assigner.leading.is_set, SESSION + 10, "the reader's student taking over")
                    assigner.send_signal(signal.SIGCONT)
                if step == 40:
                    others.pop().send_signal(signal.SIGKILL)
                    assigner.send_signal(signal.SIGKILL)
                time.sleep(0.01)
            check_epoch(out, images, reference)
            me = subscription.node.path.rsplit("/", 1)[-1]

            def agrees():
                names = [n for n in client.get_children(paths.assignment_path) if n.startswith("student-")]
                value = client.get(paths.assignment_of(me))[0]
                return names == [me] and sorted(parse_assignment(me, value).endpoints) == sorted(dr.pool.endpoints)
            wait_for(agrees, SESSION + 15, "the reader alone, on the teachers its assignment names")
            assert len(dr.pool.endpoints) == 2 and not subscription.fallback.is_set()
        finally:
            client.stop()
            client.close()
            if dr is not None:
                dr.close()
            for server in servers:
                server.close()
