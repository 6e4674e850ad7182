"""Pantheon frames: values to JSON header + raw buffers and back, and how long a frame may be (no pickle).

A frame is ``!IQ`` (header length, body length) | JSON header | body (the raw array buffers back to back); the
transport appends the MAC tag. The header holds the message kind (``k``), the value tree (``v``) in which numpy
arrays, bytes, tuples, sets and dicts are tagged objects pointing into the body, and the buffer lengths (``b``).
Only numeric and bool dtypes travel; a received frame is validated before use and anything malformed is a
``ProtocolError``.

Example::

    buffers = encode_frame("data", {"logits": np.zeros((2, 10), "float32")})
    header_len, body_len = PREFIX.unpack(bytes(buffers[0][:PREFIX.size]))
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np

from ..dtypes import parse_dtype
from .errors import ProtocolError

DEFAULT_MAX_FRAME = 64 << 20  # bytes (header + body) of one frame, before and below the description's size
MAX_BATCH_SAMPLES = 4096  # samples per knowledge batch the description-sized limit allows for
FRAME_SLACK = 1 << 20  # room for the JSON header on top of the arrays
MAX_FRAME = 1 << 40  # what a description can raise the limit to (memory still grows only with bytes received)
PREFIX = struct.Struct("!IQ")
_ALLOWED_KINDS = set("biufc")  # bool, signed, unsigned, float, complex


def frame_limit(desc: Optional[Mapping[str, Any]] = None, max_frame_bytes: Optional[int] = None) -> int:
    """The longest frame (header + body, bytes) a receiver accepts.

    ``max_frame_bytes`` when given (the option to raise or lower it); else, from the knowledge description
    (key -> ``{"shape": [-1, ...], "dtype": ...}``), room for ``MAX_BATCH_SAMPLES`` samples of every key plus
    ``FRAME_SLACK`` for the header, and never below ``DEFAULT_MAX_FRAME`` (64 MiB). A description with an
    unknown (negative) per-sample dimension, a malformed one, or none, gives ``DEFAULT_MAX_FRAME``; no
    description raises it past ``MAX_FRAME``.

    Raises:
        ValueError: ``max_frame_bytes`` is not a positive integer.
    """
    if max_frame_bytes is not None:
        if isinstance(max_frame_bytes, bool) or not isinstance(max_frame_bytes, int) or max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be a positive number of bytes, got {max_frame_bytes!r}")
        return max_frame_bytes
    per_sample = 0
    for entry in (desc.values() if isinstance(desc, Mapping) else ()):
        shape = entry.get("shape") if isinstance(entry, Mapping) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            return DEFAULT_MAX_FRAME
        if any(d < 0 for d in shape[1:]):
            return DEFAULT_MAX_FRAME
        try:
            itemsize = parse_dtype(entry.get("dtype"), _ALLOWED_KINDS, "description").itemsize
        except ValueError:
            return DEFAULT_MAX_FRAME
        per_sample += math.prod(shape[1:]) * itemsize
    return min(MAX_FRAME, max(DEFAULT_MAX_FRAME, per_sample * MAX_BATCH_SAMPLES + FRAME_SLACK))


# ---------------------------------------------------------------- value encoding


def _encode(value: Any, buffers: list) -> Any:
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"cannot send an array of dtype {value.dtype}: only bool and numeric arrays travel")
        array = np.ascontiguousarray(value)
        buffers.append(memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b""))
        return {"__nd__": [len(buffers) - 1, array.dtype.str, list(array.shape)]}
    if isinstance(value, np.generic):
        return {"__scalar__": _encode(np.asarray(value), buffers)}
    if isinstance(value, list):
        return [_encode(item, buffers) for item in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, buffers) for item in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [_encode(item, buffers) for item in value]}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, buffers), _encode(v, buffers)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        buffers.append(memoryview(bytes(value)))
        return {"__bytes__": len(buffers) - 1}
    raise TypeError(f"cannot send a {type(value).__name__}: Pantheon messages carry None, bool, int, float, str, "
                    "list, tuple, set, dict, bytes and numpy arrays (no pickle)")


def _buffer(arrays: list, index: Any) -> Any:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(arrays):
        raise ProtocolError(f"value refers to buffer {index!r}, the frame has {len(arrays)}")
    return arrays[index]


def _decode(tree: Any, arrays: list) -> Any:
    if isinstance(tree, list):
        return [_decode(item, arrays) for item in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) != 1:
        raise ProtocolError(f"malformed value tag {sorted(tree)!r}")
    tag, inner = next(iter(tree.items()))
    if tag == "__nd__":
        if not isinstance(inner, list) or not inner:
            raise ProtocolError(f"malformed array tag {inner!r}")
        return _buffer(arrays, inner[0])
    if tag == "__bytes__":
        return _buffer(arrays, inner)
    if tag == "__scalar__":
        return _decode(inner, arrays)[()]
    if tag in ("__tuple__", "__set__", "__dict__") and not isinstance(inner, list):
        raise ProtocolError(f"malformed {tag} value: {type(inner).__name__}")
    if tag == "__tuple__":
        return tuple(_decode(item, arrays) for item in inner)
    if tag == "__set__":
        return {_decode(item, arrays) for item in inner}
    if tag == "__dict__":
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in inner):
            raise ProtocolError("malformed __dict__ value: entries must be [key, value] pairs")
        return {_decode(k, arrays): _decode(v, arrays) for k, v in inner}
    raise ProtocolError(f"unknown value tag {tag!r}")


def encode_frame(kind: str, value: Any = None, **fields: Any) -> list[memoryview]:
    """The buffers of one frame without its MAC (prefix+header first, then the array buffers)."""
    buffers: list = []
    header = dict(fields, k=kind, v=_encode(value, buffers), b=[b.nbytes for b in buffers])
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return raw_frame(header_bytes, buffers)


def raw_frame(header_bytes: bytes, buffers: List[memoryview]) -> list[memoryview]:
    """The buffers of a frame from header bytes as they are (prefix + header, then ``buffers``)."""
    body_len = sum(b.nbytes for b in buffers)
    return [memoryview(PREFIX.pack(len(header_bytes), body_len) + header_bytes), *buffers]


def decode_frame(header_bytes: bytes | bytearray, body: bytearray) -> Tuple[str, Any, dict]:
    """``(kind, value, header)`` of a received frame; ``ProtocolError`` for anything malformed.

    Raises:
        ProtocolError: the frame is malformed (a header without a message kind, a bad length, dtype or shape).
    """
    try:
        header = json.loads(bytes(header_bytes))
        if not isinstance(header, dict) or not isinstance(header.get("k"), str):
            raise ProtocolError("the frame header is not an object with a message kind")
        return header["k"], _decode(header.get("v"), _arrays_from_body(header, body)), header
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError, MemoryError) as exc:
        raise ProtocolError(f"malformed frame: {type(exc).__name__}: {str(exc)[:200]}") from None


def _array_specs(tree: Any, specs: dict) -> None:
    if isinstance(tree, list):
        for item in tree:
            _array_specs(item, specs)
    elif isinstance(tree, dict):
        for tag, inner in tree.items():
            if tag == "__nd__":
                if not isinstance(inner, list) or len(inner) != 3 or not isinstance(inner[0], int):
                    raise ProtocolError(f"malformed array tag {inner!r}")
                specs[inner[0]] = inner
            else:
                _array_specs(inner, specs)


def _arrays_from_body(header: dict, body: bytearray) -> list:
    """Views into ``body`` for every buffer the header describes (arrays, or bytes for ``__bytes__``)."""
    specs: dict = {}
    _array_specs(header.get("v"), specs)
    lengths = header.get("b", [])
    if not isinstance(lengths, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                for n in lengths):
        raise ProtocolError("the frame header's buffer lengths are not a list of non-negative integers")
    if sum(lengths) != len(body):
        raise ProtocolError(f"frame body has {len(body)} bytes but its header describes {sum(lengths)}")
    arrays, offset = [], 0
    for index, length in enumerate(lengths):
        spec = specs.get(index)
        if spec is None:
            arrays.append(bytes(body[offset:offset + length]))
        else:
            dtype = parse_dtype(spec[1], _ALLOWED_KINDS, "array", ProtocolError)
            if not isinstance(spec[2], list) or not all(isinstance(d, int) and d >= 0 for d in spec[2]):
                raise ProtocolError(f"malformed array shape {spec[2]!r}")
            shape = tuple(spec[2])
            count = math.prod(shape)
            if count * dtype.itemsize != length:
                raise ProtocolError(f"array of shape {shape} and dtype {dtype} does not fit its {length} bytes")
            if count == 0:
                arrays.append(np.empty(shape, dtype))
            else:
                arrays.append(np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape))
        offset += length
    return arrays
