"""Dtype names that come from elsewhere (a peer's frame, a description, a manifest), checked against an allowed
set before numpy sees them.

``np.dtype(text)`` parses much more than type names: ``",f4"`` and ``"(2)f4"`` are evaluated as Python literals
(a ``SyntaxError`` or a sub-array dtype), ``"V8"`` or ``"O"`` make void or object arrays. ``parse_dtype`` accepts
only a plain numeric or bool name (``"float32"``, ``"int64"``, ``"bool"``) or a type string (``"<f4"``,
``"|b1"``, ``"i8"``) of the kinds asked for, and raises the caller's own error type otherwise.

Example::

    parse_dtype("<f4", "biuf", "field 'logits'")     # dtype('float32')
    parse_dtype(",f4", "biuf", "field 'logits'")     # ValueError: field 'logits': dtype ',f4' is not allowed ...
"""
from __future__ import annotations

import re
from typing import Any, Type

import numpy as np

__all__ = ["ALLOWED_NAMES", "parse_dtype"]

# numpy's names of the plain numeric and bool types
ALLOWED_NAMES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
    "float", "int", "double", "half", "single"})   # numpy's aliases that users write
# numpy type strings: optional byte order, kind, item size (what ``dtype.str`` writes)
_TYPE_STRING = re.compile(r"[<>=|]?(?:b1|[iu](?:1|2|4|8)|f(?:2|4|8)|c(?:8|16))")


def parse_dtype(value: Any, kinds: str, what: str, error: Type[Exception] = ValueError) -> np.dtype:
    """The dtype named by ``value`` (a name or type string from ``ALLOWED_NAMES``/numpy's ``dtype.str``, or a
    ``np.dtype``) when its kind is in ``kinds`` (numpy kind letters, e.g. ``"biuf"``).

    Raises:
        error: (``ValueError`` unless given) naming ``what`` and the value: not a string, not an allowed name,
            or of another kind.
    """
    if isinstance(value, np.dtype):
        dtype = value
    elif isinstance(value, str) and len(value) <= 16 and (value in ALLOWED_NAMES or _TYPE_STRING.fullmatch(value)):
        dtype = np.dtype(value)
    else:
        shown = repr(value)[:40] if isinstance(value, str) else type(value).__name__
        raise error(f"{what}: dtype {shown} is not allowed (a numeric or bool type name such as 'float32' or '<f4')")
    if dtype.kind not in kinds or dtype.names is not None or dtype.subdtype is not None:
        raise error(f"{what}: dtype {dtype} is not allowed here (kinds {kinds!r}: b bool, i/u integer, f float, "
                    f"c complex)")
    return dtype
