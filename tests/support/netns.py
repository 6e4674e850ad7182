"""Network namespaces for fault tests (issue 25): a process of the test's own behind a veth link it can cut.

Each ``Namespace`` is a fresh ``ip netns`` joined to the test's (root) namespace by one veth pair on a private
/30 (``host_address`` on the root side, ``address`` inside), with its own loopback. Processes run inside with
``exec_args`` / ``guard``. Faults, all inside the namespace, so no other traffic on the machine is touched:

- ``black_hole()``: a blackhole route for the root side's address: whatever the namespace sends to the test is
  dropped, so the test's packets get no ACK and no RST (a dead host, a cut cable); ``heal()`` removes it.
  Packets still arrive inside: the processes there see the test's requests but cannot answer.
- ``delay(ms)``: every packet the namespace receives from the test's side is taken in ``ms`` later (an iptables
  NFQUEUE rule on INPUT and tests/support/nfqueue_delay.py inside; this kernel has no sch_netem), so the round
  trip grows by ``ms`` and the kernels still do the TCP (data and ACKs arrive late, as over a long link);
  ``delay(0)`` heals it. Held on the way in, not on the way out: a packet held in the namespace's OUTPUT still
  counts against its sender's TCP Small Queues (about 2 segments or 1 ms of pacing per socket until released),
  so a teacher behind an OUTPUT delay could send only ~2 segments per delay (~7 answers/s at 300 ms), which no
  real link does (measured: 7.5 answers/s with 8 requests in flight, 18.5-20 held on INPUT; issue 25).
- ``lose(p)``: iptables' statistic match drops that fraction of what it sends to the test's side at random
  (answers and ACKs); ``lose(0)`` heals it. Both need ``iptables`` (``iptables_unavailable()`` says why not).

Needs root (CAP_NET_ADMIN) and ``ip`` (iproute2); ``unavailable()`` says why not, for a skip. ``namespaces()``
makes namespaces on demand and, even on failure, stops their processes and deletes them (the veth pair goes with
the namespace); ``NamespacedTeacher`` is a real ``teachers.serve`` inside one. Namespaces left by a test process
that was SIGKILLed are deleted by the next run.

Example::

    with namespaces() as make:
        ns = make()
        with NamespacedTeacher(ns, model_dir) as teacher:     # teacher.endpoint: "<ns.address>:<port>"
            ns.black_hole(); ...; ns.heal()
"""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional, Sequence

from .procs import ProcessGuard, pid_alive
from .teacher import TeacherServer
from .zookeeper import ZooKeeperServer

PREFIX = "drnf-"          # namespace names: drnf-<test pid>-<n>
_count = itertools.count()


