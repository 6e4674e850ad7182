"""Fixtures for a real ZooKeeper server (owned by the discovery work).

- ``zookeeper`` (session scope): a ZooKeeper started with ``scripts/zookeeper.sh run`` on a free loopback port and a
  temporary data dir, stopped at the end of the session even on failure; or, when ``DISTILL_ZK_HOSTS`` is set,
  that existing ensemble (then it is neither started nor stopped).
- ``private_zookeeper`` (function scope): always a server of the test's own, for tests that stop or restart it
  (``restart()`` keeps the port and the data dir, so sessions and persistent nodes survive;
  ``restart(wipe=True)`` empties the data dir: a new, empty server on the same port).
Tests should use a unique ZooKeeper root (``zk_root`` fixture) so they never see each other's nodes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Iterator, Optional

import pytest

from .procs import REPO_ROOT, free_port, wait_for

SCRIPT = os.path.join(REPO_ROOT, "scripts", "zookeeper.sh")
HOSTS_ENV = "DISTILL_ZK_HOSTS"


def four_letter_word(host: str, port: int, word: str, timeout: float = 1.0) -> str:
    """The server's whole answer to a four-letter word ('' when it does not answer)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(word.encode())
            chunks = []
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return b"".join(chunks).decode(errors="replace")
                chunks.append(chunk)
    except OSError:
        return ""


def ruok(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when the server answers ``ruok`` with ``imok`` and ``srvr`` with its mode (it serves sessions)."""
    return (four_letter_word(host, port, "ruok", timeout) == "imok"
            and "Mode: " in four_letter_word(host, port, "srvr", timeout))


class ZooKeeperServer:
    """A single ZooKeeper server on 127.0.0.1 run by ``scripts/zookeeper.sh run``; the owner stops it."""

    def __init__(self, port: Optional[int] = None, data_dir: Optional[str] = None):
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="distill-zk-")
        self.data_dir = data_dir or self._tmp
        self.proc: Optional[subprocess.Popen] = None
        self.owned = True

    address = "127.0.0.1"       # where it listens (ZK_ADDRESS of scripts/zookeeper.sh)
    command_prefix: tuple = ()  # e.g. ("ip", "netns", "exec", NAME): run it inside a network namespace

    @property
    def hosts(self) -> str:
        return f"{self.address}:{self.port}"

    def ready(self) -> bool:
        return ruok(self.address, self.port)

    def start(self, timeout: float = 30.0) -> ZooKeeperServer:
        if not os.path.exists("/usr/share/java/zookeeper.jar") and "ZK_JAR" not in os.environ:
            raise RuntimeError("ZooKeeper jar missing: run scripts/setup.sh (Debian package libzookeeper-java) "
                               f"or set {HOSTS_ENV} to an existing ensemble")
        log = open(os.path.join(self.data_dir, "zookeeper.log"), "ab")
        env = dict(os.environ, WATCH_PID=str(os.getpid()), ZK_ADDRESS=self.address)
        self.proc = subprocess.Popen([*self.command_prefix, "bash", SCRIPT, "run", str(self.port), self.data_dir],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        log.close()
        try:
            wait_for(lambda: self.ready() or self.proc.poll() is not None, timeout, f"ZooKeeper on {self.hosts}")
        except AssertionError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}; log:\n{self.log_tail()}")
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, SIGKILL after 10 s; ``kill=True``: SIGKILL at once)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        _signal_group(proc.pid, signal.SIGKILL)   # anything left in its group (the JVM after a bash crash)
        wait_for(lambda: not self.ready(), 10, f"ZooKeeper on {self.hosts} to stop")

    def restart(self, downtime: float = 0.0, kill: bool = False, wipe: bool = False) -> None:
        """Stop, stay down ``downtime`` seconds, start again on the same port and data dir (``wipe``: emptied of
        its snapshots and logs, so every session and node is gone and the transaction ids start again at 0)."""
        self.stop(kill=kill)
        if wipe:
            shutil.rmtree(os.path.join(self.data_dir, "version-2"), ignore_errors=True)
        time.sleep(downtime)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(os.path.join(self.data_dir, "zookeeper.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


class ExternalZooKeeper:
    """An ensemble given by ``DISTILL_ZK_HOSTS``: used as is, never stopped."""

    owned = False

    def __init__(self, hosts: str):
        self.hosts = hosts

    def ready(self) -> bool:
        host, _, port = self.hosts.split(",")[0].partition(":")
        return ruok(host, int(port or 2181))

    def restart(self, *args, **kwargs) -> None:
        raise RuntimeError(f"cannot restart the external ZooKeeper {self.hosts}; use private_zookeeper")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="session")
def zookeeper() -> Iterator[object]:
    """The session's ZooKeeper (``.hosts``): the one in DISTILL_ZK_HOSTS, or one started here."""
    hosts = os.environ.get(HOSTS_ENV)
    if hosts:
        yield ExternalZooKeeper(hosts)
        return
    with _running_zookeeper() as server:
        yield server


@pytest.fixture
def private_zookeeper() -> Iterator[ZooKeeperServer]:
    """A ZooKeeper of this test only, which it may stop and restart."""
    with _running_zookeeper() as server:
        yield server


@contextlib.contextmanager
def _running_zookeeper() -> Iterator[ZooKeeperServer]:
    """A started ZooKeeperServer, closed on the way out even when starting it failed half-way."""
    server = ZooKeeperServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def kazoo_client(hosts: str, timeout: float = 2.0, start_timeout: float = 10.0) -> Iterator[object]:
    """A started kazoo client of ``hosts`` (session ``timeout`` s), stopped and closed on the way out."""
    from kazoo.client import KazooClient

    client = KazooClient(hosts=hosts, timeout=timeout)
    client.start(timeout=start_timeout)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def registered_endpoints(hosts: str, root: str, service: str, start_timeout: float = 5.0) -> list[str]:
    """The endpoints of the teacher nodes under ``root/service`` now, sorted; raises what kazoo raises when
    ZooKeeper does not answer or a node vanishes while being read."""
    from discovery.arguments import TEACHER_PREFIX

    with kazoo_client(hosts, start_timeout=start_timeout) as client:
        path = f"{root}/{service}"
        names = [n for n in client.get_children(path) if n.startswith(TEACHER_PREFIX)] if client.exists(path) else []
        return sorted(json.loads(client.get(f"{path}/{n}")[0])["endpoint"] for n in names)


@pytest.fixture
def zk(zookeeper) -> Iterator[object]:
    """A connected kazoo client of the session's ZooKeeper, to look at and tamper with nodes from outside."""
    with kazoo_client(zookeeper.hosts) as client:
        yield client


@pytest.fixture
def zk_root() -> str:
    """A ZooKeeper root no other test uses."""
    return f"/distill-test-{uuid.uuid4().hex[:8]}"
