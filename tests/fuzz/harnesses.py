"""One fuzzing harness per entry point of untrusted bytes (issue 26).

A harness takes any bytes, drives one entry point with them as a hostile peer or file would, and returns
quietly when the entry point answered or refused them with its documented error. Anything else (another
exception, an answer that breaks the entry point's own promises) escapes and is a finding.
``check_input`` adds what every harness asserts: an input is handled within ``MAX_SECONDS`` (twice in a row, so a
stall of a loaded machine is not a finding) and allocates
(Python heap, traced by ``tracemalloc``) at most ``memory_factor`` x its size plus ``MEMORY_SLACK``.

Example::

    from tests.fuzz.harnesses import HARNESSES, check_input
    check_input(HARNESSES["endpoints"], b"[::1]:9393")    # returns; a finding raises
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
import zlib
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np  # noqa: I001 - numpy before anything that may import paddle (zlib clash in paddle 2.6.2)
from google.protobuf.message import DecodeError

from discovery import nodes
from distill_base import wire_size
from distill_base.endpoints import parse_endpoint, parse_endpoints
from distill_base.proto import general_model_service_pb2 as service_pb2
from distill_base.serving_config import ConfigError, ServingConfig, VarSpec
from distill_base.tensor_codec import TensorCodecError, decode_tensor, encode_tensor
from distill_reader.client import TeacherClient, TeacherError
from distill_reader.knowledge import KnowledgeError, KnowledgeReader
from distill_reader.knowledge.manifest import MANIFEST_NAME, read_manifest
from distill_reader.pantheon import frames, knowledge_merge
from distill_reader.pantheon.errors import PantheonError
from distill_reader.pantheon.student import _OnlineTeacher
from distill_reader.pantheon.transport import Connection
from teachers import lod_checks as lod
from teachers.grpc_front import read_request
from teachers.http_front import BadBody, HttpFront, _gunzip
from teachers.inference import InferenceHandler, RequestError

MAX_SECONDS = 2.0
MEMORY_SLACK = 4 << 20   # bytes every input may use whatever its size (interpreter caches, small arrays)


class Finding(AssertionError):
    """An input broke a harness's promise (hang, memory, an answer that is wrong)."""


@dataclass(frozen=True)
class Harness:
    """``run(data)`` drives the entry point; ``documented`` are the errors it may raise for bad bytes."""

    name: str
    run: Callable[[bytes], None]
    documented: Tuple[type, ...]
    memory_factor: float = 4.0
    entry_point: str = ""


def check_input(harness: Harness, data: bytes) -> None:
    """Run one input through ``harness`` with the time and memory checks; a finding raises.

    Raises:
        Finding: the input took over MAX_SECONDS or allocated more than allowed.
        Exception: any exception the entry point does not document (the finding itself).
    """
    elapsed, peak = _timed_run(harness, data)
    if elapsed > MAX_SECONDS:   # once more: a hang repeats, a stall of a loaded machine does not
        elapsed = min(elapsed, _timed_run(harness, data)[0])
    if elapsed > MAX_SECONDS:
        raise Finding(f"{harness.name}: {len(data)}-byte input took {elapsed:.2f}s twice (limit {MAX_SECONDS}s)")
    allowed = harness.memory_factor * len(data) + MEMORY_SLACK
    if peak > allowed:
        raise Finding(f"{harness.name}: {len(data)}-byte input allocated {peak} bytes (limit {allowed:.0f})")