def _ip(*args: str, namespace: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable() -> Optional[str]:
    """Why network namespaces cannot be made here (None when they can)."""
    if shutil.which("ip") is None:
        return "network fault tests need iproute2's `ip` (Debian package iproute2)"
    if os.geteuid() != 0:
        return "network fault tests need root (CAP_NET_ADMIN) to make network namespaces and veth links"
    name = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def iptables_unavailable() -> Optional[str]:
    """Why the latency and loss faults cannot be made here (None when they can)."""
    if shutil.which("iptables") is None:
        return "latency and loss faults need iptables (Debian package iptables; scripts/setup.sh installs it)"
    return unavailable()


def remove_stale() -> None:
    """Delete the namespaces of test processes that are gone (killed before their teardown)."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        if name.startswith(PREFIX):
            pid = name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                _ip("netns", "del", name, check=False)


class _NamespaceGuard(ProcessGuard):
    """A ProcessGuard whose ``python(...)`` runs inside the namespace (``ip netns exec`` execs: same pid)."""

    def __init__(self, namespace: Namespace):
        super().__init__()
        self.namespace = namespace

    def python(self, *args: str, **kwargs) -> subprocess.Popen:
        return self.start(self.namespace.exec_args([sys.executable, *args]), **kwargs)


class Namespace:
    """One namespace behind a veth pair on a private /30; ``close()`` stops its processes and deletes it."""

    def __init__(self) -> None:
        n = next(_count)
        self.name = f"{PREFIX}{os.getpid()}-{n}"
        tag = f"{os.getpid() % 100000}{n}"[-9:]
        self.host_link, self.inner_link = f"drh{tag}", f"drn{tag}"
        net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.{4 * random.randint(0, 63)}"
        base = net.rsplit(".", 1)
        self.host_address = f"{base[0]}.{int(base[1]) + 1}"
        self.address = f"{base[0]}.{int(base[1]) + 2}"
        self.guard = _NamespaceGuard(self)
        self.black_holed = False
        self._delay_file: Optional[str] = None
        self._loss: Optional[str] = None

    def create(self) -> Namespace:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.inner_link)
            _ip("link", "set", self.inner_link, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            _ip("addr", "add", f"{self.address}/30", "dev", self.inner_link, namespace=self.name)
            _ip("link", "set", self.inner_link, "up", namespace=self.name)
            _ip("link", "set", "lo", "up", namespace=self.name)
        except Exception:
            self.close()
            raise
        return self

    def exec_args(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def black_hole(self) -> None:
        """Drop everything the namespace sends to the test's side: no ACK, no RST, no ICMP reaches the test."""
        _ip("route", "add", "blackhole", f"{self.host_address}/32", namespace=self.name)
        self.black_holed = True

    def heal(self) -> None:
        _ip("route", "del", "blackhole", f"{self.host_address}/32", namespace=self.name)
        self.black_holed = False

    def _iptables(self, *args: str) -> None:
        command = self.exec_args(["iptables", *args])
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")

    def delay(self, ms: float) -> None:
        """Delay what the namespace receives from the test's side by ``ms`` milliseconds (0: none)."""
        if self._delay_file is None:
            fd, self._delay_file = tempfile.mkstemp(prefix=f"{self.name}-delay-")
            os.close(fd)
            with open(self._delay_file, "w") as f:
                f.write(str(ms))
            delayer = self.guard.python(os.path.join(os.path.dirname(os.path.abspath(__file__)), "nfqueue_delay.py"),
                                        "--queue", "1", "--delay_file", self._delay_file, stdout=subprocess.PIPE)
            if delayer.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"nfqueue_delay.py did not start in {self.name}")
            self._iptables("-A", "INPUT", "-s", self.host_address, "-j", "NFQUEUE", "--queue-num", "1")
            return
        with open(self._delay_file + ".new", "w") as f:
            f.write(str(ms))
        os.replace(self._delay_file + ".new", self._delay_file)
        time.sleep(0.3)   # read every 0.2 s

    def lose(self, fraction: float) -> None:
        """Drop ``fraction`` of what the namespace sends to the test's side, at random (0: none)."""
        if self._loss is not None:
            self._iptables("-D", "OUTPUT", "-d", self.host_address, "-m", "statistic", "--mode", "random",
                           "--probability", self._loss, "-j", "DROP")
            self._loss = None
        if fraction > 0:
            self._loss = f"{fraction:g}"
            self._iptables("-I", "OUTPUT", "-d", self.host_address, "-m", "statistic", "--mode", "random",
                           "--probability", self._loss, "-j", "DROP")

    def close(self) -> None:
        self.guard.close()
        if self._delay_file is not None:
            for path in (self._delay_file, self._delay_file + ".new"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        for pid in _ip("netns", "pids", self.name, check=False).stdout.split():   # anything else started inside
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", self.name, check=False)          # the veth pair goes with it
        _ip("link", "del", self.host_link, check=False)      # (if the namespace was never given its end)


@contextlib.contextmanager
def namespaces() -> Iterator[Callable[[], Namespace]]:
    """A factory of ``Namespace`` s; every one is stopped and deleted on exit, even on failure (a test module's
    fixture wraps it, skipping with ``unavailable()`` s reason where namespaces cannot be made)."""
    remove_stale()
    made: list[Namespace] = []

    def make() -> Namespace:
        namespace = Namespace()
        made.append(namespace)
        return namespace.create()

    try:
        yield make
    finally:
        for namespace in made:
            namespace.close()


class NamespacedTeacher(TeacherServer):
    """A real ``teachers.serve`` inside ``namespace``, listening on its address (``.endpoint``)."""

    def __init__(self, namespace: Namespace, model_dir: str, **kwargs):
        super().__init__(model_dir, **kwargs)
        self.namespace = namespace
        self.args[self.args.index("--host") + 1] = namespace.address
        self._guard = namespace.guard

    @property
    def endpoint(self) -> str:
        return f"{self.namespace.address}:{self.port}"


class NamespacedZooKeeper(ZooKeeperServer):
    """A real ZooKeeper (``scripts/zookeeper.sh run``) inside ``namespace``, on its address (``.hosts``)."""

    def __init__(self, namespace: Namespace):
        super().__init__(port=2181)
        self.address = namespace.address
        self.command_prefix = ("ip", "netns", "exec", namespace.name)
