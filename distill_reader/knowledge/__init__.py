"""Knowledge files: a safe, checked, crash-safe on-disk format for per-sample knowledge (any named arrays).

A cache is a directory: ``manifest.json`` (the knowledge description, the committed shards with their sample
ranges, sizes and sha256, a complete flag, the format version) and ``shard-NNNNNN.bin`` files of raw little-endian
arrays at the offsets the manifest gives. No pickle anywhere; reads are memory-mapped.

Example::

    import numpy as np
    from distill_reader.knowledge import KnowledgeReader, KnowledgeWriter, sample_digests

    x = np.random.rand(100, 784).astype("float32")
    logits = np.random.rand(100, 10).astype("float32")
    with KnowledgeWriter("/tmp/kn", {"logits": ((10,), "float32")}, storage="topk:3") as w:
        w.append({"logits": logits}, input_digests=sample_digests({"x": x}))
    with KnowledgeReader("/tmp/kn", topk_as="sparse") as r:
        r.check_inputs(0, sample_digests({"x": x}))
        top = r.read(0, 100)["logits"]          # TopK(values (100, 3), indices (100, 3))
"""
from .digest import sample_digests
from .errors import (
    CorruptShardError,
    FormatError,
    InputMismatchError,
    KnowledgeError,
    SizeLimitError,
    UnsafeFileError,
    UnsafeShardError,
)
from .manifest import DIGEST_SCHEME, FORMAT_VERSION
from .reader import KnowledgeReader
from .spec import FieldSpec, TopK
from .writer import KnowledgeWriter

__all__ = [
    "DIGEST_SCHEME",
    "FORMAT_VERSION",
    "CorruptShardError",
    "FieldSpec",
    "FormatError",
    "InputMismatchError",
    "KnowledgeError",
    "KnowledgeReader",
    "KnowledgeWriter",
    "SizeLimitError",
    "TopK",
    "UnsafeFileError",
    "UnsafeShardError",
    "sample_digests",
]
