"""Write the seed corpus (``tests/fuzz/corpus/<harness>/seed-*``) with the project's own encoders and writers.

Seeds are valid inputs; the corpus folders also hold every input that ever found a fault: ``fault-issue-*``
(the inputs issue 26 lists, written here too) and ``fault-found-*`` (findings of later fuzzing runs, copied in
by hand, never rewritten here). Run from the repository root::

    python -m tests.fuzz.make_corpus            # rewrites the seed-* and fault-issue-* files
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import tempfile
from typing import Dict, List

import numpy as np  # noqa: I001 - numpy before anything that may import paddle
from google.protobuf import json_format

from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.tensor_codec import encode_tensor
from distill_reader.knowledge import KnowledgeWriter
from distill_reader.knowledge.manifest import MANIFEST_NAME
from distill_reader.pantheon.frames import encode_frame
from distill_reader.pantheon.knowledge_merge import describe

from .harnesses import DENSE_CONFIG, HARNESSES, LOD_CONFIG

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
_U4 = struct.Struct("<I")


def _dense_request(raw: bool, batch: int = 2) -> service_pb2.Request:
    request = service_pb2.Request(fetch_var_names=["prob", "emb"], log_id=7)
    rng = np.random.default_rng(batch)
    encode_tensor(rng.random((batch, 2, 3), dtype="float32"), "x", raw=raw, out=request.tensor.add())
    encode_tensor(rng.integers(0, 300, (batch, 5)), "ids", raw=raw, out=request.tensor.add())
    encode_tensor(rng.random((batch, 4)) > 0.5, "mask", raw=raw, out=request.tensor.add())
    return request


def _lod_request(raw: bool, lengths: List[int]) -> service_pb2.Request:
    request = service_pb2.Request(fetch_var_names=["seq", "prob"])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    encode_tensor(np.arange(offsets[-1], dtype="int64").reshape(-1, 1), "words", raw=raw, lod=offsets,
                  out=request.tensor.add())
    encode_tensor(np.ones((len(lengths), 2), "float32"), "w", raw=raw, out=request.tensor.add())
    return request


def _response(raw: bool) -> service_pb2.Response:
    response = service_pb2.Response(err_no=0, log_id=3)
    output = response.outputs.add(engine_name="general_infer_0")
    output.tensor.append(encode_tensor(np.full((2, 3), 0.25, "float32"), "prob", raw=raw))
    output.tensor.append(encode_tensor(np.arange(10, dtype="float64").reshape(2, 5), "emb", raw=raw))
    return response


def _tensors() -> List[bytes]:
    arrays = [np.arange(6).reshape(2, 3).astype(dt) for dt in
              ("int64", "float32", "int32", "float64", "int16", "float16", "uint8", "int8", "bool", "complex64",
               "complex128")]
    out = [encode_tensor(a, "t", raw=raw).SerializeToString() for a in arrays for raw in (True, False)]
    strings = service_pb2.Tensor(name="s", elem_type=20, shape=[2], data=[b"ab", b"c"])
    return out + [strings.SerializeToString(), encode_tensor(np.zeros((0, 4), "float32"), "e").SerializeToString()]


def _knowledge_cache(tmp: str, fields: Dict, storage, digests: bool) -> bytes:
    path = os.path.join(tmp, f"cache{len(os.listdir(tmp))}")
    with KnowledgeWriter(path, fields, storage=storage, meta={"note": "seed"}) as writer:
        arrays = {name: np.arange(4 * int(np.prod(shape) or 1)).reshape((4, *shape)).astype(dtype)
                  for name, (shape, dtype) in fields.items()}
        writer.append(arrays, input_digests=np.arange(64, dtype="uint8").reshape(4, 16) if digests else None)
    with open(os.path.join(path, MANIFEST_NAME), "rb") as f:
        manifest = f.read()
    shard = json.loads(manifest)["shards"][0]["file"]
    with open(os.path.join(path, shard), "rb") as f:
        return _U4.pack(len(manifest)) + manifest + f.read()


def _frame(kind: str, value=None, **fields) -> tuple:
    buffers = encode_frame(kind, value, **fields)
    head = bytes(buffers[0])
    header_len = struct.unpack("!I", head[:4])[0]
    header = head[12:12 + header_len]
    return header, b"".join(bytes(b) for b in buffers[1:])


def _raw_frame(header: dict, body: bytes) -> bytes:
    data = json.dumps(header).encode()
    return _U4.pack(len(data)) + data + body


def _framed(items) -> bytes:
    out = b""
    for header, body in items:
        out += _U4.pack(len(header)) + header + _U4.pack(len(body)) + body
    return out


def seeds() -> Dict[str, List[bytes]]:
    """Valid inputs for every harness, made by the project's encoders and writers."""
    requests = [_dense_request(raw).SerializeToString() for raw in (True, False)] + [
        _dense_request(True, batch=1).SerializeToString()]
    # over the harnesses' decoded-size bound (distill_base/wire_size.py): 400 one-byte int64 varints
    small_ints = service_pb2.Request(fetch_var_names=["prob"])
    encode_tensor(np.zeros((2, 200), "int64"), "ids", raw=False, out=small_ints.tensor.add())
    big_answer = service_pb2.Response()
    big_answer.outputs.add().tensor.append(encode_tensor(np.zeros((2, 200), "int64"), "emb", raw=False))
    json_bodies = [json.dumps(json_format.MessageToDict(_dense_request(raw), preserving_proto_field_name=True)).encode()
                   for raw in (True, False)]
    http = ([bytes([1]) + r for r in requests] + [bytes([0]) + j for j in json_bodies]
            + [bytes([3]) + gzip.compress(requests[0]), bytes([2]) + gzip.compress(json_bodies[1])])
    batch = {"logits": np.ones((2, 3), "float32"), "label": np.arange(2)}
    desc = dict(describe(batch))
    pantheon = [_frame("desc", desc, times=1), _frame("batch", batch), _frame("end", served=1),
                _frame("data", {"x": (1, 2.5, "s", b"by", {3}), "n": np.float32(2)}), _frame("ping")]
    with tempfile.TemporaryDirectory() as tmp:
        shards = [
            _knowledge_cache(tmp, {"logits": ((5,), "float32"), "label": ((), "int64")}, "float32", True),
            _knowledge_cache(tmp, {"logits": ((2, 6), "float32")}, "topk:2:-inf", False),
            _knowledge_cache(tmp, {"feat": ((3,), "float64"), "ok": ((), "bool")}, "raw", False),
        ]
    manifests = [s[4:4 + _U4.unpack_from(s)[0]] for s in shards]
    return {
        "grpc_request": requests + [small_ints.SerializeToString()],
        "http_body": http,
        "lod_merge": [_lod_request(raw, lengths).SerializeToString()
                      for raw, lengths in ((True, [2, 3]), (False, [1, 0, 4]), (True, [1]))],
        "tensor_codec": _tensors(),
        "client_answer": [_response(raw).SerializeToString() for raw in (True, False)] + [
            service_pb2.Response(err_no=5000, err_msg="bad feed").SerializeToString(),
            big_answer.SerializeToString()],
        "knowledge_manifest": manifests,
        "knowledge_shard": shards,
        "pantheon_frame": [_U4.pack(len(h)) + h + b for h, b in pantheon],
        "pantheon_transport": [_framed([pantheon[0], pantheon[1], pantheon[1], pantheon[2]]),
                               _framed([pantheon[4], pantheon[0], pantheon[2]])],
        "zk_nodes": [json.dumps(doc).encode() for doc in (
            {"endpoint": "127.0.0.1:9393", "tls": False, "registered_at": 1.5},
            {"student_id": "s-1", "require_max_teacher": 2},
            {"teachers": ["teacher-0000000001", "teacher-0000000002"], "endpoints": ["10.0.0.1:1", "[::1]:2"]})],
        "endpoints": [b"127.0.0.1:9393", b"[::1]:9292, teacher-a.example:1", b"0.0.0.0:80", b"[fe80::1%eth0]:7",
                      b"localhost"],
        "serving_config": [_config_text(DENSE_CONFIG), _config_text(LOD_CONFIG)],
    }


