"""Knowledge files: round trips per storage, crash safety with a real SIGKILL, corruption, input checks, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from distill_reader.knowledge import (
    DIGEST_SCHEME,
    CorruptShardError,
    FormatError,
    InputMismatchError,
    KnowledgeError,
    KnowledgeReader,
    KnowledgeWriter,
    TopK,
    sample_digests,
)
from distill_reader.knowledge.__main__ import main as cli_main
from tests.support.procs import REPO_ROOT, ProcessGuard, wait_for

CLASSES = 50


def make_samples(start: int, n: int) -> dict:
    """Deterministic knowledge for samples [start, start + n): a value per sample index, never repeated."""
    idx = np.arange(start, start + n)
    logits = np.sin(np.arange(start * CLASSES, (start + n) * CLASSES, dtype=np.float64)).reshape(n, CLASSES) * 7
    feature = np.cos(np.arange(start * 6, (start + n) * 6, dtype=np.float64)).reshape(n, 2, 3) * 1e-3
    return {"logits": logits.astype(np.float32), "feature": feature.astype(np.float32), "label": idx.astype(np.int64)}


def make_inputs(start: int, n: int) -> dict:
    return {"img": (np.arange(start * 16, (start + n) * 16) % 251).reshape(n, 4, 4).astype(np.float32)}


FIELDS = {"logits": ((CLASSES,), "float32"), "feature": ((2, 3), "float32"), "label": ((), "int64")}


def write_cache(path, total=103, step=9, storage="float32", shard_samples=20, digests=True):
    with KnowledgeWriter(path, FIELDS, storage=storage, shard_samples=shard_samples, meta={"teacher": "t1"}) as w:
        for start in range(0, total, step):
            n = min(step, total - start)
            w.append(make_samples(start, n), input_digests=sample_digests(make_inputs(start, n)) if digests else None)
    return make_samples(0, total)


def test_float32_round_trip_is_bit_for_bit_across_shards(tmp_path):
    expected = write_cache(tmp_path / "c")
    with KnowledgeReader(tmp_path / "c") as r:
        assert r.complete and r.num_samples == 103 and len(r.shards) == 6
        assert [s.stop - s.start for s in r.shards] == [20, 20, 20, 20, 20, 3]
        assert r.meta == {"teacher": "t1"} and r.has_input_digests
        assert {name: (f.shape, f.dtype.name, f.storage) for name, f in r.description.items()} == {
            "logits": ((CLASSES,), "float32", "float32"), "feature": ((2, 3), "float32", "float32"),
            "label": ((), "int64", "raw")}
        whole = r.read(0, 103)
        for name, array in expected.items():
            assert whole[name].dtype == array.dtype
            assert whole[name].tobytes() == array.tobytes(), name
        part = r.read(17, 61)  # spans three shards
        assert np.array_equal(part["label"], np.arange(17, 61))
        assert part["logits"].flags.writeable
        batches = list(r.iter_batches(32))
        assert [len(b["label"]) for b in batches] == [32, 32, 32, 7]
        assert np.array_equal(np.concatenate([b["logits"] for b in batches]), expected["logits"])
        assert [len(b["label"]) for b in r.iter_batches(32, drop_last=True)] == [32, 32, 32]
        view = r.read(21, 29, copy=False)["logits"]
        assert not view.flags.writeable and np.array_equal(view, expected["logits"][21:29])
        empty = r.read(5, 5)
        assert empty["logits"].shape == (0, CLASSES) and empty["label"].dtype == np.int64
        with pytest.raises(IndexError, match=r"\[100, 104\)"):
            r.read(100, 104)


def test_float16_storage_halves_size_and_casts_back(tmp_path):
    expected = write_cache(tmp_path / "h", storage="float16")
    write_cache(tmp_path / "f", storage="float32")
    with KnowledgeReader(tmp_path / "h") as half, KnowledgeReader(tmp_path / "f") as full:
        assert half.description["logits"].storage == "float16"
        assert half.description["label"].storage == "raw"  # integers stay exact
        got = half.read(0, 103)
        assert got["logits"].dtype == np.float32 and got["feature"].dtype == np.float32
        for name in ("logits", "feature"):
            assert np.array_equal(got[name], expected[name].astype(np.float16).astype(np.float32))
            np.testing.assert_allclose(got[name], expected[name], rtol=2 ** -11, atol=2 ** -24)
        assert np.array_equal(got["label"], expected["label"])
        per_sample_full = CLASSES * 4 + 6 * 4 + 8 + 16
        per_sample_half = CLASSES * 2 + 6 * 2 + 8 + 16
        assert full.nbytes >= 103 * per_sample_full and half.nbytes < 103 * per_sample_half + 6 * 5 * 64
    with KnowledgeWriter(tmp_path / "big", {"x": ((2,), "float32")}, storage="float16") as w:
        with pytest.raises(KnowledgeError, match=r"field 'x'.*float16.*1e\+06"):
            w.append({"x": np.array([[1.0, 1e6]], np.float32)})


def test_topk_keeps_exact_largest_entries_sparse_and_dense(tmp_path):
    write_cache(tmp_path / "k", storage={"logits": "topk:5:-inf"})
    expected = make_samples(0, 103)["logits"]
    order = np.argsort(-expected, axis=1, kind="stable")[:, :5]
    with KnowledgeReader(tmp_path / "k", topk_as="sparse") as r:
        assert r.description["logits"].storage_label() == "topk:5:-inf"
        sparse = r.read(10, 70)["logits"]
        assert isinstance(sparse, TopK) and sparse.indices.dtype == np.int64 and sparse.values.dtype == np.float32
        assert np.array_equal(sparse.indices, order[10:70])
        assert np.array_equal(sparse.values, np.take_along_axis(expected, order, axis=1)[10:70])
        assert np.array_equal(r.read(0, 103)["feature"], make_samples(0, 103)["feature"])  # others untouched
    with KnowledgeReader(tmp_path / "k") as r:
        dense = r.read(0, 103)["logits"]
        kept = np.zeros_like(dense, dtype=bool)
        np.put_along_axis(kept, order, True, axis=1)
        assert np.array_equal(dense[kept], expected[kept]) and np.all(np.isneginf(dense[~kept]))
    with KnowledgeReader(tmp_path / "k", topk_fill=0.0) as r:
        assert np.count_nonzero(r.read(0, 103)["logits"]) == 103 * 5
    # a multi-dimensional field: top-k along the last axis; ties go to the lower index
    values = np.array([[[1, 3, 3, 0], [5, 5, 5, 5]]], np.float32)
    with KnowledgeWriter(tmp_path / "m", {"v": ((2, 4), "float32")}, storage="topk:2") as w:
        w.append({"v": values})
    with KnowledgeReader(tmp_path / "m", topk_as="sparse") as r:
        top = r.read(0, 1)["v"]
        assert top.indices.tolist() == [[[1, 2], [0, 1]]] and top.values.tolist() == [[[3, 3], [5, 5]]]
    with pytest.raises(KnowledgeError, match=r"field 'v'.*k=5.*1\.\.4"):
        KnowledgeWriter(tmp_path / "bad", {"v": ((4,), "float32")}, storage="topk:5")
    with pytest.raises(KnowledgeError, match="unknown storage 'top5'"):
        KnowledgeWriter(tmp_path / "bad2", {"v": ((4,), "float32")}, storage="top5")


WRITER_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from tests.knowledge.test_knowledge_files import FIELDS, make_inputs, make_samples
from distill_reader.knowledge import KnowledgeWriter, sample_digests
total, step = 200, 7
with KnowledgeWriter(sys.argv[1], FIELDS, storage={"logits": "topk:8"}, shard_samples=20) as w:
    start = w.num_samples
    print("resumed at", start, flush=True)
    while start < total:
        n = min(step, total - start)
        w.append(make_samples(start, n), input_digests=sample_digests(make_inputs(start, n)))
        start += n
        time.sleep(float(sys.argv[3]))
print("done", flush=True)
"""


