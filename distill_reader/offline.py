"""Offline mode of DistillReader: ask the teachers once, keep their answers in a knowledge cache, replay it.

``dr.set_offline_cache(path, storage=...)`` puts an ``OfflineCacheStage`` in front of the teachers:

- First pass (no cache, or an incomplete one): every task goes to the teachers as usual; answers are appended to
  the cache in sample order, with a digest of what was sent per sample. A pass that ends early (break, Ctrl-C,
  SIGKILL) leaves the committed shards; the next pass serves those from the cache (after checking that the same
  inputs come again) and asks the teachers only for the rest. A pass that reaches the end marks the cache complete.
- Later passes (same process or a new one): every answer comes from the cache, nothing is sent, and no teacher
  needs to be configured or reachable. Inputs that differ from those the cache was written for raise
  ``InputMismatchError`` naming the sample; a generator with fewer or more samples than the cache is an error too.
- Every pass yields the answers as stored (float16-rounded, or top-k rebuilt densely), so all epochs see the same
  soft labels. Top-k fields are rebuilt densely with the fill value of the storage (``topk:K:FILL``).
- The cache keeps the teacher's serving config in its meta, so a later run needs no conf file either.

Example::

    dr = DistillReader(ins=["img", "label"], predicts=["prediction"])
    dr.set_fixed_teacher("127.0.0.1:9292")          # not needed once the cache is complete
    dr.set_offline_cache("/data/mnist_knowledge", storage="float16")
    reader = dr.set_sample_list_generator(train_reader)
"""
from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .knowledge import KnowledgeError, KnowledgeReader, KnowledgeWriter
from .knowledge.manifest import MANIFEST_NAME
from .knowledge.spec import FieldSpec, StorageArg, resolve_fields
from .pipeline import DistillReaderError, PredictionStage, Task, TaskResult
from .ragged import check_storable, task_digests

logger = logging.getLogger(__name__)

# tasks the pipeline may keep pending while reading from the cache: reads are synchronous, so reading further
# ahead hides nothing and only holds more batches in memory (64 held ~230 MB of 256 x 1000-class batches)
READ_IN_FLIGHT = 2


class OfflineCacheError(DistillReaderError):
    """The offline cache cannot serve this pass (no teacher for an incomplete cache, other predicts, ...)."""


class OfflineCache:
    """Settings of the offline mode; ``install(reader)`` puts the cache stage in front of the reader's teachers.

    Args:
        path: the knowledge cache directory.
        storage: ``"float32"`` (default, bit for bit), ``"float16"``, ``"topk:K"`` / ``"topk:K:FILL"``, or a dict
            per predict name (see ``distill_reader.knowledge.spec``).
        shard_samples: samples per shard (what a crash can lose at most); default from the knowledge writer.
        check_inputs: compare a digest of what each pass sends with the one stored (default True).
    """

    def __init__(self, path: str, storage: StorageArg = "float32", shard_samples: Optional[int] = None,
                 check_inputs: bool = True) -> None:
        self.path = os.fspath(path)
        self.storage = storage
        self.shard_samples = shard_samples
        self.check_inputs = check_inputs

    def install(self, reader: Any) -> None:
        """Wrap the teacher stage of ``reader`` (a DistillReader) with an ``OfflineCacheStage``."""
        predicts = list(reader.predicts)

        def config_text() -> str:
            from google.protobuf import text_format

            return text_format.MessageToString(reader.config.to_proto())

        def wrap(inner: PredictionStage) -> OfflineCacheStage:
            try:
                check_storable(reader.config, predicts, self.path)   # variable-length knowledge: refused
            except ValueError as exc:
                raise OfflineCacheError(str(exc)) from None
            return OfflineCacheStage(inner, self, predicts, lambda: reader.has_teachers, config_text)

        reader.add_stage_wrapper(wrap)

    def serving_config(self) -> Optional[Any]:
        """The serving config stored in the cache (a ``ServingConfig``), or None when there is none."""
        if not os.path.exists(os.path.join(self.path, MANIFEST_NAME)):
            return None
        from google.protobuf import text_format

        from .proto import general_model_config_pb2
        from .serving_config import ServingConfig

        with KnowledgeReader(self.path, verify_threads=0) as cache:
            text = cache.meta.get("serving_config")
        if not isinstance(text, str):
            return None
        message = general_model_config_pb2.GeneralModelConfig()
        try:
            text_format.Parse(text, message)
        except text_format.ParseError as exc:
            raise OfflineCacheError(f"offline cache {self.path}: the stored serving config is invalid: {exc}") from None
        return ServingConfig.from_proto(message, source=f"{self.path} (offline cache)")