def _timed_run(harness: Harness, data: bytes) -> Tuple[float, int]:
    """(seconds, peak bytes traced) of one run; documented errors are swallowed, others propagate."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.monotonic()
    try:
        harness.run(data)
    except harness.documented:
        pass
    finally:
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1] - base
        if not tracing:
            tracemalloc.stop()
    return elapsed, peak


# ---------------------------------------------------------------- teacher server: gRPC / HTTP requests, LoD
DENSE_CONFIG = ServingConfig(
    feeds=(VarSpec("x", "x", 1, (2, 3)), VarSpec("ids", "ids", 0, (-1,)), VarSpec("mask", "mask", 9, (4,))),
    fetches=(VarSpec("prob", "prob", 1, (3,)), VarSpec("emb", "emb", 3, (-1,))))
LOD_CONFIG = ServingConfig(
    feeds=(VarSpec("words", "words", 0, (1,), is_lod_tensor=True), VarSpec("w", "w", 1, (2,))),
    fetches=(VarSpec("seq", "seq", 1, (1,), is_lod_tensor=True), VarSpec("prob", "prob", 1, (2,))))
_DENSE = InferenceHandler(DENSE_CONFIG)
_LOD = InferenceHandler(LOD_CONFIG)


def _request(data: bytes) -> service_pb2.Request:
    request = service_pb2.Request()
    request.ParseFromString(data)       # grpc answers a DecodeError itself (status INTERNAL), never our code
    return request


def _check_feeds(feeds: dict, config: ServingConfig) -> None:
    for spec in config.feeds:
        array = feeds[spec.name]
        if array.dtype != spec.dtype or array.ndim == 0:
            raise Finding(f"feed {spec.name} passed as {array.dtype} {array.shape} for {spec}")
        if not spec.is_lod_tensor and any(d >= 0 and d != g for d, g in zip(spec.shape, array.shape[1:])):
            raise Finding(f"feed {spec.name} passed with shape {array.shape} for {spec}")


_FUZZ_ALLOWANCE, _FUZZ_SLACK = 2048, 64   # small bounds: bodies of a few KiB are walked, seeds pass, some refused


def _wire_decoded(message) -> int:
    """Decoded bytes of a parsed Request or Response (``wire_size``'s accounting, from protobuf's own fields)."""
    if isinstance(message, service_pb2.Response):
        total = 8 * len(message.profile_time) + wire_size.TENSOR_OVERHEAD * len(message.outputs)
        tensors = [tensor for output in message.outputs for tensor in output.tensor]
    else:
        total = sum(len(name.encode()) + wire_size.STRING_OVERHEAD for name in message.fetch_var_names)
        tensors = message.tensor
    for tensor in tensors:
        total += wire_size.TENSOR_OVERHEAD + sum(len(s) + wire_size.STRING_OVERHEAD for s in tensor.data)
        for field in tensor.DESCRIPTOR.fields:
            width = wire_size.VARINT_WIDTH.get(field.number) or wire_size.FIXED_WIDTH.get(field.number)
            if width:
                total += width * len(getattr(tensor, field.name))
    return total


def _check_wire_size(data: bytes, message) -> None:
    """What ``wire_size`` read from the bytes matches what protobuf parsed from them (a bound past MAX_FIELDS)."""
    try:
        sizes = wire_size.decoded_sizes(data, "response" if isinstance(message, service_pb2.Response) else "request")
    except wire_size.WireFormatError as exc:
        raise Finding(f"protobuf parses a body that wire_size cannot walk: {exc}") from None
    walked, parsed = sum(t.decoded for t in sizes), _wire_decoded(message)
    bounded = any(t.bounded for t in sizes)
    if walked < parsed or (walked != parsed and not bounded):
        raise Finding(f"wire_size counts {walked} decoded bytes, protobuf parsed {parsed}: {sizes}")


def grpc_request(data: bytes) -> None:
    """A gRPC ``Request`` body as the server reads it (``teachers/grpc_front.read_request``: the decoded-size bound of
    ``distill_base/wire_size.py``, then protobuf), checked against protobuf's own parse, then the handler's parse
    and validation (``teachers/inference.py``)."""
    try:
        parsed = _request(data)
    except DecodeError:
        parsed = None
    if parsed is not None:
        _check_wire_size(data, parsed)
    try:
        request = read_request(data, _FUZZ_ALLOWANCE, _FUZZ_SLACK)
    except wire_size.WireFormatError:
        if parsed is not None:
            raise
        return
    if parsed is None:
        raise Finding("read_request accepted a body protobuf cannot parse")
    feeds, lods, fetch, _ = _DENSE.parse(request)
    _check_feeds(feeds, DENSE_CONFIG)
    if not fetch:
        raise Finding("a request passed with no fetch")


class _HttpRequestStub:
    """What ``HttpFront._parse`` reads of an aiohttp request (only the content type, for its message)."""

    content_type = "application/json"


def http_body(data: bytes) -> None:
    """An HTTP body as the front parses it: byte 0 picks JSON or protobuf and gzip; the rest is the body."""
    mode, body = (data[0], data[1:]) if data else (0, b"")
    if mode & 2:
        body = _gunzip(body, 1 << 20)
    message = HttpFront._parse(body, _HttpRequestStub(), as_json=not mode & 1, allowance=_FUZZ_ALLOWANCE)
    feeds, _, _, _ = _DENSE.parse(message)
    _check_feeds(feeds, DENSE_CONFIG)


def lod_merge(data: bytes) -> None:
    """A LoD ``Request`` checked (``check_lod_feed``), then merged with itself as the batcher would, and split."""
    feeds, lods, _, _ = _LOD.parse(_request(data))
    _check_feeds(feeds, LOD_CONFIG)
    job = (feeds, lods)
    merged, merged_lods = lod.merge_jobs([job, job])
    counts = [lod.samples_of(feeds, lods)] * 2
    outputs = {"seq": (merged["words"], merged_lods["words"]), "prob": (merged["w"], [])}
    shares = lod.split_outputs(outputs, counts)
    if shares is None or len(shares) != 2:
        raise Finding(f"merged outputs of two equal jobs could not be split: counts {counts}")
    for share in shares:
        if not np.array_equal(share["seq"][0], feeds["words"]) or share["seq"][1] != lods["words"]:
            raise Finding("a merged and split LoD feed differs from the job's own")


# ---------------------------------------------------------------- tensor codec and the client's answers
def tensor_codec(data: bytes) -> None:
    """A ``Tensor`` message decoded; what decodes must encode (raw and typed) and decode to the same array."""
    tensor = service_pb2.Tensor()
    tensor.ParseFromString(data)
    array = decode_tensor(tensor)
    if array.dtype == object:
        return
    for raw in (True, False):
        again = decode_tensor(encode_tensor(array, name="t", raw=raw))
        if again.shape != array.shape or again.dtype != array.dtype or not _same_values(array, again):
            raise Finding(f"tensor {array.dtype} {array.shape} does not survive encode(raw={raw}) + decode")


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit, but a NaN only needs to stay a NaN (its payload may change through a typed float field)."""
    if a.dtype.kind not in "fc":
        return a.tobytes() == b.tobytes()
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b))) and a[~nan].tobytes() == b[~nan].tobytes()


