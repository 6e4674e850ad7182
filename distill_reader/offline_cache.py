"""Offline mode of DistillReader: ask the teachers once, keep their answers in a knowledge cache, replay it.

``dr.set_offline_cache(path, storage=...)`` puts an ``OfflineCacheStage`` in front of the teachers:

- Samples are keyed by their inputs: each sample's knowledge is stored with a digest of what was sent for it
  (``knowledge.digest``), and every pass finds each sample's knowledge by that digest, so the data may come in any
  order (a shuffled ``paddle.io.DataLoader``), as a subset, or with repeated samples: each sample gets its own
  knowledge, in every epoch, with no extra argument. Samples with identical inputs share one stored row.
- First pass (no cache, or an incomplete one): a batch whose samples the cache holds is served from it; any other
  batch goes to the teachers, and the answers for samples the cache does not hold yet are appended (in pass order,
  with their digests). A pass that ends early (break, Ctrl-C, SIGKILL) leaves the committed shards; the next pass,
  in any order, serves those from the cache and asks the teachers only for the rest. A pass that reaches the end
  marks the cache complete.
- Later passes (same process or a new one): every answer comes from the cache, nothing is sent, and no teacher
  needs to be configured or reachable. A sample whose inputs the cache does not hold (other data, preprocessing,
  dtype) raises ``InputMismatchError`` naming the sample of the pass; nothing is asked of a teacher then.
- ``check_inputs=False`` skips the digests of a reading pass: samples are then read by position, so the data must
  come in the order and number it was written in (fewer or more samples is an error); this is only for speed.
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

from .errors import DistillReaderError
from .knowledge import InputMismatchError, KnowledgeError, KnowledgeReader, KnowledgeWriter
from .knowledge.index import DigestIndex
from .knowledge.manifest import DIGEST_SCHEME, MANIFEST_NAME
from .knowledge.spec import FieldSpec, StorageArg, resolve_fields
from .prediction_stage import PredictionStage, Task, TaskResult
from .ragged_slots import check_storable, task_digests

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
        check_inputs: find each sample's knowledge by a digest of its inputs (default True: any order, each
            sample checked); False reads by position (same order and count as written, nothing checked).
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
        """The serving config stored in the cache (a ``ServingConfig``), or None when there is none.

        Raises:
            OfflineCacheError: the stored serving config is not valid.
        """
        if not os.path.exists(os.path.join(self.path, MANIFEST_NAME)):
            return None
        from google.protobuf import text_format

        from distill_base.proto import general_model_config_pb2
        from distill_base.serving_config import ServingConfig

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
        self._by_key = 0
        self._added: set = set()  # digests appended in this pass
        self._index: Optional[DigestIndex] = None  # of the samples [0, cached) of self.reader
        self._inner_started = False

    # -- PredictionStage ----------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        """Start a pass: read the cache, or write it (asking the teachers) when it is not complete.

        Raises:
            OfflineCacheError: the cache is empty or incomplete and no teacher is set to fill it.
        """
        self._reset_epoch()
        if os.path.exists(os.path.join(self.path, MANIFEST_NAME)):
            if self.reader is None or not self.reader.complete:
                if self.reader is not None:
                    self.reader.close()
                self.reader = KnowledgeReader(self.path)
                self._index = None
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
        """Answer ``task`` from the cache, or pass it to the teachers' stage and store their answer.

        Raises:
            InputMismatchError: in read mode, a sample whose inputs are not in the cache (names it).
        """
        start, stop = task.sample_start, task.sample_start + task.size
        self._seen = max(self._seen, stop)
        if self.mode == "read" and not self.settings.check_inputs:
            self._serve_by_position(task, start, stop)
            return
        digests = task_digests(task.feeds, task.size) if task.size else np.zeros((0, 16), np.uint8)
        rows, in_place = self._cached_rows(start, digests)
        if rows is not None and (rows >= 0).all():
            outputs = self.reader.read(start, stop) if in_place else self.reader.take(rows)
            self._ready.append(TaskResult(task.task_id, {name: outputs[name] for name in self.predicts}))
            self._served += task.size
            self._by_key += 0 if in_place else task.size
            return
        if self.mode == "read":
            raise self._not_cached(start, rows)
        sent = _Sent(task, digests)
        self._sent.append(sent)
        self._by_id[task.task_id] = sent
        self.inner.submit(task)

    def _serve_by_position(self, task: Task, start: int, stop: int) -> None:
        """check_inputs=False: samples [start, stop) of the pass are samples [start, stop) of the cache."""
        if stop > self.cached:
            raise KnowledgeError(f"offline cache {self.path} holds {self.cached} samples, but this pass has "
                                 f"more (samples [{start}, {stop})): the data changed since the cache was written")
        outputs = self.reader.read(start, stop)
        self._ready.append(TaskResult(task.task_id, {name: outputs[name] for name in self.predicts}))
        self._served += task.size

    def _cached_rows(self, start: int, digests: np.ndarray) -> tuple:
        """(stored row of each sample or -1, whether they are rows [start, stop)); (None, False) with no cache."""
        if self.reader is None or not self.cached:
            return None, False
        index = self._digest_index()
        stop = start + digests.shape[0]
        if stop <= self.cached and np.array_equal(self.reader.input_digests(start, stop), digests):
            return np.arange(start, stop, dtype=np.int64), True  # written in this order: one contiguous read
        return index.lookup(digests), False

    def _digest_index(self) -> DigestIndex:
        if self._index is None:
            if not self.reader.has_input_digests or self.reader.digest_scheme != DIGEST_SCHEME:
                raise KnowledgeError(
                    f"offline cache {self.path} holds no input digests of scheme {DIGEST_SCHEME!r} "
                    f"(found {self.reader.digest_scheme!r}): its samples cannot be found by their inputs; read it "
                    "with check_inputs=False (in the order it was written), or delete it and write it again")
            self._index = DigestIndex(self.reader.input_digests(0, self.cached))
        return self._index

    def _not_cached(self, start: int, rows: np.ndarray) -> InputMismatchError:
        missing = np.flatnonzero(rows < 0)
        sample = start + int(missing[0])
        return InputMismatchError(
            f"offline cache {self.path} holds no knowledge for sample {sample} of this pass ({missing.size} of "
            f"samples [{start}, {start + rows.size}) are not among the {self.cached} samples it was written for): "
            "the data, its preprocessing or its dtype changed since the cache was written; delete the cache or "
            "use another path to write it again", sample, None)

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
        """End the pass: commit what was written (a complete pass completes the cache); returns the stats.

        Raises:
            KnowledgeError: a complete pass saw another number of samples than the cache holds (the data changed).
        """
        stats: Dict[str, Any] = {}
        if self._inner_started:
            stats.update(self.inner.end_epoch(complete))
            self._inner_started = False
        stats.update(cache=self.mode, cache_path=self.path, cache_served=self._served, cache_by_key=self._by_key)
        if self.mode == "write":
            self._finish_write(complete)
        elif complete and not self.settings.check_inputs and self._seen != self.cached:
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
        self._seen = self._served = self._by_key = 0
        self._added.clear()

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
        meta = {"written_by": "distill_reader.offline_cache", "predicts": self.predicts}
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
            keep = self._new_rows(sent.digests)
            if keep.size == len(sent.digests):
                self.writer.append(sent.outputs, input_digests=sent.digests)
            elif keep.size:
                self.writer.append({name: array[keep] for name, array in sent.outputs.items()},
                                   input_digests=sent.digests[keep])

    def _new_rows(self, digests: np.ndarray) -> np.ndarray:
        """Positions in ``digests`` of inputs neither stored nor appended in this pass (first of equal ones)."""
        stored = self._digest_index().lookup(digests) if self.reader is not None and self.cached else None
        keep = []
        for i, digest in enumerate(digests):
            key = digest.tobytes()
            if (stored is not None and stored[i] >= 0) or key in self._added:
                continue
            self._added.add(key)
            keep.append(i)
        return np.asarray(keep, dtype=np.int64)

    def _finish_write(self, complete: bool) -> None:
        if complete and (self._sent or self._by_id):
            complete = False  # cannot happen when the pipeline completes; never mark a cache with holes complete
        if self.writer is None and complete and self._seen == 0:
            logger.warning("offline cache %s: the pass had no samples, nothing written", self.path)
            return
        if self.writer is None:
            return
        self.writer.close(complete=complete)
        self.writer = None
        if complete:
            logger.info("offline cache %s complete: %d samples of this pass, %d new", self.path, self._seen,
                        len(self._added))
