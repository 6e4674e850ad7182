"""Offline Pantheon knowledge on the project's knowledge files (``distill_reader.knowledge``), never pickle.

The Pantheon description (shape, dtype, lod level per key) is kept in the manifest's ``meta["pantheon"]``;
knowledge files written by other parts of the project (no such meta) are described from their fields.

Example::

    writer = OfflineKnowledgeWriter("t1_knowledge", {"logits": {"shape": [-1, 10], "dtype": "float32",
                                                                "lod_level": 0}}, use_fp16=True)
    writer.write({"logits": logits})        # any batch sizes
    writer.close()                          # marks the knowledge complete
    reader = OfflineKnowledgeReader("t1_knowledge")
    for batch in reader.batches(): ...
"""
from __future__ import annotations

import atexit
import logging
import os
from collections import OrderedDict
from typing import Dict, Iterator, Mapping, Optional, Union

import numpy as np

from ..knowledge import KnowledgeError, KnowledgeReader, KnowledgeWriter
from .transport import PantheonError

logger = logging.getLogger(__name__)

_READ_CHUNK = 1024  # samples per read; the student re-batches anyway
_META_KEY = "pantheon"


class OfflineKnowledgeWriter:
    """Writes batches of Pantheon knowledge to a knowledge directory (replacing what was there).

    The files are marked complete only by ``close()``: ``Teacher.close()`` after the last ``dump()`` (or the end
    of a ``with Teacher(...)`` block without an error), or the end of ``start_knowledge_service``'s loop. A
    program that ends any other way (an uncaught error, ``sys.exit(1)`` after catching one, a kill, or simply
    no ``close()``) leaves them incomplete (what was written is committed), and the student refuses them.
    """

    def __init__(self, path: Union[str, os.PathLike], desc: Mapping[str, dict], use_fp16: bool = False) -> None:
        self.path = os.fspath(path)
        self.desc = OrderedDict((k, dict(v)) for k, v in desc.items())
        self._storage = "float16" if use_fp16 else "raw"
        self._writer: Optional[KnowledgeWriter] = None
        self.samples = 0
        atexit.register(self._close_at_exit)

    def write(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append one batch (dict key -> array, batch first, keys as described).

        Raises:
            ValueError: the batch's keys differ from the description.
            PantheonError: the knowledge cannot be written.
        """
        if set(batch) != set(self.desc):
            raise ValueError(f"knowledge keys {sorted(batch)} differ from the described {sorted(self.desc)}")
        arrays = {k: np.asarray(batch[k]) for k in self.desc}
        if self._writer is None:
            fields = {k: (tuple(a.shape[1:]), self.desc[k]["dtype"]) for k, a in arrays.items()}
            self._writer = KnowledgeWriter(self.path, fields, storage=self._storage, overwrite=True,
                                           meta={_META_KEY: {"desc": self.desc, "format": 1}})
            logger.info("writing offline knowledge to %s (storage %s)", self.path, self._storage)
        try:
            self._writer.append(arrays)
        except KnowledgeError as exc:
            raise PantheonError(f"cannot write offline knowledge to {self.path}: {exc}") from exc
        self.samples += len(next(iter(arrays.values())))

    def close(self) -> None:
        """Commit everything and mark the knowledge complete."""
        atexit.unregister(self._close_at_exit)
        if self._writer is None:
            self._writer = KnowledgeWriter(self.path, {k: (tuple(max(d, 0) for d in v["shape"][1:]), v["dtype"])
                                                       for k, v in self.desc.items()},
                                           storage=self._storage, overwrite=True,
                                           meta={_META_KEY: {"desc": self.desc, "format": 1}})
        self._writer.close(complete=True)

    def abort(self) -> None:
        """Commit what is written but leave the knowledge incomplete (the student will refuse it)."""
        atexit.unregister(self._close_at_exit)
        if self._writer is not None:
            self._writer.close(complete=False)

    def _close_at_exit(self) -> None:
        """At interpreter exit without ``close()``: commit what was written, but never mark it complete."""
        if self._writer is None:
            return
        logger.error("offline knowledge %s left INCOMPLETE (%d samples committed): the program ended before the "
                     "teacher was closed; call Teacher.close() after the last dump() (or use 'with Teacher(...)') "
                     "to mark it complete", self.path, self.samples)
        self._writer.close(complete=False)


def _is_desc(desc: object) -> bool:
    """A Pantheon description read from a file: key -> {"shape": [int, ...], "dtype": str, "lod_level": int}."""
    return isinstance(desc, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("shape"), list)
        and all(isinstance(d, int) for d in v["shape"]) and isinstance(v.get("dtype"), str)
        and isinstance(v.get("lod_level", 0), int) for k, v in desc.items())


class OfflineKnowledgeReader:
    """Reads complete knowledge files as a Pantheon teacher's description and batches."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        """Check the arguments.

        Raises:
            PantheonError: the knowledge cannot be opened, is incomplete (its teacher did not close it), or its
                description does not match what it stores.
        """
        path = self.path = os.fspath(path)
        try:
            reader = KnowledgeReader(path)
        except (KnowledgeError, OSError) as exc:
            raise PantheonError(f"cannot open offline knowledge {path}: {exc}") from exc
        if not reader.complete:
            samples = reader.num_samples
            reader.close()
            raise PantheonError(f"offline knowledge {path} is incomplete ({samples} samples committed): its teacher "
                                "has not finished writing it, crashed, or never called Teacher.close() after its "
                                "last dump(); run the offline teacher to its end first")
        self._reader = reader
        meta = (reader.meta or {}).get(_META_KEY, {})
        if not isinstance(meta, dict) or ("desc" in meta and not _is_desc(meta["desc"])):
            reader.close()
            raise PantheonError(f"offline knowledge {path}: malformed Pantheon description in its manifest meta")
        if "desc" in meta:
            self.desc: Dict[str, dict] = OrderedDict((k, dict(v)) for k, v in meta["desc"].items())
        else:
            self.desc = OrderedDict((spec.name, {"shape": [-1] + list(spec.shape), "dtype": str(np.dtype(spec.dtype)),
                                                 "lod_level": 0}) for spec in reader.fields)
        stored = [spec.name for spec in reader.fields]
        if sorted(stored) != sorted(self.desc):
            raise PantheonError(f"offline knowledge {path} stores {stored} but describes {list(self.desc)}")

    @property
    def num_samples(self) -> int:
        return self._reader.num_samples

    def batches(self) -> Iterator[Dict[str, np.ndarray]]:
        """Every sample, in order, in chunks (checksums verified as the shards are first used).

        Raises:
            PantheonError: a shard cannot be read or fails its checksum.
        """
        try:
            for chunk in self._reader.iter_batches(_READ_CHUNK):
                yield OrderedDict((k, chunk[k]) for k in self.desc)
        except KnowledgeError as exc:
            raise PantheonError(f"offline knowledge {self.path}: {exc}") from exc

    def close(self) -> None:
        self._reader.close()