_CLIENT = TeacherClient("127.0.0.1:1", DENSE_CONFIG, protocol="http")
_CLIENT.max_decoded_allowance = _FUZZ_ALLOWANCE


def client_answer(data: bytes) -> None:
    """A teacher's ``Response`` as the client reads it (``TeacherClient._read_answer``: the decoded-size bound,
    then protobuf) and decodes it for a batch of 2 (``TeacherClient._outputs``)."""
    try:
        _check_wire_size(data, service_pb2.Response.FromString(data))
    except DecodeError:
        pass
    response = _CLIENT._read_answer(data, "fuzzed")
    out = _CLIENT._outputs(response, ["prob", "emb"], batch_size=2)
    if set(out) != {"prob", "emb"}:
        raise Finding(f"answer decoded to {sorted(out)}")


# ---------------------------------------------------------------- knowledge files
# Files the knowledge harnesses write: beside the fuzzing run's own scratch folder (python -m tests.fuzz sets
# DISTILL_FUZZ_SCRATCH: libFuzzer ends the process without Python's atexit), else a temporary folder removed at exit.
if os.environ.get("DISTILL_FUZZ_SCRATCH"):
    _SCRATCH = os.environ["DISTILL_FUZZ_SCRATCH"].rstrip(os.sep) + "-files"   # beside it: libFuzzer reads that folder
    os.makedirs(_SCRATCH, exist_ok=True)
else:
    _SCRATCH = tempfile.mkdtemp(prefix="distill-fuzz-")
    atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)   # never left behind in /tmp


def _cache_dir(name: str) -> str:
    path = os.path.join(_SCRATCH, name)
    os.makedirs(path, exist_ok=True)
    for entry in os.listdir(path):
        os.unlink(os.path.join(path, entry))
    return path


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def knowledge_manifest(data: bytes) -> None:
    """``manifest.json`` with these bytes, read and checked (``read_manifest``)."""
    path = _cache_dir("manifest")
    _write(os.path.join(path, MANIFEST_NAME), data)
    read_manifest(path)


_SPLIT = struct.Struct("<I")


