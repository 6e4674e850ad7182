"""The student-worker protocol: every message between a DistillReader and its worker processes, typed.

Both ends are this project's code, joined by one private socket pair (never the network); messages travel
pickled over it (``multiprocessing.connection.Connection``). Each message is a small frozen dataclass of plain
values, so what crosses the process boundary is written down here and nowhere else: ``distill_reader.workers``
(the student's side: the pool and its handles) sends the first group and reads the second,
``distill_reader.worker_process`` (the code that runs in a worker) the other way round.

Student -> worker:

=================  ===========================================================================================
``Init``           once, first: the ``WorkerSettings``, the teacher's serving config (text) and the fetch names
``Task``           one request: send ``feeds`` (``size`` samples) to ``endpoint``; feeds may be ``SharedArray``
``Probe``          one health check of ``endpoint`` within ``timeout`` seconds
``Forget``         ``endpoint`` left the teacher set: drop its client
``RoundTrip``      another worker's link probe measured ``endpoint``'s network round trip: noted as this
                   worker's own, so its connection follows a link that moved as soon as the probes agree
``MapBuffer``      a shared memory block follows as a file descriptor (SCM_RIGHTS, ``distill_reader.memfd``)
``UnmapBuffer``    that block is no longer used
``Stop``           leave now (shutdown protocol, ``distill_reader.workers``)
=================  ===========================================================================================

Worker -> student:

=================  ===========================================================================================
``Ready``          started (after ``Init``): requests sent to it go out at once from now on
``Connecting``     a request waits while the worker makes its connection to the teacher (its first health
                   check: wire form, round trip, pings), which has timeouts of its own
``Sent``           ... and that connection is made: the request goes out now
``Done``           a request's answer (``outputs``: fetch name -> array), its latency in seconds and the
                   teacher's own time for it (Paddle Serving's ``profile_time``; None when the teacher sent none)
``Failed``         a request's failure: a ``FailureKind``, the message, and for ``ERROR`` the ``WorkerException``
``ProbeResult``    a health check's outcome
``Crashed``        starting failed (e.g. a config the worker cannot parse): the ``WorkerException``
=================  ===========================================================================================

The pool adds ``WorkerDied`` (never sent: made by the student when a worker's socket ends) so that its caller
handles a death among the other messages.

``WorkerException`` carries an exception across the boundary as PyTorch's DataLoader does with
``torch._utils.ExceptionWrapper``: its type (as ``module:qualname``, a name, not a pickled class), its message
and the formatted traceback; ``rebuild()`` in the student makes an exception of the same type whose message holds
the worker's traceback, so ``except FeedError`` still works there.

Example::

    settings = WorkerSettings(request_timeout=10.0)
    Init(settings, config_text, "serving_client/serving_client_conf.prototxt", ("prediction",))
    Failed(7, "10.0.0.5:9292", FailureKind.UNAVAILABLE, "teacher 10.0.0.5:9292: connection refused")
"""
from __future__ import annotations

import enum
import sys
import traceback
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from distill_base.client_security import ClientSecurity

from .channel_options import DEFAULT_KEEPALIVE_TIME, DEFAULT_REQUEST_TIMEOUT
from .padding import Padding

# Messages are frozen and slotted (no per-instance dict: a few named fields); slots on Python >= 3.11 only, where
# frozen slotted dataclasses pickle reliably (setup.py allows 3.9).
_message = dataclass(frozen=True, slots=True) if sys.version_info >= (3, 11) else dataclass(frozen=True)


# -- settings ------------------------------------------------------------------------------------------------
def _client(name: str) -> dict:
    """Field metadata: this setting is the worker's ``TeacherClient`` keyword ``name``."""
    return {"client": name}


