"""Compact, lossless packing of inter-token gaps (integer microseconds) for the wire format.

Gap lists dominate a record's size, and their low bits are noise that no general-purpose compressor can squeeze:
zstd over plain integer lists stays ~1.5× above the noise's entropy. This packs them close to it: each gap is
predicted (from the previous gap, or from the list's median — whichever codes shorter for this list), the
residual is zigzag-mapped to an unsigned integer and Rice-coded with the parameter that minimises the total.

Each gap is predicted as ``m + (r × (previous − m)) // 4`` where ``m`` is the list's median and ``r`` ∈ 0..4 is
chosen per list (0: the median alone; 4: the previous gap; between: decode times drift and jitter is correlated
from one token to the next). The first gap is predicted by ``m``.

Layout: ``version:u8 | r:u8 | k:u8 | count:varint | m:varint | bits…`` where bits are MSB-first Rice codes
(``q`` one-bits, a zero, then the low ``k`` bits), padded with zero bits to a whole byte.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PACK_VERSION = 1
_MAX_K = 42
_MAX_UNARY = 1 << 16  # a residual needing more than this many unary bits is refused (corrupt or hostile input)


class PackError(ValueError):
    """Packed gaps that cannot be decoded."""


def _zigzag(n: int) -> int:
    return (n << 1) if n >= 0 else ((-n << 1) - 1)


def _unzigzag(u: int) -> int:
    return (u >> 1) if not (u & 1) else -((u + 1) >> 1)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise PackError("truncated or oversized varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


_KS = np.arange(_MAX_K, dtype=np.int64)


def pack_gaps(gaps_us: Sequence[int]) -> bytes:
    """Pack non-negative integer gaps (< 2^40). Empty lists pack to 5 bytes. Vectorised with numpy."""
    n = len(gaps_us)
    if n == 0:
        return bytes([PACK_VERSION, 0, 0]) + _varint(0) + _varint(0)
    g = np.asarray(gaps_us, dtype=np.int64)
    if g.min() < 0 or g.max() >= 1 << 40:
        raise ValueError("gaps must be non-negative integers below 2^40")
    median = int(np.partition(g, n // 2)[n // 2])
    residuals = np.empty((5, n), dtype=np.int64)
    residuals[:, 0] = g[0] - median
    drift = g[:-1] - median
    for r in range(5):
        residuals[r, 1:] = g[1:] - (median + (r * drift) // 4)  # floor division, as the decoder does
    zigzag = np.where(residuals >= 0, residuals << 1, ((-residuals) << 1) - 1)
    totals = (zigzag[:, :, None] >> _KS).sum(axis=1) + n * (1 + _KS)  # bits for each (predictor, k)
    predictor, k = (int(v) for v in np.unravel_index(int(np.argmin(totals)), totals.shape))
    u = zigzag[predictor]
    q = u >> k
    lengths = q + 1 + k
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    bits = np.zeros(total + (-total) % 8, dtype=np.uint8)
    ones = int(q.sum())
    if ones:
        group_starts = np.repeat(starts, q)
        offsets = np.arange(ones, dtype=np.int64) - np.repeat(np.cumsum(q) - q, q)
        bits[group_starts + offsets] = 1
    if k:
        shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
        bits[(starts + q + 1)[:, None] + np.arange(k, dtype=np.int64)] = ((u[:, None] >> shifts) & 1).astype(np.uint8)
    return bytes([PACK_VERSION, predictor, k]) + _varint(n) + _varint(median) + np.packbits(bits).tobytes()


def unpack_gaps(data: bytes) -> list[int]:
    if len(data) < 5 or data[0] != PACK_VERSION:
        raise PackError("not packed gaps (unknown version or too short)")
    predictor, k = data[1], data[2]
    if predictor > 4 or k >= _MAX_K:
        raise PackError("bad predictor or Rice parameter")
    n, pos = _read_varint(data, 3)
    first, pos = _read_varint(data, pos)
    if n == 0:
        return []
    bits = int.from_bytes(data[pos:], "big")
    total = (len(data) - pos) * 8
    at = total  # bits remaining, read from the most significant end
    out: list[int] = []
    mask_k = (1 << k) - 1
    prev = first
    for i in range(n):
        q = 0
        while True:
            if at <= 0:
                raise PackError("truncated packed gaps")
            at -= 1
            if not (bits >> at) & 1:
                break
            q += 1
            if q > _MAX_UNARY:
                raise PackError("residual too large")
        if at < k:
            raise PackError("truncated packed gaps")
        at -= k
        u = (q << k) | ((bits >> at) & mask_k)
        predicted = first if i == 0 else first + (predictor * (prev - first)) // 4
        value = predicted + _unzigzag(u)
        if value < 0:
            raise PackError("negative gap")
        out.append(value)
        prev = value
    return out