def committed(path) -> int:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f)["num_samples"]
    except FileNotFoundError:
        return 0


def test_sigkilled_writer_resumes_from_complete_shards(tmp_path):
    path = str(tmp_path / "cache")
    with ProcessGuard() as guard:
        child = guard.python("-c", WRITER_CHILD, path, REPO_ROOT, "0.05", stdout=subprocess.PIPE, text=True)
        wait_for(lambda: committed(path) >= 60, 20, "three committed shards")
        assert child.poll() is None, "the writer finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
        kept = committed(path)
        assert kept % 20 == 0 and kept < 200
        with KnowledgeReader(path) as r:  # a reader of the interrupted cache sees only complete shards
            assert not r.complete and r.num_samples == kept
            assert np.array_equal(r.read(0, kept)["label"], np.arange(kept))
        second = guard.python("-c", WRITER_CHILD, path, REPO_ROOT, "0", stdout=subprocess.PIPE, text=True)
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 0, out
        assert out.splitlines() == [f"resumed at {kept}", "done"]
    assert not [f for f in os.listdir(path) if f.endswith(".tmp")]
    expected = make_samples(0, 200)
    with KnowledgeReader(path, topk_as="sparse") as r:
        assert r.complete and r.num_samples == 200 and r.verify() == r.nbytes
        got = r.read(0, 200)
        assert np.array_equal(got["label"], np.arange(200))  # every sample exactly once, in order
        assert np.array_equal(got["feature"], expected["feature"])
        assert np.array_equal(got["logits"].indices, np.argsort(-expected["logits"], axis=1, kind="stable")[:, :8])
        r.check_inputs(0, sample_digests(make_inputs(0, 200)))