def knowledge_shard(data: bytes) -> None:
    """A cache of one manifest and one shard: ``<u4 manifest length | manifest | shard bytes``. The harness fixes
    the listed shard's size and checksums to match the bytes (so the fuzzer reaches the reader past them), then
    reads every sample, the sparse top-k form and the input digests, and verifies the cache."""
    if len(data) < _SPLIT.size:
        return
    (length,) = _SPLIT.unpack_from(data)
    manifest, shard = data[_SPLIT.size:_SPLIT.size + length], data[_SPLIT.size + length:]
    path = _cache_dir("shard")
    try:
        doc = json.loads(manifest)
        entry = doc["shards"][0]
        entry.update(nbytes=len(shard), crc32=zlib.crc32(shard), sha256=hashlib.sha256(shard).hexdigest())
        manifest = json.dumps(doc).encode()
        _write(os.path.join(path, str(entry["file"]).replace("/", "_")), shard)
    except Exception:  # noqa: BLE001 - not fixable: the manifest goes to the reader as it is
        pass
    _write(os.path.join(path, MANIFEST_NAME), manifest)
    for topk_as in ("dense", "sparse"):
        with KnowledgeReader(path, topk_as=topk_as, verify_threads=0, max_dense_bytes=1 << 20) as reader:
            n = min(reader.num_samples, 1 << 16)
            reader.read(0, n)
            if reader.has_input_digests:
                stored = reader.input_digests(0, n)
                reader.check_inputs(0, stored)
    with KnowledgeReader(path, verify_threads=0) as reader:
        reader.verify()


# ---------------------------------------------------------------- Pantheon
PANTHEON_DESC = {"logits": {"shape": [-1, 3], "dtype": "float32", "lod_level": 0},
                 "label": {"shape": [-1], "dtype": "int64", "lod_level": 0}}


def pantheon_frame(data: bytes) -> None:
    """``<u4 header length | header | body`` decoded (``decode_frame``); a ``desc`` value sized (``frame_limit``)
    and merged with itself (``merge_descs``), a ``batch`` value conformed to a description (``conform``)."""
    if len(data) < _SPLIT.size:
        return
    (length,) = _SPLIT.unpack_from(data)
    header, body = data[_SPLIT.size:_SPLIT.size + length], bytearray(data[_SPLIT.size + length:])
    kind, value, _ = frames.decode_frame(header, body)
    if kind == "desc":
        frames.frame_limit(value)
        strategy = {key: "mean" for key in value} if isinstance(value, dict) else {}
        merged = knowledge_merge.merge_descs([value, value], strategy)
        frames.frame_limit(merged)
    elif kind == "batch":
        knowledge_merge.conform(value, PANTHEON_DESC, "the teacher")


_KEYS = (b"k" * 32, b"k" * 32)


def pantheon_transport(data: bytes) -> None:
    """A teacher's frames as the student's reader thread receives them: ``data`` is a run of
    ``<u4 header length | header | <u4 body length | body`` items, each sealed with the session key and sent
    over a socket pair, then the teacher shuts its sending side (it still reads). The student asks for the
    description and reads one pass: it must end (an answer or a PantheonError) within the time limit, whatever
    was sent."""
    teacher_sock, student_sock = socket.socketpair()
    teacher = Connection(teacher_sock, "student", 5.0, _KEYS)
    student = _OnlineTeacher(0, "fuzz", Connection(student_sock, "teacher", 1.0, _KEYS), None)
    outcome: list = []
    try:
        teacher_sock.settimeout(0.5)
        for header, body in _items(data):
            try:
                teacher._send_frame(header, [memoryview(body)] if body else [])
            except (PantheonError, OSError):
                break
        teacher_sock.shutdown(socket.SHUT_WR)
        reader = threading.Thread(target=_student_pass, args=(student, outcome), daemon=True)
        reader.start()
        reader.join(MAX_SECONDS)
        if reader.is_alive():
            raise Finding(f"the student still waits {MAX_SECONDS}s after asking for the description "
                          f"(the teacher stopped sending)")
    finally:
        teacher.close()
        student.conn.close()
    if outcome and not isinstance(outcome[0], PantheonError):
        raise outcome[0]


def _items(data: bytes):
    offset = 0
    while offset + 8 <= len(data):
        (hlen,) = _SPLIT.unpack_from(data, offset)
        header = data[offset + 4:offset + 4 + hlen]
        offset += 4 + len(header)
        (blen,) = _SPLIT.unpack_from(data, offset) if offset + 4 <= len(data) else (0,)
        body = data[offset + 4:offset + 4 + blen]
        offset += 4 + len(body)
        yield header, body


