"""The typed student-worker protocol (distill_reader.worker_messages), WorkerSettings and the one SIGTERM->SIGKILL
ladder (distill_reader.workers.stop_processes). Real processes and real signals for the ladder; the reader's tests
(test_reader*, test_reader_faults, test_reader_gray) run the protocol end to end with real workers."""
from __future__ import annotations

import dataclasses
import inspect
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distill_base.client_security import ClientSecurity
from distill_base.serving_config import ConfigError
from distill_reader.errors import DistillReaderError
from distill_reader.padding import Padding
from distill_reader.worker_messages import (
    Crashed,
    Done,
    Failed,
    FailureKind,
    Forget,
    Init,
    MapBuffer,
    Probe,
    ProbeResult,
    Ready,
    SharedArray,
    Stop,
    Task,
    UnmapBuffer,
    WorkerDied,
    WorkerException,
    WorkerSettings,
)
from distill_reader.workers import KILL_GRACE, stop_processes

pytestmark = pytest.mark.paddle_free


def _raised(exc: BaseException) -> WorkerException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return WorkerException.capture(caught, "teacher 10.0.0.5:9292")


def test_every_message_survives_the_socket_and_stays_small():
    settings = WorkerSettings(request_timeout=5.0, security=ClientSecurity(token="t"),
                              padding=Padding.create(0, {"words": "length"}))
    messages = [
        Init(settings, "feed_var {}", "conf.prototxt", ("prediction",)),
        Task(7, "a:1", {"img": np.ones((2, 3), np.float32), "big": SharedArray(1, 64, "<f4", (2, 3))}, 2),
        Probe(8, "a:1", 2.0), Forget("a:1"), MapBuffer(1, 1 << 20), UnmapBuffer(1), Stop(),
        Ready(1234), Done(7, "a:1", {"prediction": np.zeros((2, 10), np.float32)}, 0.25),
        Failed(7, "a:1", FailureKind.UNAVAILABLE, "teacher a:1: connection refused"),
        Failed(7, "a:1", FailureKind.ERROR, "boom", _raised(KeyError("boom"))),
        ProbeResult(8, "a:1", False, "teacher a:1: health check failed"), Crashed(_raised(ValueError("bad config"))),
    ]
    for message in messages:
        back = pickle.loads(pickle.dumps(message))
        assert type(back) is type(message) and repr(back) == repr(message)
        if sys.version_info >= (3, 11):     # slotted there (worker_messages._message): a few named fields only
            assert not hasattr(message, "__dict__"), f"{type(message).__name__} is not slotted"
        names = [f.name for f in dataclasses.fields(message)]
        if names:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(message, names[0], None)
    assert pickle.loads(pickle.dumps(messages[0])).settings == settings
    assert WorkerDied((3, 4), {9: "a:1"}).request_ids == (3, 4)
    assert {kind.value for kind in FailureKind} == {"unavailable", "rejected", "answer", "auth", "error"}


def test_a_worker_exception_is_rebuilt_with_its_type_where_that_is_safe():
    error = _raised(ConfigError("missing feed(s) ['img']"))
    assert error.type_path == "distill_base.serving_config:ConfigError"
    assert error.message == "missing feed(s) ['img']" and "Traceback (most recent call last)" in error.traceback_text
    rebuilt = pickle.loads(pickle.dumps(error)).rebuild(DistillReaderError)
    assert type(rebuilt) is ConfigError
    assert str(rebuilt).startswith("in a DistillReader worker process (teacher 10.0.0.5:9292):\nTraceback")
    assert "missing feed(s) ['img']" in str(rebuilt)
    assert type(_raised(KeyError("k")).rebuild(DistillReaderError)) is KeyError
    # not imported here: nothing is imported on a name from another process
    assert "no_such_module_xyz" not in sys.modules
    unknown = WorkerException("no_such_module_xyz:Boom", "m", "tb")
    assert type(unknown.rebuild(DistillReaderError)) is DistillReaderError
    # not an exception class, or one whose constructor needs more than a message
    assert type(WorkerException("os:getcwd", "m", "tb").rebuild(DistillReaderError)) is DistillReaderError
    needs_two = WorkerException("subprocess:CalledProcessError", "m", "tb")
    assert type(needs_two.rebuild(DistillReaderError)) is DistillReaderError


def test_worker_settings_have_one_default_each_and_name_bad_values():
    from distill_reader.channel_options import DEFAULT_KEEPALIVE_TIME, DEFAULT_REQUEST_TIMEOUT
    from distill_reader.remote_stage import RemoteOptions

    assert WorkerSettings().request_timeout == DEFAULT_REQUEST_TIMEOUT == 30.0
    assert WorkerSettings().keepalive_time == DEFAULT_KEEPALIVE_TIME
    for name in WorkerSettings.names():   # inherited by the stage's options: the same defaults
        assert getattr(RemoteOptions(), name) == getattr(WorkerSettings(), name), name
    options = RemoteOptions(request_timeout=3.0, num_workers=1, stall_min_timeout=0.5)
    assert WorkerSettings.pick(options) == WorkerSettings(request_timeout=3.0, num_workers=1)
    for bad, named in (({"request_timeout": 0}, "request_timeout"), ({"protocol": "udp"}, "protocol"),
                       ({"wire": "x"}, "wire"), ({"num_workers": 0}, "num_workers"),
                       ({"max_threads": 0}, "max_threads")):
        with pytest.raises(ValueError, match=named):
            WorkerSettings(**bad)


def test_a_worker_setting_is_one_field_the_reader_and_the_client_take_by_name():
    """What makes adding a worker setting a one-file change: the reader takes every WorkerSettings field by its
    name, and every field marked for the client is a TeacherClient keyword."""
    from distill_reader import DistillReader
    from distill_reader.client import TeacherClient

    client_parameters = inspect.signature(TeacherClient).parameters
    options = WorkerSettings().client_options()
    assert set(options) <= set(client_parameters) and {"timeout", "keepalive_time", "pad_value"} <= set(options)
    assert options["timeout"] == WorkerSettings().request_timeout
    reader = DistillReader(["img"], ["prediction"], request_timeout=4.0, max_threads=3, max_respawns=2)
    picked = WorkerSettings.pick(reader.options)
    assert (picked.request_timeout, picked.max_threads, picked.max_respawns) == (4.0, 3, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_thread'"):
        DistillReader(["img"], ["prediction"], max_thread=3)
    with pytest.raises(TypeError, match="'security'"):   # TLS and token have their own keywords
        DistillReader(["img"], ["prediction"], security=ClientSecurity())


_IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); " \
                   "time.sleep(60)"


def _child(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    proc.stdout.readline()   # it is running (and its handlers are set)
    return proc


def test_the_one_stop_ladder_waits_then_terminates_then_kills():
    polite = _child("import time; print(1, flush=True); time.sleep(60)")                 # ends on SIGTERM
    stubborn = _child(_IGNORES_SIGTERM)                                                  # needs SIGKILL
    quick = _child("print(1, flush=True)")                                               # exits by itself
    try:
        began = time.monotonic()
        codes = stop_processes([polite, stubborn, quick], 0.3)
        took = time.monotonic() - began
        assert codes == [-signal.SIGTERM, -signal.SIGKILL, 0]
        assert 0.3 + KILL_GRACE - 0.05 <= took < 0.3 + KILL_GRACE + 2.0, took   # one grace for all, not each
        assert all(p.poll() is not None for p in (polite, stubborn, quick))
    finally:
        for proc in (polite, stubborn, quick):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
