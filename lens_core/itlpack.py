"""Compact, lossless packing of inter-token gaps (integer microseconds) for the wire format.

Gap lists dominate a record's size, and their low bits are noise that no general-purpose compressor can squeeze:
zstd over plain integer lists stays far above the noise's entropy. This packs them close to it: each gap is
predicted, the residual is zigzag-mapped to an unsigned integer and Rice-coded with the parameter that minimises
the total, with an escape so that a rare stall (a gap many times the usual) costs tens of bits, not hundreds.

Prediction: ``m + (r × (previous − m)) // 4`` where ``m`` is the list's median and ``r`` ∈ 0..4 is chosen per list
(0: the median alone; 4: the previous gap; between: decode times drift and jitter is correlated from one token
to the next). The first gap is predicted by ``m``.

Code for a residual ``u`` with parameter ``k``: ``q = u >> k``; if ``q < 8``: ``q`` one-bits and a zero; else
eight one-bits and the Elias-gamma code of ``q − 7`` (``b − 1`` zeros, then ``q − 7`` in ``b`` bits); then the
low ``k`` bits of ``u``.

Layout: ``version:u8 | r:u8 | k:u8 | count:varint | m:varint | codes…`` MSB first, zero-padded to a byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported by the packer only: reading packed gaps needs none of it
    import numpy as np

PACK_VERSION = 1
ESCAPE = 8  # unary quotients from here on are escaped into Elias-gamma
_MAX_K = 42
_MAX_GAMMA_BITS = 64


class PackError(ValueError):
    """Packed gaps that cannot be decoded."""


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


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bit length of positive int64 values below 2^53 (frexp's exponent is exact there)."""
    import numpy as np

    exponent: np.ndarray = np.frexp(x.astype(np.float64))[1]
    return exponent.astype(np.int64)


def _code_lengths(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    import numpy as np

    escaped = q >= ESCAPE
    gamma = 2 * _bit_length(np.where(escaped, q - (ESCAPE - 1), 1)) - 1
    lengths: np.ndarray = np.where(escaped, ESCAPE + gamma, q + 1) + k
    return lengths


def pack_gaps(gaps_us: Sequence[int]) -> bytes:
    """Pack non-negative integer gaps (< 2^40). Empty lists pack to 5 bytes. Vectorised with numpy."""
    import numpy as np

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
    # The best k sits near log2 of the mean residual; try a few around it for every predictor.
    centre = _bit_length(zigzag.mean(axis=1).astype(np.int64) + 1)
    # the candidate Rice parameters, sorted and unique (a set, not np.unique: that one loads numpy.ma, 1.3 MB)
    ks = np.array(sorted(set(np.clip(centre[:, None] + np.arange(-3, 2), 0, _MAX_K - 1).ravel().tolist())))
    quotients = zigzag[:, :, None] >> ks  # (predictor, gap, k)
    totals = _code_lengths(quotients, ks).sum(axis=1)
    best_predictor, best_k = np.unravel_index(int(np.argmin(totals)), totals.shape)
    predictor, k = int(best_predictor), int(ks[best_k])
    u = zigzag[predictor]
    q = u >> k
    escaped = q >= ESCAPE
    x = np.where(escaped, q - (ESCAPE - 1), 0)
    xbits = np.where(escaped, _bit_length(np.maximum(x, 1)), 0)
    ones = np.where(escaped, ESCAPE, q)  # run of one-bits
    zeros = np.where(escaped, xbits - 1, 1)  # zero-bits after it
    lengths = ones + zeros + xbits + k
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    bits = np.zeros(total + (-total) % 8, dtype=np.uint8)
    n_ones = int(ones.sum())
    if n_ones:
        offsets = np.arange(n_ones, dtype=np.int64) - np.repeat(np.cumsum(ones) - ones, ones)
        bits[np.repeat(starts, ones) + offsets] = 1
    if escaped.any():
        idx = np.flatnonzero(escaped)
        width = int(xbits[idx].max())
        j = np.arange(width, dtype=np.int64)
        valid = j[None, :] < xbits[idx, None]
        shift = np.where(valid, xbits[idx, None] - 1 - j[None, :], 0)
        values = (x[idx, None] >> shift) & 1
        positions = (starts[idx] + ones[idx] + zeros[idx])[:, None] + j[None, :]
        bits[positions[valid]] = values[valid].astype(np.uint8)
    if k:
        shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
        low_start = starts + ones + zeros + xbits
        bits[low_start[:, None] + np.arange(k, dtype=np.int64)] = ((u[:, None] >> shifts) & 1).astype(np.uint8)
    return bytes([PACK_VERSION, predictor, k]) + _varint(n) + _varint(median) + np.packbits(bits).tobytes()


def unpack_gaps(data: bytes) -> list[int]:
    if len(data) < 5 or data[0] != PACK_VERSION:
        raise PackError("not packed gaps (unknown version or too short)")
    predictor, k = data[1], data[2]
    if predictor > 4 or k >= _MAX_K:
        raise PackError("bad predictor or Rice parameter")
    n, pos = _read_varint(data, 3)
    median, pos = _read_varint(data, pos)
    if n == 0:
        return []
    if n > 8 * (len(data) - pos):
        raise PackError("more gaps announced than bits present")
    # The codes as a string of "0"/"1": reading a field is a slice, so decoding is linear in the size (shifting one
    # big integer per field, as before, made a 1 MiB list cost minutes to read).
    nbits = (len(data) - pos) * 8
    bits = format(int.from_bytes(data[pos:], "big"), "b").zfill(nbits) if nbits else ""
    at = 0
    out: list[int] = []
    prev = median
    find = bits.find
    for i in range(n):
        zero = find("0", at, at + ESCAPE)
        if zero < 0:  # eight one-bits (or the end): escaped into Elias-gamma
            if at + ESCAPE > nbits:
                raise PackError("truncated packed gaps")
            at += ESCAPE
            one = find("1", at, at + _MAX_GAMMA_BITS)
            if one < 0:
                raise PackError("residual too large" if at + _MAX_GAMMA_BITS <= nbits else "truncated packed gaps")
            zeros = one - at
            at = one + 1
            if at + zeros > nbits:
                raise PackError("truncated packed gaps")
            x = (1 << zeros) | (int(bits[at : at + zeros], 2) if zeros else 0)
            at += zeros
            q = x + ESCAPE - 1
        else:
            q = zero - at
            at = zero + 1
        if at + k > nbits:
            raise PackError("truncated packed gaps")
        u = (q << k) | (int(bits[at : at + k], 2) if k else 0)
        at += k
        residual = (u >> 1) if not (u & 1) else -((u + 1) >> 1)
        predicted = median if i == 0 else median + (predictor * (prev - median)) // 4
        value = predicted + residual
        if value < 0:
            raise PackError("negative gap")
        out.append(value)
        prev = value
    return out
