"""One inference request, transport-independent: validate a ``Request`` against the serving config, run it,
and build the ``Response`` in the wire form the request used (raw ``tensor_content`` in -> raw out).

Bad requests get ``err_no`` ``ErrNo.INPUT`` (the one table: ``distill_base.status_codes``) with a message naming
the feed and what the model expects; no request, however malformed, makes ``handle``/``handle_async`` raise.

Tensors are matched to feeds by ``name`` (the real variable name, as Paddle Serving does), then by ``alias_name``;
a tensor with neither is the feed at its position (Paddle Serving 0.9's JSON examples send unnamed tensors).

Example::

    handler = InferenceHandler(config, run=pool.run)
    response = handler.handle(request)                   # a general_model Response message
    handler = InferenceHandler(config, run=pool.run, submit=batcher.submit_to_loop, predict_timeout=30)
    response = await handler.handle_async(request)       # the same, from an event loop
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Callable, Optional, Protocol

import numpy as np

from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.serving_config import ServingConfig, VarSpec
from distill_base.status_codes import ErrNo
from distill_base.tensor_codec import (
    ELEM_TYPES,
    TensorCodecError,
    decode_tensor,
    dtype_of_elem_type,
    encode_tensor,
    is_raw,
)

from .errors import ModelRejectedInput, PredictorTimeout, WorkerLost
from .lod_checks import LodError, check_lod_feed

logger = logging.getLogger(__name__)

ENGINE_NAME = "general_infer_0"

RunFn = Callable[..., dict]


class PendingRun(Protocol):
    """What ``submit`` returns (``DynamicBatcher.submit_to_loop``): an asyncio Future of {name: (array, lod)}
    settled by the thread that runs the predictor, and ``cancel()``, which keeps a job that has not started
    from ever running."""

    waiter: asyncio.Future

    def cancel(self) -> bool: ...


SubmitFn = Callable[..., PendingRun]   # (feeds, fetch names, lods), called in the event loop's thread


class RequestError(ValueError):
    """A request that does not fit the model; the message says which feed and what was expected."""


def _describe(spec: VarSpec) -> str:
    dims = ["N", *[str(d) if d >= 0 else "?" for d in spec.shape]]
    dtype = ELEM_TYPES.get(spec.elem_type, f"elem_type {spec.elem_type}")
    return f"{dtype} [{', '.join(dims)}] (elem_type {spec.elem_type})"


class InferenceHandler:
    """Validate, run and answer Requests for one serving model. Thread-safe."""

    def __init__(self, config: ServingConfig, run: Optional[RunFn] = None, submit: Optional[SubmitFn] = None,
                 predict_timeout: Optional[float] = None):
        """``run`` blocks and returns the outputs (``handle``); ``submit`` queues them from the event loop and
        returns a PendingRun (``handle_async``); ``predict_timeout`` seconds bound the wait for the predictor in
        ``handle_async``."""
        self.config = config
        self._run = run
        self._submit = submit
        self.predict_timeout = predict_timeout
        self._tables_of: Optional[ServingConfig] = None     # the config _tables() was built for
        self._feed_by_name: dict[str, VarSpec] = {}
        self._feed_by_alias: dict[str, VarSpec] = {}
        self._fetch_by_key: dict[str, VarSpec] = {}
        self._deadlines: Optional[_Deadlines] = None   # handle_async's --predict_timeout waits, one timer

    def handle(self, request: service_pb2.Request) -> service_pb2.Response:
        """Answer ``request``; errors become ``err_no``/``err_msg`` answers (never exceptions)."""
        return profiled(request, time.time_ns(), self._handle(request))

    def _handle(self, request: service_pb2.Request) -> service_pb2.Response:
        parsed = self._parse_or_error(request)
        if isinstance(parsed, service_pb2.Response):
            return parsed
        feeds, lods, fetch, raw = parsed
        try:
            outputs = self._run(feeds, [s.name for s in fetch], lods)
        except Exception as exc:  # noqa: BLE001 - a failed run is an answer, not a crash
            return self._run_error(exc, request.log_id)
        return self._answer_or_error(outputs, fetch, raw, request.log_id)

    async def handle_async(self, request: service_pb2.Request,
                           timeout: Optional[float] = None) -> service_pb2.Response:
        """``handle`` for an event loop: the predictor runs elsewhere (``submit``), the loop is never blocked
        waiting for it, and a run that takes over ``predict_timeout`` seconds gets ``ErrNo.TIMEOUT``.
        ``timeout`` (the client's deadline, seconds) shortens that wait when it is shorter."""
        return profiled(request, time.time_ns(), await self._handle_async(request, timeout))

    async def _handle_async(self, request: service_pb2.Request, timeout: Optional[float]) -> service_pb2.Response:
        parsed = self._parse_or_error(request)
        if isinstance(parsed, service_pb2.Response):
            return parsed
        feeds, lods, fetch, raw = parsed
        limit = self.predict_timeout
        if timeout is not None and (limit is None or timeout < limit):
            limit = max(0.0, timeout)
        deadlines = None
        if limit is not None and limit == self.predict_timeout:   # every such wait ends later than the one before
            deadlines = self._deadlines
            if deadlines is None or deadlines.loop is not asyncio.get_running_loop():
                deadlines = self._deadlines = _Deadlines(asyncio.get_running_loop())
        try:
            outputs = await _wait(self._submit(feeds, [s.name for s in fetch], lods), limit, deadlines)
        except _Expired:
            if limit != self.predict_timeout:
                return error_response(ErrNo.TIMEOUT, f"the client's deadline ({limit:.3g}s) passed before the "
                                                   f"predictor answered", request.log_id)
            return error_response(ErrNo.TIMEOUT, f"the predictor did not answer within --predict_timeout "
                                               f"{self.predict_timeout:g}s", request.log_id)
        except Exception as exc:  # noqa: BLE001 - a failed run is an answer, not a crash
            return self._run_error(exc, request.log_id)
        return self._answer_or_error(outputs, fetch, raw, request.log_id)

    def _parse_or_error(self, request: service_pb2.Request):
        try:
            return self.parse(request)
        except RequestError as exc:
            return error_response(ErrNo.INPUT, str(exc), request.log_id)
        except Exception as exc:  # noqa: BLE001 - whatever a malformed request trips, it is the request's fault
            logger.warning("request (log_id %s) rejected by an unexpected check: %r", request.log_id, exc)
            return error_response(ErrNo.INPUT, f"malformed request: {exc}", request.log_id)

    def _run_error(self, exc: Exception, log_id: int) -> service_pb2.Response:
        from .batcher import BatcherClosed

        if isinstance(exc, BatcherClosed):
            return error_response(ErrNo.SHUTDOWN, str(exc), log_id)
        if isinstance(exc, PredictorTimeout):
            return error_response(ErrNo.TIMEOUT, str(exc), log_id)
        if isinstance(exc, ModelRejectedInput):
            return error_response(ErrNo.INPUT, str(exc), log_id)
        if isinstance(exc, WorkerLost):
            return error_response(ErrNo.INTERNAL, str(exc), log_id)   # logged by the worker pool
        logger.error("predictor failed (log_id %s): %r", log_id, exc)
        return error_response(ErrNo.INTERNAL, f"predictor failed: {exc}", log_id)

    def _answer_or_error(self, outputs: dict, fetch: list, raw: bool, log_id: int) -> service_pb2.Response:
        try:
            return self.answer(outputs, fetch, raw, log_id)
        except Exception as exc:  # noqa: BLE001 - e.g. an output dtype the protocol cannot carry
            logger.error("cannot encode the answer (log_id %s): %r", log_id, exc)
            return error_response(ErrNo.INTERNAL, f"cannot encode the answer: {exc}", log_id)

    # -- request -> arrays ----------------------------------------------------------------------------
    def parse(self, request: service_pb2.Request):
        """(feeds by real name, lods by real name, fetch specs, raw answer?) or RequestError.

        Raises:
            RequestError: more tensors than feeds, a missing or doubled feed, feeds of different batch sizes, an unknown
                fetch, a bad LoD or a tensor that does not fit its feed.
        """
        if self._tables_of is not self.config:
            self._tables()
        feeds: dict[str, np.ndarray] = {}
        lods: dict[str, list] = {}
        raw = False
        batch: Optional[int] = None
        if len(request.tensor) > len(self.config.feeds):
            raise RequestError(f"{len(request.tensor)} tensors for a model of {len(self.config.feeds)} feed(s) "
                               f"{self.config.feed_names}")
        for index, tensor in enumerate(request.tensor):
            spec = self._feed_spec(tensor, index)
            if spec.name in feeds:
                raise RequestError(f"feed {spec.alias_name!r} is given twice")
            array = self._decode(tensor, spec)
            raw = raw or is_raw(tensor)
            samples = int(array.shape[0])
            if spec.is_lod_tensor:   # bad offsets must never reach Paddle Inference (see teachers/lod_checks.py)
                try:
                    array, lods[spec.name], samples = check_lod_feed(spec.alias_name, array, tensor.lod)
                except LodError as exc:
                    raise RequestError(str(exc)) from None
            if batch is not None and samples != batch:
                raise RequestError(f"feed {spec.alias_name!r} has batch size {samples}, other feeds have "
                                   f"{batch}; every feed must carry the same number of samples")
            batch = samples
            feeds[spec.name] = array
        missing = [s for s in self.config.feeds if s.name not in feeds] if len(feeds) < len(self.config.feeds) else ()
        if missing:
            expected = "; ".join(f"{s.alias_name!r}: {_describe(s)}" for s in missing)
            raise RequestError(f"missing feed(s): {expected}")
        names = request.fetch_var_names or self.config.fetch_names
        fetch_by_key = self._fetch_by_key
        fetch = []
        for name in names:
            spec = fetch_by_key.get(name)
            if spec is None:
                raise RequestError(f"unknown fetch {name!r}; the model's fetches are {self.config.fetch_names}")
            if spec not in fetch:    # a fetch named again (or by its other name) is answered once
                fetch.append(spec)
        return feeds, lods, fetch, raw

    def _tables(self) -> None:
        """Feeds by real name and by alias, fetches by either (the first spec wins, as a scan in order would);
        built aside and published at once, so a thread calling ``handle`` meanwhile never sees half of them."""
        config = self.config
        by_name: dict[str, VarSpec] = {}
        by_alias: dict[str, VarSpec] = {}
        fetch_by_key: dict[str, VarSpec] = {}
        for spec in config.feeds:
            by_name.setdefault(spec.name, spec)
            by_alias.setdefault(spec.alias_name, spec)
        for spec in config.fetches:
            fetch_by_key.setdefault(spec.alias_name, spec)
            fetch_by_key.setdefault(spec.name, spec)
        self._feed_by_name, self._feed_by_alias, self._fetch_by_key = by_name, by_alias, fetch_by_key
        self._tables_of = config

    def _feed_spec(self, tensor: service_pb2.Tensor, index: int) -> VarSpec:
        # Real Paddle Serving matches by the real name; accept the alias too; an unnamed tensor by position.
        name, alias = tensor.name, tensor.alias_name
        if not name and not alias:
            return self.config.feeds[index]
        for key in (name, alias):
            if key:
                spec = self._feed_by_name.get(key) or self._feed_by_alias.get(key)
                if spec is not None:
                    return spec
        given = alias or name
        raise RequestError(f"unknown feed {given!r}; the model's feeds are "
                           f"{[f'{s.alias_name}: {_describe(s)}' for s in self.config.feeds]}")

    def _decode(self, tensor: service_pb2.Tensor, spec: VarSpec) -> np.ndarray:
        label = f"feed {spec.alias_name!r}"
        if tensor.elem_type != spec.elem_type:
            try:
                got = str(dtype_of_elem_type(tensor.elem_type))
            except TensorCodecError:
                got = "unsupported"
            raise RequestError(f"{label}: elem_type {tensor.elem_type} ({got}), the model expects {_describe(spec)}")
        if not tensor.shape:
            raise RequestError(f"{label}: the tensor has no shape; the model expects {_describe(spec)}")
        try:
            array = decode_tensor(tensor, what=label)
        except TensorCodecError as exc:
            raise RequestError(f"{exc}; the model expects {_describe(spec)}") from None
        if spec.is_lod_tensor:
            return array
        per_sample = array.shape[1:]
        if per_sample == spec.shape:
            return array
        known = all(d >= 0 for d in spec.shape)
        if known and math.prod(per_sample) == math.prod(spec.shape):
            return array.reshape((array.shape[0], *spec.shape))  # same elements per sample, other layout
        if not known and len(per_sample) == len(spec.shape) and all(
                d < 0 or d == g for d, g in zip(spec.shape, per_sample)):
            return array
        raise RequestError(f"{label}: shape {list(array.shape)} ({math.prod(per_sample)} elements per sample), "
                           f"the model expects {_describe(spec)}")

    # -- arrays -> response ---------------------------------------------------------------------------
    def answer(self, outputs: dict, fetch: list, raw: bool, log_id: int) -> service_pb2.Response:
        response = service_pb2.Response(log_id=log_id, err_no=0)
        model_output = response.outputs.add(engine_name=ENGINE_NAME)
        for spec in fetch:
            array, lod = outputs[spec.name]
            encode_tensor(array, name=spec.name, alias_name=spec.alias_name, raw=raw, lod=lod or None,
                          out=model_output.tensor.add())
        return response


def profiled(request: service_pb2.Request, received_ns: int, response: service_pb2.Response) -> service_pb2.Response:
    """``response`` with Paddle Serving's profile when ``request.profile_server`` asks for it: ``profile_time`` holds
    the server's own timestamps in microseconds (here when the request was taken and when it was answered), so a
    client can tell the time its request spent at the server from the time it spent on the network."""
    if request.profile_server:
        response.profile_server = True
        response.profile_time.extend([received_ns // 1000, time.time_ns() // 1000])
    return response


class _Expired(Exception):
    """``predict_timeout`` passed before the predictor answered."""


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())


async def _wait(pending: PendingRun, timeout: Optional[float], deadlines: Optional[_Deadlines] = None):
    """Await a queued run from the event loop, giving up after ``timeout`` seconds (then _Expired); a run
    that has not started by then, or whose request is cancelled meanwhile, never starts. No task, no
    thread-side Future (cheaper than ``asyncio.wait_for(asyncio.wrap_future(...))``); the timeout is watched by
    ``deadlines`` when given (one timer for every wait of that length), else by a timer of its own."""
    waiter = pending.waiter
    timer = entry = None
    if deadlines is not None:
        entry = deadlines.add(waiter, timeout)
    elif timeout is not None:
        timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
    try:
        return await waiter
    finally:
        if entry is not None:
            deadlines.done(entry)
        elif timer is not None:
            timer.cancel()
        if not waiter.done() or waiter.cancelled() or isinstance(waiter.exception(), _Expired):
            pending.cancel()


class _Deadlines:
    """Waits of one length, so each ends after the one added before it (a FIFO), watched by one timer armed
    for the oldest unfinished one: a wait costs a list and an append, not a ``call_later`` + ``cancel`` (and
    the heap upkeep of one cancelled timer per request). Loop thread only.

    ``add(waiter, seconds)`` -> an entry; ``done(entry)`` when the wait is over (it drops the waiter). When
    the timer fires, every waiter whose deadline has passed gets ``_Expired``.
    """

    __slots__ = ("loop", "_queue", "_timer", "_live")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._queue: collections.deque = collections.deque()    # [deadline (loop.time()), waiter or None]
        self._timer: Optional[asyncio.TimerHandle] = None
        self._live = 0

    def add(self, waiter: asyncio.Future, seconds: float) -> list:
        queue_ = self._queue
        while queue_ and queue_[0][1] is None:      # finished waits at the head
            queue_.popleft()
        if len(queue_) > 1024 and len(queue_) > 4 * self._live:   # finished ones behind a long wait
            self._queue = queue_ = collections.deque(e for e in queue_ if e[1] is not None)
        entry = [self.loop.time() + seconds, waiter]
        queue_.append(entry)
        self._live += 1
        if self._timer is None:
            self._timer = self.loop.call_at(entry[0], self._fire)
        return entry

    def done(self, entry: list) -> None:
        if entry[1] is not None:
            entry[1] = None
            self._live -= 1

    def _fire(self) -> None:
        self._timer = None
        now = self.loop.time()
        queue_ = self._queue
        while queue_:
            deadline, waiter = queue_[0]
            if waiter is not None:
                if deadline > now:
                    self._timer = self.loop.call_at(deadline, self._fire)
                    return
                _expire(waiter)     # its wait's ``finally`` calls done()
            queue_.popleft()


def error_response(err_no: int, message: str, log_id: int = 0) -> service_pb2.Response:
    """An error answer, as Paddle Serving sends it: ``err_no`` != 0 (an ``ErrNo``) and ``err_msg``."""
    return service_pb2.Response(err_no=int(err_no), err_msg=message, log_id=log_id)