def test_leftovers_of_a_crash_are_never_read_and_are_removed_on_resume(tmp_path):
    path = tmp_path / "c"
    w = KnowledgeWriter(path, FIELDS, shard_samples=10)
    w.append(make_samples(0, 20))
    w.close(complete=False)  # two committed shards; now fake what a writer killed in the middle leaves behind
    (path / "shard-000002.bin.tmp").write_bytes(b"partial")  # killed while writing the third shard
    (path / "shard-000003.bin").write_bytes(b"\0" * 100)  # killed between rename and manifest replace
    with KnowledgeReader(path) as r:
        assert r.num_samples == 20 and [s.file for s in r.shards] == ["shard-000000.bin", "shard-000001.bin"]
    with KnowledgeWriter(path, FIELDS, shard_samples=10) as again:
        assert again.num_samples == 20
        assert sorted(f for f in os.listdir(path) if f.startswith("shard")) == ["shard-000000.bin", "shard-000001.bin"]
        again.append(make_samples(20, 30))
    with KnowledgeReader(path) as r:
        assert np.array_equal(r.read(0, 50)["label"], np.arange(50))


def test_writer_refuses_mismatch_second_writer_and_complete_cache(tmp_path):
    path = tmp_path / "c"
    with pytest.raises(RuntimeError):
        with KnowledgeWriter(path, FIELDS, shard_samples=10) as w:
            w.append(make_samples(0, 15))
            raise RuntimeError("student crashed")
    with KnowledgeReader(path) as r:
        assert not r.complete and r.num_samples == 15  # pending samples were committed, not marked complete
    with pytest.raises(KnowledgeError, match="other fields or storage"):
        KnowledgeWriter(path, FIELDS, storage="float16")
    with KnowledgeWriter(path, FIELDS) as w:
        with pytest.raises(KnowledgeError, match="being written by another writer"):
            KnowledgeWriter(path, FIELDS)
        with pytest.raises(KnowledgeError, match=r"field 'feature' has shape \(3, 3, 2\)"):
            w.append({**make_samples(15, 3), "feature": np.zeros((3, 3, 2), np.float32)})
        with pytest.raises(KnowledgeError, match=r"missing field\(s\) \['label'\]"):
            w.append({"logits": np.zeros((1, CLASSES)), "feature": np.zeros((1, 2, 3))})
        with pytest.raises(KnowledgeError, match="cannot store dtype float64 as int64"):
            w.append({**make_samples(15, 1), "label": np.zeros(1)})
        reused = make_samples(15, 5)
        w.append(reused)
        reused["logits"][:] = 0  # the caller reuses its buffer before the shard is written
        reused["label"][:] = -1
    with KnowledgeReader(path) as r:
        assert np.array_equal(r.read(15, 20)["logits"], make_samples(15, 5)["logits"])
        assert np.array_equal(r.read(0, 20)["label"], np.arange(20))
    with pytest.raises(KnowledgeError, match="closed"):
        w.append(make_samples(20, 1))
    with pytest.raises(KnowledgeError, match="is complete"):
        KnowledgeWriter(path, FIELDS)
    with KnowledgeWriter(path, FIELDS, overwrite=True) as w:
        assert w.num_samples == 0
        w.append(make_samples(0, 3))
    with KnowledgeReader(path) as r:
        assert r.num_samples == 3 and r.complete


