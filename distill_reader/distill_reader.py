"""DistillReader: wrap a student's data generator and append remote teachers' predictions to every sample.

Example::

    from distill_reader import DistillReader
    dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
    dr.set_fixed_teacher("127.0.0.1:9292")            # or a list/tuple, or "a:1,b:2"
    dr.set_teacher_batch_size(32)
    train_reader = dr.set_sample_list_generator(train_reader)
    for batch in train_reader():                      # each sample: (img, label, prediction)
        ...
    loader = paddle.base.io.DataLoader.from_generator(feed_list=[img, label, prediction], capacity=8)
    loader.set_sample_list_generator(train_reader)    # the static-graph way, as in the seed example

The generator runs in the student's process; worker processes (``distill_reader.workers``) do the teacher
I/O (``distill_reader.worker_process``). See ``distill_reader.pipeline`` for the data path and
``distill_reader.workers`` for the shutdown protocol.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from distill_base import endpoints as endpoints_module
from distill_base.client_security import ClientSecurity
from distill_base.serving_config import ServingConfig

from .errors import (
    AllTeachersDownError,
    DistillReaderError,
    ReaderClosedError,
    TeacherAnswerInvalid,
    TeacherAuthRefused,
    TeacherRequestRefused,
)
from .padding import Padding, PaddingOptionError, PadValue
from .pipeline import Epoch, EpochStats, Gate, SlotPlan
from .prediction_stage import PredictionStage
from .remote_stage import RemoteOptions, RemoteStage
from .teacher_pool import TeacherPool
from .worker_messages import WorkerSettings

logger = logging.getLogger(__name__)

# The client config teachers.export writes by default (Paddle Serving's folder name); the former default folder
# is still read when only it exists.
DEFAULT_SERVING_CONF = "serving_client/serving_client_conf.prototxt"
FORMER_DEFAULT_SERVING_CONF = "serving_conf/serving_client_conf.prototxt"
CLOSE_WAIT_S = 10.0   # close() from another thread waits this long for the iterating thread to leave the reader
_D = RemoteOptions    # the remote stage's defaults are the reader's (the workers' in WorkerSettings): one place each

__all__ = ["DistillReader", "DistillReaderError", "AllTeachersDownError", "TeacherAnswerInvalid",
           "TeacherRequestRefused", "TeacherAuthRefused", "ReaderClosedError", "PaddingOptionError"]


def parse_endpoints(teachers: Union[str, Sequence[str]]) -> list[str]:
    """``'a:1,b:2'`` / ``['a:1', 'b:2']`` / ``('a:1',)`` -> ``['a:1', 'b:2']``; the project's one endpoint parser
    (``distill_base.endpoints``): ValueError naming a malformed or wildcard item, TypeError for another type.

    Raises:
        TypeError: ``teachers`` is not a string, list or tuple.
        ValueError: no endpoint, or an item that is malformed or a wildcard address.
    """
    if not isinstance(teachers, (str, list, tuple)):
        raise TypeError(f"teachers must be a 'host:port' string, a list or a tuple, not {type(teachers).__name__}")
    endpoints = endpoints_module.parse_endpoints(teachers, what="teacher endpoint", allow_wildcard=False)
    if not endpoints:
        raise ValueError("no teacher endpoint given")
    return [str(e) for e in endpoints]


class _Resources:
    """What must be released when the reader goes away (held apart from the reader for weakref.finalize)."""

    def __init__(self) -> None:
        self.stage: Optional[PredictionStage] = None
        self.subscription: Any = None
        self.subscription_pid = os.getpid()   # the process whose ZooKeeper session the subscription holds
        self.lock = threading.Lock()
        self.gate = Gate()

    def remote_stage(self) -> Optional[RemoteStage]:
        stage = self.stage
        while stage is not None and not isinstance(stage, RemoteStage):
            stage = getattr(stage, "inner", None)
        return stage

    def stop_workers(self) -> None:
        """Stop the worker processes only (they start again on demand); a cache stage stays open."""
        with self.lock:
            remote = self.remote_stage()
            if remote is not None:
                remote.close()

    def close_stage(self) -> None:
        """Close the stage chain (rebuilt on demand); the teacher subscription stays."""
        with self.lock:
            stage, self.stage = self.stage, None
            if stage is not None:
                stage.close()

    def close(self) -> None:
        """Everything, once; from any thread. An epoch running in another thread stops with ReaderClosedError."""
        self.gate.closed.set()
        took = self.gate.lock.acquire(timeout=CLOSE_WAIT_S)
        if not took:
            logger.warning("close(): the iterating thread did not leave the reader within %.0fs; closing anyway",
                           CLOSE_WAIT_S)
        try:
            self.close_stage()
        finally:
            if took:
                self.gate.lock.release()
        subscription, self.subscription = self.subscription, None
        if subscription is not None and os.getpid() != self.subscription_pid:
            # a forked child: the session (its socket, its student node) is the parent's and its threads did not
            # survive the fork; stopping it here would hang or end the parent's session
            logger.debug("close() in a forked child: the parent's teacher subscription is left alone")
            return
        if subscription is not None:
            try:
                subscription.stop()
            except Exception:  # noqa: BLE001 - closing must not raise at exit
                logger.exception("stopping the teacher subscription failed")


class DistillReader:
    """Append teachers' predictions to the samples of a generator (sample, sample list or batch).

    Args:
        ins: names of the slots each sample holds, in order. Slots named like a feed of the teacher (per the
            serving client config) are sent; other slots (or None) pass through untouched.
        predicts: fetch names whose values are appended to each sample, in this order.
        request_timeout: seconds a teacher has to answer one request (default 30).
        max_retries: failed attempts of one request (on different teachers) before giving up (default 10).
        retry_backoff / max_retry_backoff: first and largest delay before a failed request is re-sent (s).
        probe_backoff / max_probe_backoff: first and largest delay before a failed teacher is probed again (s).
        probe_timeout: seconds for one health probe (default 2).
        all_teachers_down_timeout: seconds with no usable teacher before AllTeachersDownError (default 60).
        per_teacher_in_flight: requests outstanding at one near teacher (default 2: one computing, one queued);
            a teacher whose measured network round trip holds more requests at its throughput gets that many
            more (its bandwidth-delay product, distill_reader.routing.window), up to ``max_per_teacher_in_flight``.
        max_per_teacher_in_flight: the cap of that window (default 32, or ``per_teacher_in_flight`` if larger);
            set it to ``per_teacher_in_flight`` for a fixed window.
        routing_policy: an object with ``choose(candidates, now)`` ranking the usable teachers for the next
            request (distill_reader.routing); default ``PeakEwmaPolicy()``, earliest expected finish.
        max_pending_tasks: tasks read but not yet yielded (memory bound of the reorder buffer); default
            twice the in-flight limit, which counts each teacher's window as many times as its latency fits in
            the slowest one's (at most 32): beside a teacher 1.5 s away, ~450 tasks for three 50 ms ones.
        max_pending_bytes: the feeds of those tasks, in bytes (default 1 GiB; the items read hold about as much
            again); with big batches and a far teacher, the bound that holds first.
        num_workers: worker processes doing the teacher I/O (default 2).
        protocol: ``"grpc"`` (default) or ``"http"``; wire: ``"auto"``, ``"raw"`` or ``"typed"`` (see client).
        stop_timeout: seconds a worker gets to exit after ``stop`` before it is signalled (default 2).
        keepalive_time: gRPC keepalive interval while a request is out (default 1 s; 0 off): a frozen or
            unreachable teacher fails its requests after about two intervals.
        hedge_budget: hedged requests allowed, as a fraction of all requests (default 0.05; 0 disables hedging).
            The task the reorder buffer waits on is sent again to another teacher once it has been out for
            ``clamp(hedge_factor x hedge_percentile-th percentile of recent latencies, hedge_min_delay,
            hedge_max_delay)`` (defaults 2.0, 95, 0.02 s, 1.0 s); the first answer wins.
        stall_factor / stall_min_timeout: a teacher whose request has been out for ``max(stall_min_timeout,
            stall_factor x the 99th latency percentile)`` (defaults 4, 2 s; at most request_timeout) is set aside
            and probed, and its tasks go to other teachers. Until 4 latencies are known: ``max(5 s, stall_factor x
            the longest latency seen)``.
        tls_ca / tls_cert / tls_key: PEM files: the CA of the teachers' certificates (turns TLS on), and this
            student's certificate and key for teachers that require one (``teachers.serve --tls_client_ca``).
        token: bearer token for teachers started with ``--token_file`` (default: ``$DISTILL_TEACHER_TOKEN``).
        pad_value: fill value of padded variable-length feeds (a ``-1`` per-sample dimension, not LoD): one
            number for all, or a dict ``{feed: number}`` where feeds differ (feeds left out pad with 0). Default 0.
        lengths_feeds: ``{padded feed: lengths feed}``, e.g. ``{"words": "length"}``: the workers fill the lengths
            feed with each sample's length, so it need not be a slot; a lengths slot that is given must hold the
            lengths (an error names the sample). See ``docs/variable-length.md``.
        **worker_options: any other setting of the worker processes, by its name in
            ``distill_reader.worker_messages.WorkerSettings`` (e.g. ``max_threads=16`` request threads per worker).

    Example with a padded text teacher (feeds ``words`` [-1] int64 and ``length`` [1])::

        dr = DistillReader(ins=["words", "label"], predicts=["logits"], pad_value=0,
                           lengths_feeds={"words": "length"})

    Raises at construction: PaddingOptionError (a ValueError naming ``pad_value`` or ``lengths_feeds``) for values
    of the wrong type; TypeError naming a keyword that is no option; ValueError naming an option out of range; at
    the first epoch, the same for names or values that do not fit the teacher's config.

    Raises (while iterating): AllTeachersDownError, TeacherAnswerInvalid (no teacher answers a task correctly),
    TeacherRequestRefused (every teacher refuses a task as invalid), TeacherAuthRefused (every teacher refuses
    the credentials), ReaderClosedError (``close()`` from another
    thread), errors of the user's generator (re-raised as they are), FeedError / ConfigError for bad input.
    """

    def __init__(self, ins: Sequence[Optional[str]], predicts: Sequence[str], *,
                 request_timeout: float = _D.request_timeout, max_retries: int = _D.max_retries,
                 retry_backoff: float = _D.retry_backoff, max_retry_backoff: float = _D.max_retry_backoff,
                 probe_backoff: float = 0.2, max_probe_backoff: float = 5.0, probe_timeout: float = _D.probe_timeout,
                 all_teachers_down_timeout: float = _D.all_teachers_down_timeout, per_teacher_in_flight: int = 2,
                 max_pending_tasks: Optional[int] = None, num_workers: int = _D.num_workers,
                 protocol: str = _D.protocol, wire: str = _D.wire, stop_timeout: float = _D.stop_timeout,
                 keepalive_time: float = _D.keepalive_time, hedge_budget: float = _D.hedge_budget,
                 hedge_percentile: float = _D.hedge_percentile, hedge_factor: float = _D.hedge_factor,
                 hedge_min_delay: float = _D.hedge_min_delay, hedge_max_delay: float = _D.hedge_max_delay,
                 stall_factor: float = _D.stall_factor, stall_min_timeout: float = _D.stall_min_timeout,
                 tls_ca: Optional[str] = None, tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 token: Optional[str] = None, pad_value: PadValue = 0,
                 lengths_feeds: Optional[Mapping[str, str]] = None,
                 max_per_teacher_in_flight: Optional[int] = None, routing_policy: Any = None,
                 max_pending_bytes: Optional[int] = None, **worker_options: Any):
        """Check the arguments.

        Raises:
            TypeError: a keyword that is no reader option nor a ``WorkerSettings`` field.
            ValueError: ``ins`` or ``predicts`` is empty, or an option is out of range.
            PaddingOptionError: ``pad_value``/``lengths_feeds`` of a wrong type.
        """
        unknown = sorted(set(worker_options) - (set(WorkerSettings.names()) - {"security", "padding"}))
        if unknown:
            raise TypeError(f"DistillReader() got an unexpected keyword argument {unknown[0]!r}")
        padding = Padding.create(pad_value, lengths_feeds)
        if not ins:
            raise ValueError("ins must name at least one slot")
        if not predicts:
            raise ValueError("predicts must name at least one fetch var")
        if max_pending_bytes is not None and max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes must be >= 1, not {max_pending_bytes}")
        self.ins = list(ins)
        self.predicts = list(predicts)
        self.teacher_batch_size = 32
        self.serving_conf_file = DEFAULT_SERVING_CONF
        self._conf_file_given = False
        self.max_pending_tasks = max_pending_tasks
        self.max_pending_bytes = max_pending_bytes
        self.options = RemoteOptions(
            request_timeout=request_timeout, max_retries=max_retries, retry_backoff=retry_backoff,
            max_retry_backoff=max_retry_backoff, probe_timeout=probe_timeout,
            all_teachers_down_timeout=all_teachers_down_timeout, num_workers=num_workers, protocol=protocol,
            wire=wire, stop_timeout=stop_timeout, keepalive_time=keepalive_time, hedge_budget=hedge_budget,
            hedge_percentile=hedge_percentile, hedge_factor=hedge_factor, hedge_min_delay=hedge_min_delay,
            hedge_max_delay=hedge_max_delay, stall_factor=stall_factor, stall_min_timeout=stall_min_timeout,
            security=ClientSecurity.create(tls_ca, tls_cert, tls_key, token), padding=padding, **worker_options)
        self.pool = TeacherPool((), per_teacher_in_flight=per_teacher_in_flight, probe_backoff=probe_backoff,
                                max_probe_backoff=max_probe_backoff,
                                max_per_teacher_in_flight=max_per_teacher_in_flight, policy=routing_policy)
        self._config: Optional[ServingConfig] = None
        self._stage_wrappers: list[Callable[[PredictionStage], PredictionStage]] = []
        self._offline: Any = None   # distill_reader.offline_cache.OfflineCache after set_offline_cache
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.close)
        self._epoch = 0
        self._active: Optional[Epoch] = None   # the epoch that owns the stage now
        self._teachers_set = False
        self.last_epoch_stats: Optional[EpochStats] = None   # samples, tasks, per-teacher share of the last epoch

    # -- configuration --------------------------------------------------------------------------------
    def set_fixed_teacher(self, teachers: Union[str, Sequence[str]]) -> None:
        """Use these teachers: ``'127.0.0.1:9292'``, ``'a:1,b:2'``, or a list/tuple of ``host:port``."""
        self.pool.set_endpoints(parse_endpoints(teachers))
        self._teachers_set = True

    def set_dynamic_teacher(self, discovery_servers: Union[str, Sequence[str]], teacher_service_name: str,
                            require_max_teacher: int = 1, **subscription_options: Any) -> None:
        """Find teachers in ZooKeeper (``'host:port,host:port'`` or a list) under ``teacher_service_name``.

        The reader uses at most ``require_max_teacher`` teachers, its fair share among the students of the
        service; the set follows teachers and students as they come and go.
        """
        from discovery.student import TeacherSubscription  # lazy: kazoo only when used

        hosts = discovery_servers if isinstance(discovery_servers, str) else ",".join(discovery_servers)
        if self._resources.subscription is not None:
            self._resources.subscription.stop()
        subscription_options.setdefault("tls", self.options.security.tls)
        subscription = TeacherSubscription(hosts, teacher_service_name, on_change=self.pool.set_endpoints,
                                           require_max_teacher=require_max_teacher, **subscription_options)
        self._resources.subscription = subscription
        self._resources.subscription_pid = os.getpid()
        self._teachers_set = True
        self.pool.dynamic = True
        self.pool.discovery_state = lambda: (
            f"no teacher of service {teacher_service_name!r} found in ZooKeeper {hosts} "
            f"({'connected' if subscription.connected else 'NOT connected: is ZooKeeper running there?'})")
        subscription.start()

    def set_teacher_batch_size(self, teacher_batch_size: int) -> None:
        """Samples per teacher request (a request never crosses a student batch). Default 32.

        Raises:
            ValueError: ``teacher_batch_size`` < 1.
        """
        if int(teacher_batch_size) < 1:
            raise ValueError(f"teacher_batch_size must be >= 1, not {teacher_batch_size}")
        self.teacher_batch_size = int(teacher_batch_size)

    def set_serving_conf_file(self, path: Union[str, os.PathLike]) -> None:
        """The teacher's serving client config (file or folder). Default 'serving_client/serving_client_conf.prototxt'
        (what ``teachers.export`` writes; 'serving_conf/...' when only that exists)."""
        self.serving_conf_file = os.fspath(path)
        self._conf_file_given = True
        self._config = None

    def set_offline_cache(self, path: Union[str, os.PathLike], storage: Union[str, dict] = "float32",
                          **options: Any) -> None:
        """Ask the teachers once: the first pass writes every answer to the knowledge cache ``path``; later
        passes (and runs) read it and send nothing. A complete cache needs no teacher. ``storage``: "float32",
        "float16", "topk:K[:FILL]" or a dict per predict name (see distill_reader.offline_cache)."""
        from .offline_cache import OfflineCache  # lazy: the knowledge-file machinery only when used

        self._offline = OfflineCache(os.fspath(path), storage=storage, **options)
        self._offline.install(self)

    @property
    def has_teachers(self) -> bool:
        """True once set_fixed_teacher or set_dynamic_teacher was called."""
        return self._teachers_set

    @property
    def config(self) -> ServingConfig:
        """The teacher's serving config: the conf file given to ``set_serving_conf_file`` when it exists, else the
        one an offline cache stored (the config its answers were made with; no teacher needed), else the default
        'serving_client/serving_client_conf.prototxt' (or the former default 'serving_conf/...' when only it
        exists)."""
        if self._config is None:
            offline_config = getattr(self._offline, "serving_config", None)
            given = self._conf_file_given and os.path.exists(self.serving_conf_file)
            stored = offline_config() if offline_config is not None and not given else None   # reads the cache
            self._config = stored if stored is not None else ServingConfig.load(self._conf_path())
        return self._config

    def _conf_path(self) -> str:
        if (not self._conf_file_given and not os.path.exists(DEFAULT_SERVING_CONF)
                and os.path.exists(FORMER_DEFAULT_SERVING_CONF)):
            return FORMER_DEFAULT_SERVING_CONF
        return self.serving_conf_file

    def add_stage_wrapper(self, wrap: Callable[[PredictionStage], PredictionStage]) -> None:
        """Put a stage in front of the teachers (the offline cache does this); applied at the next epoch.

        ``wrap(inner)`` returns a PredictionStage that answers what it can and submits the rest to ``inner``;
        it should keep ``inner`` in an ``inner`` attribute.
        """
        self._stage_wrappers.append(wrap)
        self._resources.close_stage()   # rebuilt with the wrapper at the next epoch; the subscription stays

    # -- generators -------------------------------------------------------------------------------------
    def set_sample_generator(self, generator: Callable[[], Iterable[Any]]) -> Callable[[], Iterator[tuple]]:
        """``generator()`` yields samples (tuples of slots); the result yields ``sample + predictions``."""
        return _EpochReader(self, "sample", generator)

    def set_sample_list_generator(self, generator: Callable[[], Iterable[Any]]) -> Callable[[], Iterator[list]]:
        """``generator()`` yields lists of samples; the result yields lists of ``sample + predictions``."""
        return _EpochReader(self, "sample_list", generator)

    def set_batch_generator(self, generator: Callable[[], Iterable[Any]]) -> Callable[[], Iterator[tuple]]:
        """``generator()`` yields tuples of arrays (batch first); the result appends prediction arrays."""
        return _EpochReader(self, "batch", generator)

    # -- running ----------------------------------------------------------------------------------------
    def _stage(self) -> PredictionStage:
        if self._resources.stage is None:
            stage: PredictionStage = RemoteStage(self.pool, self.config, self.predicts, self.options)
            for wrap in self._stage_wrappers:
                stage = wrap(stage)
            self._resources.stage = stage
        return self._resources.stage

    def _run(self, kind: str, generator: Callable[[], Iterable[Any]]) -> Iterator[Any]:
        if not self._finalizer.alive:
            raise DistillReaderError("this DistillReader is closed; create a new one")
        if not self._teachers_set and not self._stage_wrappers:
            raise DistillReaderError("no teacher: call set_fixed_teacher(...) or set_dynamic_teacher(...) first")
        plan = SlotPlan(self.ins, self.predicts, self.config, self.options.padding)
        stage = self._stage()
        if self._active is not None:
            self._active.abandon()   # e.g. Paddle's loader starts the next epoch before the old generator is gone
        self._epoch += 1
        number = self._epoch
        source = generator() if callable(generator) else generator
        epoch = self._active = Epoch(kind, source, plan, stage, self.teacher_batch_size,
                                     max_pending_tasks=self.max_pending_tasks,
                                     max_pending_bytes=self.max_pending_bytes, epoch=number,
                                     on_end=lambda stats: self._log_summary(number, stats, complete=True),
                                     gate=self._resources.gate)
        completed = False
        try:
            yield from epoch.run()
            completed = True
        finally:
            if not completed and self._active is epoch:   # an epoch that ended early: its figures, not the last's
                self._log_summary(number, epoch.stats, complete=False)
            if self._active is epoch:
                self._active = None
                if not completed and not self._resources.gate.closed.is_set():
                    # break, exception, Ctrl-C or garbage collection of the epoch: stop the workers (restarted
                    # on demand)
                    self._resources.stop_workers()

    def _log_summary(self, epoch: int, stats: EpochStats, complete: bool) -> None:
        """Fill in the per-teacher figures, log one line (WARNING for an epoch that ended early), keep the stats."""
        stats.epoch, stats.complete = epoch, complete
        shares = self._teacher_shares(stats)
        rate = stats.samples / stats.seconds if stats.seconds > 0 else 0.0
        counts = [stats.stage.get(k, "-") for k in ("requests", "retries", "hedges", "hedge_wins", "late_answers",
                                                      "stalls")]
        logger.log(logging.INFO if complete else logging.WARNING,
                   "epoch %d%s: %d samples in %.2fs (%.0f samples/s), %d tasks, %s requests, %s retries, %s hedges "
                   "(%s won), %s late answers discarded, %s stalls; teachers: %s", epoch,
                   "" if complete else " ended early", stats.samples, stats.seconds, rate, stats.tasks, *counts,
                   "; ".join(shares) or "none asked")
        self.last_epoch_stats = stats

    def _teacher_shares(self, stats: EpochStats) -> list[str]:
        shares = []
        snapshot = self.pool.take_stats()
        total = sum(t.requests for t in snapshot.teachers) or 1
        for t in snapshot.teachers:
            latency = 1000 * t.latency_total / t.requests if t.requests else 0.0
            stats.teachers[t.endpoint] = {"requests": t.requests, "samples": t.samples, "errors": t.errors,
                                          "latency_ms": latency}
            shares.append(f"{t.endpoint} {100 * t.requests / total:.0f}% ({t.requests} req, {latency:.1f} ms"
                          + (f", {t.errors} errors" if t.errors else "") + ")")
        return shares

    # -- lifetime ---------------------------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the running worker processes (empty before the first epoch and after ``close()``)."""
        stage = self._resources.remote_stage()
        return stage.worker_pids if stage is not None else []

    def close(self) -> None:
        """Stop the workers and the teacher subscription (also done on garbage collection and at exit).

        Safe from any thread: an epoch being iterated in another thread stops with ReaderClosedError at its next
        step (within about half a second), and nothing is closed under it.
        """
        self._finalizer()

    def __enter__(self) -> DistillReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _EpochReader:
    """The callable ``set_*_generator`` returns: each call is one epoch over ``generator()``."""

    def __init__(self, reader: DistillReader, kind: str, generator: Callable[[], Iterable[Any]]):
        if not callable(generator):
            raise TypeError(f"set_{kind}_generator needs a callable that returns an iterable (a reader "
                            f"function), not {type(generator).__name__}")
        self.reader = reader
        self.kind = kind
        self.generator = generator

    def __call__(self) -> Iterator[Any]:
        return self.reader._run(self.kind, self.generator)

    def __iter__(self) -> Iterator[Any]:
        return self()

    def __repr__(self) -> str:
        return f"<DistillReader {self.kind} reader over {self.generator!r}>"

