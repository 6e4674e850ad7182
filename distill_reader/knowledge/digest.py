"""Per-sample fingerprints of what was sent to the teachers, so a cache is never served for other inputs.

Scheme ``DIGEST_SCHEME`` (``"mix64x2-v1"``), vectorised with NumPy (no Python loop per sample). For one input
(name, dtype, per-sample shape), a header seed ``s`` and two rows of odd 64-bit multipliers ``a_j``, ``b_j`` (one
per 8-byte lane position ``j``) are derived from sha256 of ``"index|name|dtype|shape"``. Each sample's bytes are
zero-padded to whole little-endian uint64 lanes ``x_j`` and::

    g(x)  = x *= M1; x ^= x >> 29; x *= M2; x ^= x >> 32      (splitmix64-style xor-shift-multiply, a bijection)
    h1    = s1 + sum_j g(x_j) * a_j   (mod 2**64)        h2 = s2 + sum_j g(x_j) * b_j   (mod 2**64)

summed over the inputs; the digest is ``f(h1) || f(h2)`` as 16 little-endian bytes (``f``: the full splitmix64
finalizer). Pure integer arithmetic: the same on every machine and process.

What it is for: detecting *accidental* input changes (another generator, shuffled order, other preprocessing,
another dtype or shape). A change confined to one 8-byte lane always changes the digest (``g`` is a bijection
and ``a_j`` is odd); other changes go undetected with probability about 2**-64 or less. It is NOT a
cryptographic hash and does not resist someone who crafts collisions on purpose; that is not a threat here,
since whoever can write the cache can write any soft labels anyway (shards are checked with sha256/CRC-32 for
corruption, not for authenticity).
"""
from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from typing import List, Mapping, Sequence, Tuple, Union

import numpy as np

from .manifest import DIGEST_NBYTES, DIGEST_SCHEME

InputsArg = Union[Mapping[str, np.ndarray], Sequence[np.ndarray]]