def test_flipped_byte_names_the_shard(tmp_path):
    path = tmp_path / "c"
    expected = write_cache(path)
    shard = path / "shard-000002.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with KnowledgeReader(path) as r:
        assert np.array_equal(r.read(0, 40)["logits"], expected["logits"][:40])  # shards 0 and 1 are fine
        with pytest.raises(CorruptShardError, match=r"shard shard-000002\.bin \(samples \[40, 60\)\) is corrupt") \
                as err:
            r.read(35, 45)
        assert err.value.shard == "shard-000002.bin"
        assert np.array_equal(r.read(60, 103)["label"], np.arange(60, 103))
        with pytest.raises(CorruptShardError) as err:
            r.verify()
        assert err.value.shards == ["shard-000002.bin"]
    with KnowledgeReader(path, lazy_check="sha256", verify_threads=0) as r:
        with pytest.raises(CorruptShardError, match=r"shard-000002\.bin .* is corrupt: sha256"):
            r.read(59, 60)
        with pytest.raises(CorruptShardError) as err:
            r.verify()
        assert err.value.shards == ["shard-000002.bin"]
    (path / "shard-000004.bin").write_bytes(b"short")
    with KnowledgeReader(path) as r:
        with pytest.raises(CorruptShardError, match=r"shard-000004\.bin .* has 5 bytes"):
            r.read(80, 81)


def test_changed_inputs_are_refused_naming_the_sample(tmp_path):
    path = tmp_path / "c"
    write_cache(path)
    inputs = make_inputs(0, 103)
    with KnowledgeReader(path) as r:
        r.check_inputs(0, sample_digests(inputs))
        r.check_inputs(50, sample_digests({"img": inputs["img"][50:70]}))
        changed = inputs["img"].copy()
        changed[47, 2, 1] += 1
        with pytest.raises(InputMismatchError, match=r"sample 47 \(shard shard-000002\.bin\)") as err:
            r.check_inputs(0, sample_digests({"img": changed}))
        assert err.value.sample == 47
        with pytest.raises(InputMismatchError, match="sample 10 "):  # shuffled order
            r.check_inputs(10, sample_digests({"img": inputs["img"][11:20]}))
        with pytest.raises(InputMismatchError):  # same bytes, other dtype
            r.check_inputs(0, sample_digests({"img": inputs["img"].astype(np.float64)}))
        with pytest.raises(InputMismatchError):  # another input name
            r.check_inputs(0, sample_digests({"image": inputs["img"]}))
        with pytest.raises(KnowledgeError, match=r"holds 103 samples, but inputs for samples \[100, 110\)"):
            r.check_inputs(100, sample_digests(make_inputs(100, 10)))
    write_cache(tmp_path / "nodigest", digests=False)
    with KnowledgeReader(tmp_path / "nodigest") as r:
        with pytest.raises(KnowledgeError, match="without input digests"):
            r.check_inputs(0, sample_digests(inputs))