def issue_faults() -> Dict[str, Dict[str, bytes]]:
    """The inputs issue 26 lists, per harness: each found a fault before it was fixed."""
    lod_request = service_pb2.Request(fetch_var_names=["seq"])
    lod_request.tensor.add(name="words", elem_type=0, shape=[2, 0, 1 << 29, 1 << 29], lod=[0, 1, 2])
    encode_tensor(np.ones((2, 2), "float32"), "w", out=lod_request.tensor.add())
    odd_complex = service_pb2.Tensor(name="c", elem_type=10, shape=[3], complex64_data=[1.0, 2.0, 3.0])
    empty_overflow = service_pb2.Tensor(name="e", elem_type=1, shape=[0, 1 << 30, 1 << 30, 1 << 30])
    empty_strings = service_pb2.Tensor(name="s", elem_type=20, shape=[0, 1 << 30, 1 << 30, 1 << 30])
    answer = _response(True)
    answer.outputs[0].tensor[0].CopyFrom(odd_complex)
    overflow_request = _dense_request(True)
    overflow_request.tensor[1].ClearField("tensor_content")
    overflow_request.tensor[1].ClearField("shape")
    overflow_request.tensor[1].shape.extend([2, 0, 1 << 30, 1 << 30, 1 << 30])

    def frame(kind, value, **fields):
        header, body = _frame(kind, value, **fields)
        return _U4.pack(len(header)) + header + body

    batch = {"logits": np.ones((1, 3), "float32"), "label": np.arange(1)}
    desc = dict(describe(batch))
    early = [_frame("batch", batch)] * 33 + [_frame("desc", desc, times=1), _frame("end", served=1)]
    manifest = json.loads(seeds()["knowledge_manifest"][1])   # the top-k cache's manifest

    def changed(**entry):
        doc = json.loads(json.dumps(manifest))
        doc["fields"][0].update(entry)
        return json.dumps(doc).encode()

    return {
        "lod_merge": {"fault-issue-merge-too-big": lod_request.SerializeToString()},
        "tensor_codec": {"fault-issue-odd-complex": odd_complex.SerializeToString(),
                         "fault-issue-empty-overflow": empty_overflow.SerializeToString(),
                         "fault-issue-empty-strings-overflow": empty_strings.SerializeToString()},
        "client_answer": {"fault-issue-odd-complex-answer": answer.SerializeToString()},
        "grpc_request": {"fault-issue-shape-overflow": overflow_request.SerializeToString()},
        "pantheon_frame": {"fault-issue-dtype-literal": frame("desc", {"x": {"shape": [-1, 2], "dtype": ",f4"}}),
                           "fault-issue-desc-no-shape": frame("desc", {"x": {"dtype": "float32"}}),
                           "fault-issue-desc-bad-dim": frame("desc", {"x": {"shape": [-1, "t"], "dtype": "f4"}}),
                           "fault-issue-batch-dtype-literal": _raw_frame(
                               {"k": "batch", "v": {"__dict__": [["x", {"__nd__": [0, ",f4", [1]]}]]}, "b": [4]},
                               b"\0" * 4)},
        "pantheon_transport": {"fault-issue-33-batches-before-desc": _framed(early)},
        "knowledge_manifest": {"fault-issue-dtype-literal": changed(dtype=",f2"),
                               "fault-issue-k-infinity": changed(k=float("inf")),
                               "fault-issue-fill-401-digits": changed(fill=int("9" * 401))},
        "endpoints": {"fault-issue-newline-host": b"1\n:2", "fault-issue-scope-colon": b"::%:",
                      "fault-issue-scope-newline": b"[fe80::1%\n]:1",
                      "fault-issue-arabic-digits": "h:\u0661\u0662".encode()},
        "serving_config": {"fault-issue-not-utf8": b"feed_var { name: \"\xff\xfe\" }"},
    }


def _config_text(config) -> bytes:
    from google.protobuf import text_format

    return text_format.MessageToString(config.to_proto()).encode()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite the seed-* and fault-issue-* files of "
                                                 "tests/fuzz/corpus/<harness>/ from the project's encoders and "
                                                 "writers (fault-found-* files are kept).")
    parser.parse_args(argv)
    made = seeds()
    assert set(made) == set(HARNESSES), sorted(set(HARNESSES) ^ set(made))
    for name, inputs in made.items():
        folder = os.path.join(CORPUS, name)
        os.makedirs(folder, exist_ok=True)
        for entry in os.listdir(folder):
            if entry.startswith("seed-"):
                os.unlink(os.path.join(folder, entry))
        for index, data in enumerate(inputs):
            with open(os.path.join(folder, f"seed-{index:02d}"), "wb") as f:
                f.write(data)
    for name, inputs in issue_faults().items():
        for file_name, data in inputs.items():
            with open(os.path.join(CORPUS, name, file_name), "wb") as f:
                f.write(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
