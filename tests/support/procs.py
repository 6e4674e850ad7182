"""Free ports, readiness waits and a guard that stops the processes a test started, even on failure."""
from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The MNIST example's tests read what the README's setup installs (Debian's dataset-fashion-mnist), never a folder
# outside the clone; DISTILL_MNIST_DIR points them at other MNIST-format IDX files.
MNIST_DIR = os.environ.get("DISTILL_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


_PR_SET_PDEATHSIG = 1
_libc_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the test process dies, even by SIGKILL or a timeout. SIGKILL,
    not SIGTERM: a child the test froze with SIGSTOP would keep a SIGTERM pending, frozen forever."""
    _libc_prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _default_interrupts()


def _default_interrupts() -> None:
    """In the child, before exec: SIGINT and SIGQUIT at their defaults, as under a terminal. A test run started in
    the background by a non-interactive shell (``cmd &``) inherits them ignored, and a child that ignores Ctrl-C
    cannot show how the code under test handles it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


_PORTS = random.SystemRandom()   # not the global generator: tests seed that, and two runs side by side would agree


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (net.ipv4.ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on every address right now, drawn at random below the kernel's ephemeral range.

    Not the port the kernel gives ``bind(0)``: that one comes from the range outgoing connections use, so between
    the test picking it and its server binding it a connection of another process (another test run beside, a
    worker) could take it ("cannot bind ... already in use", seen with two copies of the suite running)."""
    low, _high = _ephemeral_range()
    if low > 11024:
        for _ in range(200):
            port = _PORTS.randint(max(1024, low - 20000), low - 1)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ProcessGuard:
    """Start subprocesses and make sure every one of them is stopped at ``close()`` (use as a context manager).

    Each child runs in its own session (so a signal to it reaches its own children too) and, when started from
    the main thread, gets SIGKILL from the kernel if the test process dies without reaching ``close()``
    (pytest killed by a timeout).
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: Sequence[str], env: Optional[dict] = None, **kwargs) -> subprocess.Popen:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        if threading.current_thread() is threading.main_thread():
            # PDEATHSIG fires when the *thread* that forked exits: only safe from the main thread.
            kwargs.setdefault("preexec_fn", _die_with_parent)
        else:
            kwargs.setdefault("preexec_fn", _default_interrupts)
        proc = subprocess.Popen(list(args), env=full_env, cwd=kwargs.pop("cwd", REPO_ROOT),
                                start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def python(self, *args: str, **kwargs) -> subprocess.Popen:
        return self.start([sys.executable, *args], **kwargs)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()

    def __enter__(self) -> ProcessGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