def test_sample_digests_detect_every_byte_order_dtype_and_shape_change():
    rng = np.random.default_rng(5)
    for sample_shape, dtype in [((13,), np.uint8), ((3, 5), np.float32), ((2,), np.float64)]:   # 13 B: padded lanes
        x = (rng.random((6, *sample_shape)) * 200).astype(dtype)
        base = sample_digests({"x": x})
        assert base.shape == (6, 16) and base.dtype == np.uint8 and len({row.tobytes() for row in base}) == 6
        raw = x.view(np.uint8).reshape(6, -1)
        for position in range(raw.shape[1]):   # one changed byte anywhere in sample 4: only that digest changes
            for delta in (1, 128):
                changed = raw.copy()
                changed[4, position] ^= delta
                digests = sample_digests({"x": changed.view(dtype).reshape(x.shape)})
                assert not np.array_equal(digests[4], base[4]), (dtype, position, delta)
                assert np.array_equal(np.delete(digests, 4, axis=0), np.delete(base, 4, axis=0))
        swapped = x[[0, 2, 1, 3, 4, 5]]   # a swapped pair of samples: their digests swap, nothing else moves
        assert np.array_equal(sample_digests({"x": swapped}), base[[0, 2, 1, 3, 4, 5]])
        assert np.array_equal(sample_digests([x]), sample_digests({"0": x}))
        flat = x.reshape(6, -1)
        if x.ndim > 2:   # the same bytes seen with another per-sample shape
            assert not np.any(np.all(sample_digests({"x": flat}) == base, axis=1))
    x = rng.random((4, 8)).astype(np.float32)
    base = sample_digests({"x": x})
    others = [{"x": x.view(np.int32)}, {"x": x.view(">f4")}, {"x": x.reshape(4, 2, 4)}, {"y": x},
              {"x": x, "z": np.zeros((4, 1), np.uint8)}, {"x": np.zeros_like(x)}, {"x": np.zeros((4, 4), np.float64)}]
    for other in others:
        assert not np.any(np.all(sample_digests(other) == base, axis=1)), list(other)
    zeros = sample_digests({"x": np.zeros((2, 8), np.float32)})
    assert not np.array_equal(zeros, sample_digests({"x": np.zeros((2, 8), np.int32)}))   # all-zero bytes too
    with pytest.raises(ValueError, match="first dimension"):
        sample_digests({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))})


_DIGEST_CHILD = """
import sys
import numpy as np
from distill_reader.knowledge import sample_digests
x = (np.arange(2 * 3 * 5) % 7).astype(np.float32).reshape(2, 3, 5)
print(sample_digests({"img": x, "label": np.array([1, 2], np.int64)}).tobytes().hex())
"""


