"""What a Paddle Serving ``Request`` / ``Response`` costs once protobuf has parsed it, read from its wire bytes
before protobuf parses it (issue 26).

protobuf (upb) stores each value of a typed field at its full width: a 1-byte varint of ``int64_data`` takes 8
bytes, of ``int_data`` 4, and while the packed run is read the array grows by doubling, so a body of small
integers costs up to 24x its size while parsed. :func:`decoded_sizes` walks the wire format (a few Python steps
per field; the values of a packed varint run are counted with numpy: one varint ends at each byte with the high
bit clear) and gives, per tensor, the bytes its values take once decoded; :func:`check_decoded_size` refuses a
body whose total is over ``max(len(body) + SLACK, allowance)``: parsing what passes costs at most about 3x the
body (varint fields: the array, its growth, the numpy copy), or at most about 3x ``allowance`` for a small body.

Decoded width per value: ``int64_data`` 8, ``int_data`` / ``uint32_data`` / ``shape`` / ``lod`` 4, ``bool_data`` 1,
``float_data`` / ``complex64_data`` 4, ``float64_data`` / ``complex128_data`` 8 (fixed-width fields decode to
their wire size); each ``data`` string (and each ``fetch_var_names`` string of a request) counts its length
plus ``STRING_OVERHEAD``, each tensor (and each ``ModelOutput`` of a response) ``TENSOR_OVERHEAD``; a response's
``profile_time`` 8 per value. At most ``MAX_FIELDS`` wire fields of a body are walked one by one (a request's
``fetch_var_names`` aside): past that, the rest of a tensor counts ``STRING_OVERHEAD / 2`` per byte and the rest of
the body ``MAX_RATIO`` per byte, bounds rather than counts, so no Python loop runs over a long run of tiny fields.

Example::

    sizes = decoded_sizes(body, "request")     # [TensorSize(name='x', values=784, decoded=3136), ...]
    check_decoded_size(body, "request")        # raises DecodedSizeError naming the feed when over the bound
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Tensor fields (../shared/docs/paddle-serving-protocol.md): number -> decoded bytes per value
VARINT_WIDTH = {1: 8, 3: 4, 5: 4, 6: 1, 11: 4, 12: 4}   # int64_data, int_data, uint32_data, bool_data, shape, lod
FIXED_WIDTH = {2: 4, 4: 8, 7: 4, 8: 8}                   # float_data, float64_data, complex64_data, complex128_data
STRING_FIELD, NAME_FIELD, ALIAS_FIELD = 9, 13, 14
STRING_OVERHEAD = 64          # bytes a `data` string costs beyond its length (upb view, Python bytes object, slot)
TENSOR_OVERHEAD = 256         # bytes a Tensor message costs however empty (upb message, the handler's work)
SLACK = 64 << 10              # decoded bytes over the body's size any body may take (per-tensor overheads)
MAX_RATIO = TENSOR_OVERHEAD // 2   # decoded bytes per wire byte at most (an empty tensor: 2 bytes on the wire)
MAX_FIELDS = 16384            # wire fields walked one by one per body (fetch names aside); the rest is bounded
MAX_DEPTH = 100               # nested groups (protobuf's own recursion limit)
CHUNK = 64 << 10              # bytes of a packed run counted at once (its comparison array: 64 KiB at most)
DEFAULT_ALLOWANCE = 16 << 20  # decoded bytes any request may take whatever its body size (peak about 3x this)
# Where the tensors are: Request.tensor = 1; Response.outputs = 1 -> ModelOutput.tensor = 1
PATHS = {"request": (1,), "response": (1, 1)}


class DecodedSizeError(ValueError):
    """A body whose typed values would take more than the bound once parsed (err_no 5000 / HTTP 400)."""


class WireFormatError(DecodedSizeError):
    """A body whose wire format cannot be walked (a truncated field, a bad wire type): protobuf would refuse it
    too."""


@dataclass(frozen=True)
class TensorSize:
    """One tensor of a body: its name (alias if given), how many values its typed fields hold, their decoded
    bytes."""
    name: str
    values: int
    decoded: int
    bounded: bool = False   # past the field budget: ``decoded`` is a bound on the rest, not a count


def check_decoded_size(body: bytes, kind: str = "request", allowance: int = DEFAULT_ALLOWANCE,
                       slack: int = SLACK) -> int:
    """Total decoded bytes of ``body`` (a serialized ``kind``: "request" or "response"); raises
    ``DecodedSizeError`` naming the largest tensor and the sizes when it is over
    ``max(len(body) + slack, allowance)``,
    ``WireFormatError`` (a subclass) when the wire cannot be walked. A body of at most
    ``allowance // MAX_RATIO`` bytes (128 KiB by default) is not walked (nothing in it can decode past
    ``allowance``): returns -1 for it.

    Raises:
        DecodedSizeError: the decoded size is over the bound (names the largest tensor and the sizes).
        WireFormatError: the wire cannot be walked (a subclass of ``DecodedSizeError``).
    """
    size = len(body)
    if size * MAX_RATIO <= allowance:
        return -1
    tensors = decoded_sizes(body, kind)
    total = sum(t.decoded for t in tensors)
    bound = max(size + slack, allowance)
    if total > bound:
        worst = max(tensors, key=lambda t: t.decoded)
        what = "feed" if kind == "request" else "fetch"
        raise DecodedSizeError(
            f"{what} {worst.name!r}: {worst.values} values take {worst.decoded} bytes once decoded "
            f"({total} bytes for all {len(tensors)} tensor(s)), over the bound of {bound} bytes for a body of "
            f"{size} bytes (max(body + {slack}, {allowance})): send large tensors in raw tensor_content or as "
            f"fewer values per request")
    return total


def decoded_sizes(body: bytes, kind: str = "request") -> list[TensorSize]:
    """Per tensor of a serialized ``kind`` ("request" or "response"), its values and decoded bytes (see the
    module doc); then entries for ``fetch_var_names`` / ``profile_time``, a response's ``outputs`` and the
    ``(rest of the body)`` when the field budget ran out (``bounded``). Raises ``WireFormatError`` for a wire
    format that cannot be walked."""
    data = memoryview(body).cast("B") if not isinstance(body, bytes) else body
    walk = _Walk(data, kind == "request")
    walk.message(0, len(data), PATHS[kind], 0)
    if walk.top[0]:
        walk.found.append(TensorSize("fetch_var_names" if kind == "request" else "profile_time", *walk.top))
    if walk.holders:
        walk.found.append(TensorSize("outputs", walk.holders, walk.holders * TENSOR_OVERHEAD))
    if walk.rest:
        walk.found.append(TensorSize("(rest of the body)", walk.rest, walk.rest * MAX_RATIO, bounded=True))
    return walk.found


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError(f"truncated or overlong varint at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip(data, pos: int, end: int, wire: int, number: int, depth: int) -> int:
    """Position after one field's payload of wire type ``wire`` (its tag already read)."""
    if wire == 0:
        return _varint(data, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    elif wire == 2:
        length, pos = _varint(data, pos, end)
        pos += length
    elif wire == 3:   # a group: fields up to its end tag
        if depth > MAX_DEPTH:
            raise WireFormatError(f"groups nested over {MAX_DEPTH} deep")
        while True:
            tag, pos = _varint(data, pos, end)
            if tag & 7 == 4:
                if tag >> 3 != number:
                    raise WireFormatError(f"group {number} ended by field {tag >> 3}")
                return pos
            pos = _skip(data, pos, end, tag & 7, tag >> 3, depth + 1)
    else:
        raise WireFormatError(f"wire type {wire} of field {number} at byte {pos}")
    if pos > end:
        raise WireFormatError(f"field {number} runs past the end of its message")
    return pos


def _count_varints(data, pos: int, length: int) -> int:
    """Varints in data[pos:pos + length] (bytes under 0x80), counted by numpy in chunks of ``CHUNK`` bytes so the
    comparison never holds more than that."""
    count = 0
    for start in range(pos, pos + length, CHUNK):
        size = min(CHUNK, pos + length - start)
        count += int(np.count_nonzero(np.frombuffer(data, np.uint8, size, start) < 0x80))
    return count


class _Walk:
    """One walk: the tensors found, field 2 of the top message, and a budget of ``MAX_FIELDS`` wire fields walked
    one by one (a request's fetch_var_names aside: the handler loops over them itself); past it the rest of a
    tensor counts ``STRING_OVERHEAD // 2`` per byte, the rest of any other message ``MAX_RATIO`` (bounds)."""

    def __init__(self, data, strings: bool):
        self.data, self.strings = data, strings
        self.found: list[TensorSize] = []
        self.top = [0, 0]
        self.budget = MAX_FIELDS
        self.rest = 0
        self.holders = 0

    def message(self, pos: int, end: int, path: tuple, depth: int) -> None:
        """The message in data[pos:end]: descend into field path[0] while path is not empty, else a Tensor."""
        if not path:
            self.found.append(self.tensor(pos, end))
            return
        data, top = self.data, depth == 0
        while pos < end:
            start = pos
            tag, pos = _varint(data, pos, end)
            number, wire = tag >> 3, tag & 7
            if top and number == 2 and wire == 2 and self.strings:   # Request.fetch_var_names: not budgeted
                length, pos = _varint(data, pos, end)
                self.top[0] += 1
                self.top[1] += length + STRING_OVERHEAD
                pos += length
                if pos > end:
                    raise WireFormatError(f"field {number} runs past the end of its message")
                continue
            self.budget -= 1
            if self.budget < 0:
                self.rest += end - start
                return
            if number == path[0] and wire == 2:
                length, pos = _varint(data, pos, end)
                if pos + length > end:
                    raise WireFormatError(f"field {number} runs past the end of its message")
                if len(path) > 1:   # a message holding tensors (ModelOutput) costs as one
                    self.holders += 1
                self.message(pos, pos + length, path[1:], depth + 1)
                pos += length
            elif top and number == 2 and wire == 2:   # Response.profile_time, packed int64
                length, pos = _varint(data, pos, end)
                if pos + length > end:
                    raise WireFormatError(f"field {number} runs past the end of its message")
                count = _count_varints(data, pos, length)
                self.top[0] += count
                self.top[1] += 8 * count
                pos += length
            elif top and not self.strings and number == 2 and wire == 0:   # profile_time, unpacked
                self.top[0] += 1
                self.top[1] += 8
                pos = _varint(data, pos, end)[1]
            else:
                pos = _skip(data, pos, end, wire, number, depth)

    def tensor(self, pos: int, end: int) -> TensorSize:
        data = self.data
        name = alias = ""
        values = 0
        decoded = TENSOR_OVERHEAD
        while pos < end:
            self.budget -= 1
            if self.budget < 0:   # a long unpacked or string run: bound the rest instead of walking it
                decoded += (end - pos) * (STRING_OVERHEAD // 2)
                values += end - pos
                return TensorSize(alias or name or "?", values, decoded, bounded=True)
            tag, pos = _varint(data, pos, end)
            number, wire = tag >> 3, tag & 7
            if wire == 2:
                length, pos = _varint(data, pos, end)
                stop = pos + length
                if stop > end:
                    raise WireFormatError(f"field {number} runs past the end of its tensor")
                if number in VARINT_WIDTH:   # packed varints: one ends at each byte under 0x80
                    count = _count_varints(data, pos, length)
                    values += count
                    decoded += count * VARINT_WIDTH[number]
                elif number in FIXED_WIDTH:
                    values += length // FIXED_WIDTH[number]
                    decoded += length
                elif number == STRING_FIELD:
                    values += 1
                    decoded += length + STRING_OVERHEAD
                elif number == NAME_FIELD:
                    name = bytes(data[pos:stop]).decode("utf-8", "replace")
                elif number == ALIAS_FIELD:
                    alias = bytes(data[pos:stop]).decode("utf-8", "replace")
                pos = stop
                continue
            if number in VARINT_WIDTH and wire == 0:   # unpacked values, one field each
                values += 1
                decoded += VARINT_WIDTH[number]
            elif number in FIXED_WIDTH and wire == (5 if FIXED_WIDTH[number] == 4 else 1):
                values += 1
                decoded += FIXED_WIDTH[number]
            pos = _skip(data, pos, end, wire, number, 1)
        return TensorSize(alias or name or "?", values, decoded)