def _student_pass(student: _OnlineTeacher, outcome: list) -> None:
    try:
        desc = student.request_desc()
        student.start_pass()
        for batch in student.stream():
            knowledge_merge.conform(batch, desc, student.name)
    except Exception as exc:  # noqa: BLE001 - handed to the harness, which tells documented from not
        outcome.append(exc)


# ---------------------------------------------------------------- discovery, endpoints, serving configs
def zk_nodes(data: bytes) -> None:
    """ZooKeeper node data as a teacher, a student and an assignment node (``discovery/nodes.py``)."""
    for parse, name in ((nodes.parse_teacher, "teacher-0000000001"), (nodes.parse_student, "student-0000000001"),
                        (nodes.parse_assignment, "student-0000000001")):
        try:
            parse(name, data)
        except nodes.NodeDataError:
            pass


_SEPARATORS = " \t\r\n\x0b\x0c"


def endpoints(data: bytes) -> None:
    """Endpoint text (``distill_base/endpoints.py``): whatever is accepted has a clean host and survives its
    own formatting."""
    text = data.decode("utf-8", "replace")
    accepted = []
    for default_port in (None, 9393):
        try:
            accepted.append(parse_endpoint(text, default_port=default_port))
        except ValueError:
            pass
    try:
        accepted.extend(parse_endpoints(text))
    except ValueError:
        pass
    for endpoint in accepted:
        zone = endpoint.host.partition("%")[2] if ":" in endpoint.host else ""
        if any(c in endpoint.host for c in _SEPARATORS + ",[]/") or not text.isascii() or \
                any(c in zone for c in ":%") or endpoint.host.endswith("%"):
            raise Finding(f"{text!r} accepted with host {endpoint.host!r}")
        if not 1 <= endpoint.port <= 65535 or parse_endpoint(str(endpoint)) != endpoint:
            raise Finding(f"{text!r} accepted as {endpoint!r}, which does not read back from {str(endpoint)!r}")


def serving_config(data: bytes) -> None:
    """A ``serving_*_conf.prototxt`` file (``ServingConfig.load``); a loaded config answers a request (an error
    answer, never an exception)."""
    path = os.path.join(_cache_dir("config"), "serving_client_conf.prototxt")
    _write(path, data)
    config = ServingConfig.load(path)
    for spec in config.feeds + config.fetches:
        spec.dtype   # noqa: B018 - every elem_type a loaded config holds must be known
    answer = InferenceHandler(config, run=lambda feeds, fetch, lods: {}).handle(service_pb2.Request())
    if not isinstance(answer, service_pb2.Response):
        raise Finding(f"the handler answered {answer!r}")


_ALL = (
    Harness("grpc_request", grpc_request, (RequestError, DecodeError, wire_size.DecodedSizeError), 24.0,
            "teachers/grpc_front.py read_request, distill_base/wire_size.py, teachers/inference.py"),
    Harness("http_body", http_body, (BadBody, RequestError), 24.0, "teachers/http_front.py"),
    Harness("lod_merge", lod_merge, (RequestError, DecodeError, lod.LodError), 24.0, "teachers/lod_checks.py"),
    Harness("tensor_codec", tensor_codec, (TensorCodecError, DecodeError), 24.0, "distill_base/tensor_codec.py"),
    Harness("client_answer", client_answer, (TeacherError, DecodeError), 24.0, "distill_reader/client.py"),
    Harness("knowledge_manifest", knowledge_manifest, (KnowledgeError,), 16.0, "distill_reader/knowledge/manifest.py"),
    Harness("knowledge_shard", knowledge_shard, (KnowledgeError,), 16.0, "distill_reader/knowledge/reader.py"),
    Harness("pantheon_frame", pantheon_frame, (PantheonError,), 8.0,
            "distill_reader/pantheon/frames.py, knowledge_merge.py"),
    Harness("pantheon_transport", pantheon_transport, (PantheonError,), 8.0,
            "distill_reader/pantheon/transport.py, student.py"),
    Harness("zk_nodes", zk_nodes, (), 8.0, "discovery/nodes.py"),
    Harness("endpoints", endpoints, (), 8.0, "distill_base/endpoints.py"),
    Harness("serving_config", serving_config, (ConfigError,), 16.0, "distill_base/serving_config.py"),
)
HARNESSES = {h.name: h for h in _ALL}