def test_sample_digests_are_fixed_and_the_same_in_another_process():
    x = (np.arange(2 * 3 * 5) % 7).astype(np.float32).reshape(2, 3, 5)
    here = sample_digests({"img": x, "label": np.array([1, 2], np.int64)}).tobytes().hex()
    # pinned: a change of the algorithm must come with a new DIGEST_SCHEME (old caches are then refused)
    assert here == "8fcd4b5d9b5a6f8931d3876208e4a02c1c09a7da5b259eec08814ba98f085dfb"
    child = subprocess.run([sys.executable, "-c", _DIGEST_CHILD], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHONHASHSEED": "123"})
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == here


def test_cache_with_digests_of_another_scheme_is_refused_clearly(tmp_path):
    path = tmp_path / "c"
    write_cache(path, total=30)
    with KnowledgeReader(path) as r:
        assert r.digest_scheme == DIGEST_SCHEME == "mix64x2-v1"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["input_digest_scheme"] == DIGEST_SCHEME
    del manifest["input_digest_scheme"]   # as written before the scheme was recorded (sha256 digests)
    manifest["complete"] = False
    (path / "manifest.json").write_text(json.dumps(manifest))
    with KnowledgeReader(path) as r:
        assert r.digest_scheme == "sha256-128" and r.read(0, 30)["label"].tolist() == list(range(30))
        with pytest.raises(KnowledgeError, match="digests of scheme 'sha256-128', this version computes 'mix64x2-v1'"):
            r.check_inputs(0, sample_digests(make_inputs(0, 30)))
    with pytest.raises(KnowledgeError, match="'sha256-128'.* cannot be resumed"):
        KnowledgeWriter(path, FIELDS, shard_samples=20)


def test_untrusted_manifest_is_checked(tmp_path):
    path = tmp_path / "c"
    write_cache(path, total=30)
    manifest = json.loads((path / "manifest.json").read_text())

    def load_with(change):
        m = json.loads(json.dumps(manifest))
        change(m)
        (path / "manifest.json").write_text(json.dumps(m))
        return KnowledgeReader(path)

    with pytest.raises(FormatError, match=r"shard file name '\.\./\.\./etc/passwd' is not allowed"):
        load_with(lambda m: m["shards"][0].update(file="../../etc/passwd"))
    with pytest.raises(FormatError, match="dtype 'O' is not allowed"):
        load_with(lambda m: m["fields"][0].update(dtype="O"))
    with pytest.raises(FormatError, match="segment"):
        load_with(lambda m: m["shards"][0]["segments"][0].update(offset=10 ** 9))
    with pytest.raises(FormatError, match="format version 2"):
        load_with(lambda m: m.update(version=2))
    with pytest.raises(FormatError, match="not a knowledge cache"):
        KnowledgeReader(tmp_path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "distill_reader.knowledge", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)


def test_cli_inspect_prints_description_and_verifies(tmp_path, capsys):
    path = tmp_path / "c"
    write_cache(path, storage={"logits": "topk:10", "feature": "float16"})
    done = run_cli("inspect", str(path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "logits: shape (50,), dtype float32, storage topk:10:0.0" in out
    assert "feature: shape (2, 3), dtype float32, storage float16" in out
    assert "label: shape (), dtype int64, storage raw" in out
    assert "samples: 103 (complete)" in out and "checksums: ok (6 shards)" in out and "on disk" in out
    assert cli_main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 103 and report["verification"] == "ok" and report["shards"] == 6
    assert report["bytes_on_disk"] >= report["shard_bytes"] > 0

    shard = path / "shard-000003.bin"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = run_cli("inspect", str(path))
    assert done.returncode == 1 and "checksums: CORRUPT" in done.stdout
    assert "shard-000003.bin" in done.stderr and "corrupt" in done.stderr
    assert cli_main(["inspect", "--no-verify", str(path)]) == 0  # sizes are right; only the hash would tell
    capsys.readouterr()
    assert run_cli("inspect", str(tmp_path / "nothing")).returncode == 3

    helped = run_cli("inspect", "--help")
    assert helped.returncode == 0
    for flag in ("--no-verify", "--shards", "--json", "--progress", "PATH", "exit status"):
        assert flag in helped.stdout
    assert run_cli().returncode == 2 and "inspect" in run_cli("--help").stdout


def test_reader_follows_a_live_writer_with_refresh(tmp_path):
    path = tmp_path / "c"
    with KnowledgeWriter(path, FIELDS, shard_samples=10) as w:
        w.append(make_samples(0, 12))  # one shard committed, 2 samples pending
        with KnowledgeReader(path) as r:
            assert r.num_samples == 10 and not r.complete
            w.flush()
            assert r.num_samples == 10  # a snapshot until refresh()
            r.refresh()
            assert r.num_samples == 12 and np.array_equal(r.read(0, 12)["label"], np.arange(12))
            with pytest.raises(IndexError):
                r.read(0, 13)
    with KnowledgeReader(path) as r:
        assert r.complete and r.num_samples == 12
