"""numpy arrays <-> Paddle Serving ``Tensor`` messages: the only place in the project that encodes tensors.

Two wire forms, both understood by our teacher server:

- ``raw``: little-endian bytes in ``tensor_content`` for every numeric type (the fast path);
- ``typed``: the per-type repeated fields (``float_data``, ``int64_data``, ...) that a real Paddle Serving
  0.9 server and client use. Types without a typed field there (uint8, int8, int16, float16) travel in
  ``tensor_content`` in both forms, as the real C++ server expects.

Example::

    t = encode_tensor(np.ones((2, 3), "float32"), name="x", raw=True)
    decode_tensor(t).shape   # (2, 3)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .proto import general_model_service_pb2 as service_pb2

# elem_type codes of Paddle Serving 0.9 (6 is bfloat16, which numpy has no dtype for).
ELEM_TYPES: dict[int, np.dtype] = {
    0: np.dtype("int64"), 1: np.dtype("float32"), 2: np.dtype("int32"), 3: np.dtype("float64"),
    4: np.dtype("int16"), 5: np.dtype("float16"), 7: np.dtype("uint8"), 8: np.dtype("int8"),
    9: np.dtype("bool"), 10: np.dtype("complex64"), 11: np.dtype("complex128"),
}
STRING_ELEM_TYPE = 20
_ELEM_TYPE_OF: dict[np.dtype, int] = {dt: code for code, dt in ELEM_TYPES.items()}

# Typed repeated field per elem_type, where Paddle Serving has one.
_TYPED_FIELD: dict[int, str] = {
    0: "int64_data", 1: "float_data", 2: "int_data", 3: "float64_data", 9: "bool_data",
    10: "complex64_data", 11: "complex128_data",
}


MAX_DIMS = 32                # numpy allows 64; no model input has more than a handful
MAX_ELEMENTS = 1 << 48       # per tensor, counting the non-zero dimensions of an empty one too


class TensorCodecError(ValueError):
    """A tensor that cannot be encoded or decoded; the message names the tensor."""


def dtype_of_elem_type(elem_type: int, what: str = "tensor") -> np.dtype:
    """numpy dtype for a Paddle Serving elem_type code.

    Raises:
        TensorCodecError: ``elem_type`` is not a numeric type this project supports.
    """
    try:
        return ELEM_TYPES[int(elem_type)]
    except KeyError:
        raise TensorCodecError(f"{what}: elem_type {elem_type} is not a numeric type this project supports "
                               f"(supported: {sorted(ELEM_TYPES)})") from None


def elem_type_of_dtype(dtype, what: str = "tensor") -> int:
    """Paddle Serving elem_type code for a numpy dtype.

    Raises:
        TensorCodecError: the dtype has no Paddle Serving elem_type.
    """
    dt = np.dtype(dtype)
    try:
        return _ELEM_TYPE_OF[dt.newbyteorder("=") if dt.byteorder == ">" else dt]
    except KeyError:
        raise TensorCodecError(f"{what}: numpy dtype {dt} has no Paddle Serving elem_type "
                               f"(supported: {sorted(str(d) for d in _ELEM_TYPE_OF)})") from None


def encode_tensor(array: np.ndarray, name: str, alias_name: str = "", raw: bool = True,
                  lod: Optional[Sequence[int]] = None, out: Optional[service_pb2.Tensor] = None) -> service_pb2.Tensor:
    """Encode ``array`` (its first dim is the batch) as a Tensor message.

    ``out``: an empty Tensor to fill in place (e.g. ``request.tensor.add()``), which saves copying a large
    message into its parent.
    """
    array = np.asarray(array)
    elem_type = elem_type_of_dtype(array.dtype, what=f"tensor {name!r}")
    tensor = service_pb2.Tensor() if out is None else out
    tensor.name = name
    tensor.alias_name = alias_name or name
    tensor.elem_type = elem_type
    tensor.shape.extend(int(d) for d in array.shape)
    if lod:
        tensor.lod.extend(int(x) for x in lod)
    field = _TYPED_FIELD.get(elem_type)
    if raw or field is None:
        tensor.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    elif elem_type in (10, 11):  # complex: interleaved real, imag
        getattr(tensor, field).extend(array.reshape(-1).view(array.real.dtype).tolist())
    else:
        getattr(tensor, field).extend(array.reshape(-1).tolist())
    return tensor


def decode_tensor(tensor: service_pb2.Tensor, what: str = "") -> np.ndarray:
    """Decode a Tensor message into a numpy array of its declared shape.

    Raises:
        TensorCodecError: naming the tensor, for an unsupported elem_type, data that is not whole elements,
            an element count that does not match the shape, or a shape numpy cannot hold (over ``MAX_DIMS``
            dimensions, or non-zero dimensions multiplying past ``MAX_ELEMENTS``, even when one is 0).
    """
    label = what or f"tensor {tensor.alias_name or tensor.name!r}"
    if tensor.elem_type == STRING_ELEM_TYPE:
        shape = _shape(tensor, len(tensor.data), label)
        return np.array(list(tensor.data), dtype=object).reshape(shape)
    dtype = dtype_of_elem_type(tensor.elem_type, what=label)
    shape_given = tuple(tensor.shape)
    if len(shape_given) > MAX_DIMS:
        raise TensorCodecError(f"{label}: shape has {len(shape_given)} dimensions, at most {MAX_DIMS} are accepted")
    content = tensor.tensor_content   # read once: every read of a bytes field makes a new copy
    if content:
        nbytes = len(content)
        if nbytes % dtype.itemsize:
            raise TensorCodecError(f"{label}: tensor_content has {nbytes} bytes, not a multiple of "
                                   f"{dtype} ({dtype.itemsize} bytes)")
        flat = np.frombuffer(content, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        if dtype.kind == "b" and flat.size and flat.view(np.uint8).max() > 1:
            # numpy would keep such a byte as a "True" that compares unequal to True
            raise TensorCodecError(f"{label}: bool tensor_content holds bytes other than 0 and 1")
    else:
        field = _TYPED_FIELD.get(tensor.elem_type)
        if field is None:
            flat = np.zeros(0, dtype=dtype)
        elif tensor.elem_type in (10, 11):
            values = getattr(tensor, field)
            if len(values) % 2:
                raise TensorCodecError(f"{label}: {field} holds {len(values)} numbers; complex values travel as "
                                       f"(real, imaginary) pairs")
            flat = _from_repeated(values, np.finfo(dtype).dtype).view(dtype)
        else:
            flat = _from_repeated(getattr(tensor, field), dtype)
    return flat.reshape(_shape(tensor, flat.size, label))


def _from_repeated(values, dtype: np.dtype) -> np.ndarray:
    """A typed repeated field as an array, element by element: no list of Python objects in between (that costs
    up to 8x the field's wire size on top of the array)."""
    return np.fromiter(values, dtype=dtype, count=len(values))


def _shape(tensor: service_pb2.Tensor, count: int, label: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in tensor.shape)
    if not shape:
        return (count,)
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"{label}: shape {list(shape)} has a negative dimension; a tensor on the wire "
                               f"gives every dimension, the batch included")
    expected = math.prod(shape)  # Python ints: a product past int64 cannot wrap around
    if expected != count:
        raise TensorCodecError(f"{label}: shape {list(shape)} needs {expected} elements, the message carries {count}")
    if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        # a 0-element shape whose other dimensions multiply past what numpy can index
        raise TensorCodecError(f"{label}: shape {list(shape)} has more than {MAX_DIMS} dimensions or its non-zero "
                               f"dimensions multiply past {MAX_ELEMENTS} elements")
    return shape


def is_raw(tensor: service_pb2.Tensor) -> bool:
    """True when the tensor uses ``tensor_content`` although a typed field exists for its type."""
    field = _TYPED_FIELD.get(tensor.elem_type)
    if field is None or len(getattr(tensor, field)):
        return False
    if tensor.shape and all(d > 0 for d in tensor.shape):
        # elements and no typed values: they travel in tensor_content (reading it would copy every byte)
        return True
    return bool(tensor.tensor_content)