__all__ = ["DIGEST_SCHEME", "sample_digests"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LANE = np.dtype("<u8")
_CHUNK_LANES = 1 << 15   # lanes mixed per step: work buffers of 256 KiB stay in the CPU cache


def _lane_mix_into(src: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """``out = g(src)`` elementwise (the per-lane mix), using ``tmp`` as scratch."""
    np.multiply(src, _M1, out=out)
    np.right_shift(out, np.uint64(29), out=tmp)
    np.bitwise_xor(out, tmp, out=out)
    np.multiply(out, _M2, out=out)
    np.right_shift(out, np.uint64(32), out=tmp)
    np.bitwise_xor(out, tmp, out=out)
    return out


def _mix_into(src: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """``out = f(src)`` elementwise (splitmix64 finalizer), using ``tmp`` as scratch; ``src`` may be ``out``."""
    np.right_shift(src, np.uint64(30), out=tmp)
    np.bitwise_xor(src, tmp, out=out)
    np.multiply(out, _M1, out=out)
    np.right_shift(out, np.uint64(27), out=tmp)
    np.bitwise_xor(out, tmp, out=out)
    np.multiply(out, _M2, out=out)
    np.right_shift(out, np.uint64(31), out=tmp)
    np.bitwise_xor(out, tmp, out=out)
    return out


_local = threading.local()


def _scratch(size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Two uint64 work buffers of ``size`` elements, reused per thread (fresh pages would cost page faults)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers[0].size < size:
        buffers = (np.empty(max(size, _CHUNK_LANES), np.uint64), np.empty(max(size, _CHUNK_LANES), np.uint64))
        _local.buffers = buffers
    return buffers[0][:size], buffers[1][:size]


@lru_cache(maxsize=64)
def _keys(header: bytes, lanes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(seeds (2,) uint64, odd multipliers (lanes, 2) uint64) for one input header, from sha256 + splitmix64."""
    seed = np.frombuffer(hashlib.sha256(header).digest(), _LANE).astype(np.uint64)   # 4 words
    stream = (np.arange(1, 2 * lanes + 1, dtype=np.uint64) * _GOLDEN + seed[0]) ^ seed[1]
    multipliers = _mix_into(stream, stream, np.empty_like(stream)) | np.uint64(1)
    multipliers = multipliers.reshape(lanes, 2)
    multipliers.flags.writeable = False
    seeds = seed[2:4].copy()
    seeds.flags.writeable = False
    return seeds, multipliers


def _input_sums(array: np.ndarray, header: bytes) -> np.ndarray:
    """``(n, 2)`` uint64: ``seed + sum_j g(x_j) * multiplier_j`` of each sample of ``array`` (C-contiguous)."""
    n = array.shape[0]
    sample_bytes = array.nbytes // n
    lanes = -(-sample_bytes // 8)
    seeds, multipliers = _keys(header, lanes)
    out = np.empty((n, 2), np.uint64)
    out[:] = seeds
    if lanes == 0:
        return out
    raw = array.reshape(n, -1).view(np.uint8).reshape(n, sample_bytes)
    whole = sample_bytes % 8 == 0
    rows = max(1, _CHUNK_LANES // lanes)
    work, tmp = _scratch(min(rows, n) * lanes)
    work, tmp = work.reshape(-1, lanes), tmp.reshape(-1, lanes)
    padded = None if whole else np.zeros((min(rows, n), lanes * 8), np.uint8)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        if whole:
            src = raw[lo:hi].view(_LANE)
        else:
            padded[:hi - lo, :sample_bytes] = raw[lo:hi]   # the zero tail is never written
            src = padded[:hi - lo].view(_LANE)
        mixed = _lane_mix_into(src, work[:hi - lo], tmp[:hi - lo])
        out[lo:hi] += np.matmul(mixed, multipliers)   # wrapping uint64 multiply-add
    return out


def sample_digests(inputs: InputsArg) -> np.ndarray:
    """A ``(n, 16)`` uint8 digest per sample of ``inputs`` (name -> array with first dimension n, or a sequence).

    Each digest covers, per input in name order (or sequence order), the name, dtype (with byte order),
    per-sample shape and bytes of the sample: the same values sent the same way give the same digest; another
    value, dtype, shape or order does not. Hash exactly what is sent (after dtype conversions). A fast
    non-cryptographic fingerprint against accidental changes (see the module docstring), about 1-2 GB/s.

    Example::

        d = sample_digests({"img": np.zeros((4, 1, 28, 28), "float32")})
        d.shape    # (4, 16)

    Raises:
        ValueError: no input, an input whose first dimension is not the sample count, or a non-numeric dtype.
    """
    if isinstance(inputs, Mapping):
        items = [(str(name), inputs[name]) for name in sorted(inputs)]
    else:
        items = [(str(i), value) for i, value in enumerate(inputs)]
    if not items:
        raise ValueError("sample_digests needs at least one input")
    arrays: List[Tuple[str, np.ndarray]] = [(name, np.asarray(value)) for name, value in items]
    n = arrays[0][1].shape[0] if arrays[0][1].ndim else None
    for name, array in arrays:
        if array.ndim == 0 or array.shape[0] != n:
            raise ValueError(f"input {name!r}: first dimension must be the sample count {n}, got shape {array.shape}")
        if array.dtype.kind not in "biuf":
            raise ValueError(f"input {name!r}: dtype {array.dtype} cannot be fingerprinted (numeric only)")
    sums = np.zeros((n, 2), np.uint64)
    if n:
        for index, (name, array) in enumerate(arrays):
            header = f"{DIGEST_SCHEME}|{index}|{name}|{array.dtype.str}|{array.shape[1:]}".encode()
            sums += _input_sums(np.ascontiguousarray(array), header)
    digests = _mix_into(sums, sums, np.empty_like(sums)).astype(_LANE, copy=False)
    return digests.view(np.uint8).reshape(n, DIGEST_NBYTES)