@dataclass(frozen=True)
class WorkerSettings:
    """Everything about the reader's worker processes: one name and one default per setting.

    ``DistillReader``'s keyword options of the same names build it (once, via ``RemoteOptions``); its fields
    reach the pool (``num_workers`` .. ``healthy_answers``) and, in the ``Init`` message, every worker, whose
    ``TeacherClient`` gets the fields marked ``client`` (``client_options``). Adding a setting is one field here:
    the reader accepts it as a keyword, the stage passes it on, the worker's client gets it.

    Args:
        request_timeout: seconds a teacher has to answer one request (the client's ``timeout``).
        keepalive_time: gRPC keepalive interval while a request is out (s; 0 off).
        protocol: ``"grpc"`` or ``"http"``.
        wire: ``"auto"``, ``"raw"`` or ``"typed"`` (see ``distill_reader.client``).
        security: TLS files and bearer token of every worker's clients.
        padding: ``pad_value`` / ``lengths_feeds`` of every worker's clients.
        max_threads: request threads in one worker process.
        num_workers: worker processes.
        stop_timeout: seconds a worker gets to exit after ``Stop`` before it is signalled.
        max_respawns: replacements started in a row for workers that died (then ``WorkerError``).
        healthy_answers: answers since the last replacement after which the replacements count from 0 again.

    Raises:
        ValueError: a value out of range, naming the setting.
    """

    request_timeout: float = field(default=DEFAULT_REQUEST_TIMEOUT, metadata=_client("timeout"))
    keepalive_time: float = field(default=DEFAULT_KEEPALIVE_TIME, metadata=_client("keepalive_time"))
    protocol: str = field(default="grpc", metadata=_client("protocol"))
    wire: str = field(default="auto", metadata=_client("wire"))
    security: ClientSecurity = field(default_factory=ClientSecurity, metadata=_client("security"))
    padding: Padding = field(default_factory=Padding)   # the client takes its two parts (client_options)
    max_threads: int = 64
    num_workers: int = 2
    stop_timeout: float = 2.0
    max_respawns: int = 8
    healthy_answers: int = 16

    def __post_init__(self) -> None:
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, not {self.request_timeout}")
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', not {self.protocol!r}")
        if self.wire not in ("auto", "raw", "typed"):
            raise ValueError(f"wire must be 'auto', 'raw' or 'typed', not {self.wire!r}")
        for name in ("num_workers", "max_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names (``DistillReader`` accepts each as a keyword option)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def pick(cls, options: Any) -> WorkerSettings:
        """The settings of ``options`` (an object with an attribute of each name, e.g. ``RemoteOptions``)."""
        return cls(**{name: getattr(options, name) for name in cls.names()})

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of the worker's ``TeacherClient`` (``timeout``, ``keepalive_time``, ...)."""
        options = {f.metadata["client"]: getattr(self, f.name) for f in fields(self) if "client" in f.metadata}
        options.update(self.padding.settings())
        return options


# -- exceptions across the boundary ---------------------------------------------------------------------------
@_message
class WorkerException:
    """An exception raised in a worker process, as the student re-raises it (cf. PyTorch's ExceptionWrapper).

    Attributes:
        type_path: the exception's class as ``module:qualname``.
        message: ``str(exc)``.
        traceback_text: the worker's formatted traceback (with the message).
        where: what the worker was doing ("teacher 10.0.0.5:9292", "starting").
    """

    type_path: str
    message: str
    traceback_text: str
    where: str = ""

    @classmethod
    def capture(cls, exc: BaseException, where: str = "") -> WorkerException:
        """Wrap ``exc`` (call in its ``except`` block in the worker)."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(f"{type(exc).__module__}:{type(exc).__qualname__}", str(exc), text, where)

    def describe(self) -> str:
        """``in a DistillReader worker process (where):`` and the worker's traceback."""
        place = f" ({self.where})" if self.where else ""
        return f"in a DistillReader worker process{place}:\n{self.traceback_text}"

    def rebuild(self, fallback: type[Exception]) -> Exception:
        """An exception of the original type whose message is ``describe()``; ``fallback(describe())`` when that
        is not safe: the type's module is not already imported in this process (nothing is imported on a name
        that came from another process), the name is not an Exception subclass, or its constructor does not
        take one message."""
        module_name, _, qualname = self.type_path.partition(":")
        found: Any = sys.modules.get(module_name)
        for part in qualname.split(".") if found is not None else ():
            found = getattr(found, part, None)
        if isinstance(found, type) and issubclass(found, Exception):
            try:
                return found(self.describe())
            except Exception:  # noqa: BLE001 - a constructor that needs more than one message
                pass
        return fallback(self.describe())


# -- student -> worker -------------------------------------------------------------------------------------------
@_message
class SharedArray:
    """A feed array held in a shared memory block the worker has mapped (``MapBuffer``): a view, no copy."""

    buffer_id: int
    offset: int
    dtype: str            # numpy dtype string, e.g. "<f4"
    shape: tuple[int, ...]


@_message
class Init:
    settings: WorkerSettings
    config_text: str      # the serving client config, protobuf text format
    config_source: str    # where it was read from (error messages)
    fetch: tuple[str, ...]


@_message
class Task:
    request_id: int
    endpoint: str
    feeds: dict[str, Union[Any, SharedArray]]   # feed name -> array (or list of per-sample arrays) or SharedArray
    size: int


@_message
class Probe:
    probe_id: int
    endpoint: str
    timeout: float
    handshakes: int = 0   # 0: a health check; n > 0: only n TCP handshakes timed at once (the link's round trip)


@_message
class Forget:
    endpoint: str


@_message
class RoundTrip:
    endpoint: str
    seconds: float        # the least of a link probe's TCP handshakes (ProbeResult.round_trip)


@_message
class MapBuffer:
    buffer_id: int
    size: int             # bytes


@_message
class UnmapBuffer:
    buffer_id: int


@_message
class Stop:
    pass


ToWorker = Union[Init, Task, Probe, Forget, RoundTrip, MapBuffer, UnmapBuffer, Stop]


# -- worker -> student -------------------------------------------------------------------------------------------
class FailureKind(enum.Enum):
    """How a request failed, which decides what the student does next (``distill_reader.remote_stage``)."""

    UNAVAILABLE = "unavailable"   # transient (unreachable, timed out, overloaded): retry elsewhere after a backoff
    REJECTED = "rejected"         # the teacher refused the request as invalid for the model
    ANSWER = "answer"             # a wrong answer (missing fetch, wrong rows)
    AUTH = "auth"                 # the teacher refused the credentials or TLS settings
    ERROR = "error"               # an exception in the worker: re-raised in the student with its type


@_message
class Ready:
    pid: int


@_message
class Connecting:
    request_id: int


@_message
class Sent:
    request_id: int


@_message
class Done:
    request_id: int
    endpoint: str
    outputs: dict[str, Any]   # fetch name -> array (or list of per-sample arrays)
    latency: float            # seconds from the worker sending the request (its connection made) to the answer
    server_time: Optional[float] = None   # seconds of that at the teacher by its own clock (None: not told)


@_message
class Failed:
    request_id: int
    endpoint: str
    kind: FailureKind
    message: str
    error: Optional[WorkerException] = None   # for FailureKind.ERROR


@_message
class ProbeResult:
    probe_id: int
    endpoint: str
    healthy: bool
    message: str = ""
    round_trip: Optional[float] = None   # s, the least of a handshake probe's TCP handshakes


@_message
class Crashed:
    error: WorkerException


FromWorker = Union[Ready, Connecting, Sent, Done, Failed, ProbeResult, Crashed]


@_message
class WorkerDied:
    """Made by the student's pool (never sent): a worker's socket ended; what it held is to be re-issued."""

    request_ids: tuple[int, ...]
    probes: dict[int, str]   # probe id -> endpoint
