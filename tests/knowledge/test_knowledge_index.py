"""DigestIndex (input digest -> stored row) and KnowledgeReader.take (rows in any order), against plain Python."""
import numpy as np
import pytest

from distill_reader.knowledge import KnowledgeReader, KnowledgeWriter, sample_digests
from distill_reader.knowledge.index import DigestIndex


def _digest(high: int, low: int) -> np.ndarray:
    return np.array([[high, low]], "<u8").view(np.uint8).reshape(1, 16)


def test_lookup_equals_a_dict_with_duplicates_and_absent_digests():
    rng = np.random.RandomState(0)
    x = rng.randn(500, 7).astype("float32")
    x[300] = x[17]
    x[400] = x[17]
    stored = sample_digests({"x": x})
    first = {}
    for row, d in enumerate(stored):
        first.setdefault(d.tobytes(), row)
    queries = np.concatenate([stored[rng.permutation(500)], sample_digests({"x": rng.randn(20, 7).astype("f4")})])
    got = DigestIndex(stored).lookup(queries)
    want = [first.get(q.tobytes(), -1) for q in queries]
    assert got.tolist() == want and got[-20:].tolist() == [-1] * 20
    assert DigestIndex(stored).lookup(stored[[300, 400]]).tolist() == [17, 17]   # equal inputs: the first row


def test_digests_sharing_their_first_word_are_told_apart():
    stored = np.concatenate([_digest(5, 9), _digest(5, 3), _digest(1, 9), _digest(5, 7), _digest(5, 3)])
    index = DigestIndex(stored)
    queries = np.concatenate([_digest(5, 7), _digest(5, 3), _digest(5, 8), _digest(1, 9), _digest(2, 9),
                              _digest(5, 9), _digest(6, 0)])
    assert index.lookup(queries).tolist() == [3, 1, -1, 2, -1, 0, -1]
    assert DigestIndex(np.zeros((0, 16), np.uint8)).lookup(queries).tolist() == [-1] * 7
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        DigestIndex(np.zeros((3, 8), np.uint8))


@pytest.mark.parametrize("storage", ["float32", "float16", "topk:3"])
def test_take_equals_read_row_by_row_across_shards(tmp_path, storage):
    rng = np.random.RandomState(1)
    logits = rng.randn(70, 6).astype("float32")
    with KnowledgeWriter(str(tmp_path / "k"), {"logits": ((6,), "float32")}, storage=storage, shard_samples=16) as w:
        w.append({"logits": logits})
    rows = np.array([69, 0, 33, 33, 15, 16, 48, 5])
    with KnowledgeReader(str(tmp_path / "k")) as r:
        got = r.take(rows)["logits"]
        want = np.concatenate([r.read(i, i + 1)["logits"] for i in rows])
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
        assert r.take([])["logits"].shape == (0, 6)
        with pytest.raises(IndexError, match="sample 70 out of range"):
            r.take([3, 70])