class _Sent:
    """A task sent to the teachers in a writing pass, waiting for its answer to be appended in order."""

    __slots__ = ("task", "digests", "outputs")

    def __init__(self, task: Task, digests: np.ndarray) -> None:
        self.task = task
        self.digests = digests
        self.outputs: Optional[Dict[str, np.ndarray]] = None


class OfflineCacheStage(PredictionStage):
    """A ``PredictionStage`` that serves answers from a knowledge cache and writes the missing ones to it."""

    def __init__(self, inner: PredictionStage, settings: OfflineCache, predicts: Sequence[str],
                 has_teachers: Callable[[], bool], config_text: Optional[Callable[[], str]] = None) -> None:
        self.inner = inner
        self.config_text = config_text
        self.settings = settings
        self.path = settings.path
        self.predicts = list(predicts)
        self.has_teachers = has_teachers
        self.reader: Optional[KnowledgeReader] = None
        self.writer: Optional[KnowledgeWriter] = None
        self.mode = "read"
        self.cached = 0  # samples [0, cached) of this pass come from the cache
        self._specs: Optional[List[FieldSpec]] = None
        self._ready: List[TaskResult] = []
        self._sent: deque[_Sent] = deque()
        self._by_id: Dict[int, _Sent] = {}
        self._seen = 0
        self._served = 0
        self._inner_started = False

    # -- PredictionStage ----------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        self._reset_epoch()
        if os.path.exists(os.path.join(self.path, MANIFEST_NAME)):
            if self.reader is None or not self.reader.complete:
                if self.reader is not None:
                    self.reader.close()
                self.reader = KnowledgeReader(self.path)
            self._check_fields(self.reader.fields)
            self.cached = self.reader.num_samples
            self.mode = "read" if self.reader.complete else "write"
        else:
            self.mode, self.cached = "write", 0
        if self.mode == "write":
            if not self.has_teachers():
                raise OfflineCacheError(
                    f"the offline cache {self.path} is {'incomplete' if self.cached else 'empty'} "
                    f"({self.cached} samples): this pass needs teachers for the rest; call set_fixed_teacher(...) "
                    "or set_dynamic_teacher(...)")
            if self.reader is not None and self.cached:
                self._open_writer({f.name: (f.shape, f.dtype) for f in self.reader.fields})
                logger.info("offline cache %s: resuming after %d cached samples", self.path, self.cached)
            self.inner.begin_epoch(epoch)
            self._inner_started = True
        else:
            logger.info("offline cache %s: serving %d samples from the cache, no teacher asked", self.path,
                        self.cached)
            if self._storage_differs(self.reader.fields):
                logger.warning("offline cache %s was written with storage %s, not the %r asked now: serving it "
                               "as stored (delete the cache to write it again)", self.path,
                               {f.name: f.storage_label() for f in self.reader.fields}, self.settings.storage)

    def capacity(self) -> int:
        return self.inner.capacity() if self.mode == "write" else READ_IN_FLIGHT - len(self._ready)

    def in_flight_limit(self) -> int:
        return self.inner.in_flight_limit() if self.mode == "write" else READ_IN_FLIGHT

    def submit(self, task: Task) -> None:
        start, stop = task.sample_start, task.sample_start + task.size
        self._seen = max(self._seen, stop)
        need_digests = self.settings.check_inputs or self.mode == "write"
        digests = task_digests(task.feeds, task.size) if need_digests and task.size else None
        if stop <= self.cached or self.mode == "read":
            if stop > self.cached:
                raise KnowledgeError(f"offline cache {self.path} holds {self.cached} samples, but this pass has "
                                     f"more (samples [{start}, {stop})): the data changed since the cache was written")
            if self.settings.check_inputs and task.size:
                self.reader.check_inputs(start, digests)
            outputs = self.reader.read(start, stop)
            self._ready.append(TaskResult(task.task_id, {name: outputs[name] for name in self.predicts}))
            self._served += task.size
            return
        if start < self.cached and self.settings.check_inputs:
            self.reader.check_inputs(start, digests[:self.cached - start])
        sent = _Sent(task, digests)
        self._sent.append(sent)
        self._by_id[task.task_id] = sent
        self.inner.submit(task)

    def poll(self, timeout: float) -> List[TaskResult]:
        results, self._ready = self._ready, []
        if self.mode == "write" and self._by_id:
            for result in self.inner.poll(0.0 if results else timeout):
                sent = self._by_id.pop(result.task_id, None)
                if sent is None:
                    continue  # an answer of an abandoned pass
                sent.outputs = self._as_stored(result.outputs)
                results.append(TaskResult(result.task_id, sent.outputs))
            self._append_in_order()
        return results

    def end_epoch(self, complete: bool) -> Dict[str, Any]:
        stats: Dict[str, Any] = {}
        if self._inner_started:
            stats.update(self.inner.end_epoch(complete))
            self._inner_started = False
        stats.update(cache=self.mode, cache_path=self.path, cache_served=self._served)
        if self.mode == "write":
            self._finish_write(complete)
        elif complete and self._seen != self.cached:
            raise KnowledgeError(f"offline cache {self.path} holds {self.cached} samples but this pass had "
                                 f"{self._seen}: the data changed since the cache was written")
        return stats

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close(complete=False)
                self.writer = None
            if self.reader is not None:
                self.reader.close()
                self.reader = None
        finally:
            self.inner.close()

    # -- internals ----------------------------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self._ready.clear()
        self._sent.clear()
        self._by_id.clear()
        self._seen = self._served = 0

    def _check_fields(self, fields: List[FieldSpec]) -> None:
        names = [f.name for f in fields]
        if sorted(names) != sorted(self.predicts):
            raise OfflineCacheError(f"offline cache {self.path} holds {names}, this reader predicts {self.predicts}: "
                                    "use another path for other predicts")
        self._specs = fields

    def _storage_differs(self, fields: List[FieldSpec]) -> bool:
        try:
            wanted = resolve_fields({f.name: (f.shape, f.dtype) for f in fields}, self.settings.storage)
        except KnowledgeError:
            return True
        return wanted != fields

    def _open_writer(self, fields: Dict[str, tuple]) -> None:
        meta = {"written_by": "distill_reader.offline", "predicts": self.predicts}
        if self.config_text is not None:
            meta["serving_config"] = self.config_text()
        self.writer = KnowledgeWriter(self.path, fields, storage=self.settings.storage,
                                      shard_samples=self.settings.shard_samples, meta=meta)
        self._specs = self.writer.fields
        if self.writer.num_samples != self.cached:
            raise KnowledgeError(f"offline cache {self.path} changed while opening it ({self.cached} -> "
                                 f"{self.writer.num_samples} samples)")

    def _as_stored(self, outputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.writer is None:
            missing = [name for name in self.predicts if name not in outputs]
            if missing:
                raise OfflineCacheError(f"the teachers' answers lack {missing}")
            self._open_writer({name: (np.shape(outputs[name])[1:], np.asarray(outputs[name]).dtype)
                               for name in self.predicts})
        return {f.name: f.as_stored(outputs[f.name]) for f in self._specs}

    def _append_in_order(self) -> None:
        while self._sent and self._sent[0].outputs is not None:
            sent = self._sent.popleft()
            skip = max(0, self.cached - sent.task.sample_start)  # rows of a task that are already cached
            self.writer.append({name: array[skip:] for name, array in sent.outputs.items()},
                               input_digests=sent.digests[skip:])

    def _finish_write(self, complete: bool) -> None:
        if complete and (self._sent or self._by_id):
            complete = False  # cannot happen when the pipeline completes; never mark a cache with holes complete
        if self.writer is None and complete and self._seen == 0:
            logger.warning("offline cache %s: the pass had no samples, nothing written", self.path)
            return
        if self.writer is None:
            return
        if complete and self._seen < self.writer.num_samples:
            self.writer.close(complete=False)
            self.writer = None
            raise KnowledgeError(f"offline cache {self.path} already holds {self.cached} samples but this pass had "
                                 f"only {self._seen}: the data changed since the cache was written")
        self.writer.close(complete=complete)
        self.writer = None
        if complete:
            logger.info("offline cache %s complete: %d samples", self.path, self._seen)
