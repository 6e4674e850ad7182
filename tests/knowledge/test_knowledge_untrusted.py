"""Knowledge files as untrusted input (issue 15): each attack on a cache folder, with real files, FIFOs and links.

A cache may come from someone else (a shared folder, a download): the reader and the writer never follow a link
inside it, never open a FIFO or a directory as a file, create their temporaries exclusively, bound every size the
manifest declares before allocating, and fail with a named ``KnowledgeError`` (the CLI with its documented code).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from distill_reader.knowledge import (
    CorruptShardError,
    FormatError,
    KnowledgeError,
    KnowledgeReader,
    KnowledgeWriter,
    SizeLimitError,
    UnsafeFileError,
    UnsafeShardError,
)
from tests.support.procs import REPO_ROOT

FIELDS = {"logits": ((10,), "float32")}
EXIT_CORRUPT, EXIT_UNREADABLE = 1, 3


def _write(path, n=40, complete=True, shard_samples=16) -> np.ndarray:
    logits = np.arange(n * 10, dtype=np.float32).reshape(n, 10)
    writer = KnowledgeWriter(path, FIELDS, shard_samples=shard_samples)
    writer.append({"logits": logits})
    writer.close(complete=complete)
    return logits


def _cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "distill_reader.knowledge", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def _assert_clean_exit(done, code, *phrases):
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


# ---------------------------------------------------------------- the writer


def test_planted_manifest_temp_symlink_never_overwrites_its_target(tmp_path):
    """Attack: resuming a cache whose folder holds ``manifest.json.tmp`` -> a file outside. Before: the manifest was
    written through the link, overwriting the outside file."""
    path = tmp_path / "cache"
    _write(path, n=20, complete=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, path / "manifest.json.tmp")
    with KnowledgeWriter(path, FIELDS, shard_samples=16) as writer:  # resume, then commit and complete
        assert writer.num_samples == 20
        writer.append({"logits": np.zeros((4, 10), np.float32)})
    assert victim.read_text() == "precious"
    assert not os.path.lexists(path / "manifest.json.tmp")
    with KnowledgeReader(path) as reader:
        assert reader.complete and reader.num_samples == 24


def test_planted_shard_temp_symlink_never_overwrites_its_target(tmp_path):
    path = tmp_path / "cache"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    with KnowledgeWriter(path, FIELDS, shard_samples=8) as writer:
        os.symlink(victim, path / "shard-000000.bin.tmp")  # planted while the writer runs
        writer.append({"logits": np.ones((8, 10), np.float32)})
    assert victim.read_text() == "precious"
    with KnowledgeReader(path) as reader:
        assert np.array_equal(reader.read(0, 8)["logits"], np.ones((8, 10), np.float32))


def test_planted_lock_symlink_is_refused(tmp_path):
    path = tmp_path / "cache"
    path.mkdir()
    outside = tmp_path / "created-outside"
    os.symlink(outside, path / ".lock")
    with pytest.raises(UnsafeFileError, match=r"\.lock is a symbolic link"):
        KnowledgeWriter(path, FIELDS)
    assert not os.path.lexists(outside)


def test_overwrite_removes_links_not_their_targets(tmp_path):
    path = tmp_path / "cache"
    _write(path, n=20)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    os.remove(path / "shard-000001.bin")
    os.symlink(outside, path / "shard-000001.bin")
    os.mkdir(path / "shard-000009.bin")
    with KnowledgeWriter(path, FIELDS, overwrite=True) as writer:
        writer.append({"logits": np.zeros((2, 10), np.float32)})
    assert (outside / "keep.txt").read_text() == "keep"
    assert sorted(os.listdir(path)) == [".lock", "manifest.json", "shard-000000.bin"]


# ---------------------------------------------------------------- the reader and the CLI


def test_shard_symlinked_outside_is_not_read(tmp_path):
    """Attack: a shard that is a symlink to a file outside the folder (here with the right checksum). Before: read."""
    path = tmp_path / "cache"
    _write(path)
    outside = tmp_path / "outside.bin"
    os.replace(path / "shard-000001.bin", outside)
    os.symlink(outside, path / "shard-000001.bin")
    with KnowledgeReader(path) as reader:
        reader.read(0, 16)
        with pytest.raises(UnsafeShardError, match=r"shard-000001\.bin .*is a symbolic link") as caught:
            reader.read(16, 32)
        assert caught.value.shard == "shard-000001.bin" and isinstance(caught.value, CorruptShardError)
    _assert_clean_exit(_cli("inspect", str(path)), EXIT_CORRUPT, "shard-000001.bin", "symbolic link")
    _assert_clean_exit(_cli("inspect", "--no-verify", str(path)), EXIT_CORRUPT, "shard-000001.bin", "symbolic link")


def test_fifo_shard_never_blocks_the_reader_or_the_cli(tmp_path):
    """Attack: a shard that is a FIFO. Before: the reader and ``inspect`` blocked forever opening it."""
    path = tmp_path / "cache"
    _write(path)
    os.remove(path / "shard-000000.bin")
    os.mkfifo(path / "shard-000000.bin")
    code = ("import sys\nfrom distill_reader.knowledge import KnowledgeReader, UnsafeShardError\n"
            f"r = KnowledgeReader({str(path)!r})\n"
            "try:\n    r.read(0, 4)\nexcept UnsafeShardError as exc:\n    print('refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    assert "refused:" in done.stdout and "is a FIFO" in done.stdout, (done.stdout, done.stderr)
    _assert_clean_exit(_cli("inspect", str(path)), EXIT_CORRUPT, "shard-000000.bin", "FIFO")
    _assert_clean_exit(_cli("inspect", "--no-verify", str(path)), EXIT_CORRUPT, "FIFO")


def test_directory_shard_is_a_named_error(tmp_path):
    """Attack: a shard that is a directory. Before: a raw IsADirectoryError."""
    path = tmp_path / "cache"
    _write(path)
    os.remove(path / "shard-000002.bin")
    os.mkdir(path / "shard-000002.bin")
    with KnowledgeReader(path) as reader:
        with pytest.raises(UnsafeShardError, match=r"shard-000002\.bin .*is a directory"):
            reader.read(32, 40)
    _assert_clean_exit(_cli("inspect", str(path)), EXIT_CORRUPT, "shard-000002.bin", "directory")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_manifest_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    path = tmp_path / "cache"
    _write(path)
    manifest = path / "manifest.json"
    if kind == "symlink":
        os.replace(manifest, tmp_path / "elsewhere.json")
        os.symlink(tmp_path / "elsewhere.json", manifest)
    else:
        os.remove(manifest)
        os.mkfifo(manifest) if kind == "fifo" else os.mkdir(manifest)
    with pytest.raises(UnsafeFileError, match="manifest.json"):
        KnowledgeReader(path)
    _assert_clean_exit(_cli("inspect", str(path)), EXIT_UNREADABLE, "manifest.json")


def _forge_topk_cache(path, classes: int, n: int = 4) -> None:
    """A cache whose top-k field declares ``classes`` classes, with one well-formed shard of ``n`` samples."""
    path.mkdir()
    values = np.ones((n, 1), "<f4").tobytes()
    indices = np.zeros((n, 1), "<u4").tobytes()
    data = values + b"\0" * (64 - len(values)) + indices
    (path / "shard-000000.bin").write_bytes(data)
    manifest = {
        "format": "distill-reader-knowledge", "version": 1, "checksum": "sha256",
        "fields": [{"name": "logits", "shape": [classes], "dtype": "float32", "storage": "topk", "k": 1,
                    "fill": "0.0"}],
        "input_digests": False, "input_digest_scheme": None, "num_samples": n, "complete": True, "meta": {},
        "shards": [{"file": "shard-000000.bin", "start": 0, "stop": n, "nbytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "crc32": zlib.crc32(data),
                    "segments": [{"field": "logits", "part": "values", "offset": 0, "nbytes": 4 * n, "dtype": "<f4",
                                  "shape": [n, 1]},
                                 {"field": "logits", "part": "indices", "offset": 64, "nbytes": 4 * n,
                                  "dtype": "<u4", "shape": [n, 1]}]}]}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_topk_with_huge_declared_classes_is_refused_before_allocating(tmp_path):
    """Attack: a top-k field declared with 2^29 classes in an 80-byte shard. Before: a dense read allocated 8 GiB."""
    path = tmp_path / "cache"
    _forge_topk_cache(path, classes=1 << 29)
    assert os.path.getsize(path / "shard-000000.bin") == 80
    with KnowledgeReader(path) as reader:
        sparse = KnowledgeReader(path, topk_as="sparse")
        assert sparse.read(0, 4)["logits"].values.shape == (4, 1)  # the bytes present are fine to read
        sparse.close()
        with pytest.raises(SizeLimitError, match=r"field 'logits'.* 8589934592 bytes.*max_dense_bytes"):
            reader.read(0, 4)
    with KnowledgeReader(path, max_dense_bytes=1 << 40) as reader:  # the limit can be raised on purpose
        assert reader.max_dense_bytes == 1 << 40
    _assert_clean_exit(_cli("inspect", str(path)), 0)


def test_declared_sizes_beyond_what_numpy_can_hold_are_format_errors(tmp_path):
    path = tmp_path / "cache"
    _write(path, n=8)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["fields"][0]["shape"] = [0, 1 << 62, 1 << 62]
    manifest["shards"] = []
    manifest["num_samples"] = 0
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="shape .* too large"):
        KnowledgeReader(path)


def test_deeply_nested_or_huge_manifest_is_a_format_error(tmp_path):
    path = tmp_path / "cache"
    _write(path, n=8)
    (path / "manifest.json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(FormatError, match="manifest.json"):
        KnowledgeReader(path)
    _assert_clean_exit(_cli("inspect", str(path)), EXIT_UNREADABLE, "manifest.json")


def test_cli_on_paths_that_are_not_caches(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _assert_clean_exit(_cli("inspect", str(a_file)), EXIT_UNREADABLE, "not a knowledge cache")
    _assert_clean_exit(_cli("inspect", str(tmp_path / "missing")), EXIT_UNREADABLE, "not a knowledge cache")


def test_every_failure_is_a_knowledge_error():
    for error in (UnsafeFileError, UnsafeShardError, SizeLimitError, FormatError, CorruptShardError):
        assert issubclass(error, KnowledgeError)
