"""The 32-weight GGML block quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the float helpers shared with the
K-quants, written to give llama.cpp's reference quantizer's bytes exactly.

Every kernel takes `x` of shape (blocks, 32), float32, and returns (blocks, bytes_per_block) uint8 in GGML's
block layout. All arithmetic stays in float32 and follows the reference's operation order: the reference
library is built without fused multiply-add (its objdump has no vfmadd), so plain float32 NumPy operations
round the same way. Ties are resolved like its loops: a strict `<`/`>` scan keeps the first extreme element,
which is what `argmin`/`argmax` return.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (n,) -> (n, 2) uint8, little-endian IEEE half, round-to-nearest-even like GGML's conversion
    (values past the half range become infinity in both)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(v, F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """The float32 value GGML reads back after storing `v` as a half."""
    with np.errstate(over="ignore"):
        return np.asarray(v, F32).astype(np.float16).astype(F32)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's `nearest_int`: adds 1.5 * 2**23 in float32 and reads the low mantissa bits as the integer.

    For |v| < 2**22 that is round-half-to-even (`np.rint`); beyond it the reference yields other integers,
    reproduced here too, so the cold paths (scales, final codes), where the range is not bounded, match always.
    """
    bits = (np.asarray(v, F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _first_at(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    # x (blocks, 32), index (blocks,) -> (blocks,): the element each block's scan settled on
    return np.take_along_axis(x, index[:, None], axis=1)[:, 0]


def _abs_extreme(x: np.ndarray) -> np.ndarray:
    """Per block, the signed value of the first element of largest magnitude, +0 for an all-zero block (the
    reference's scan starts from +0 and only replaces it on a strictly larger magnitude)."""
    ax = np.abs(x)
    pick = ax.argmax(axis=1)
    return np.where(_first_at(ax, pick) > 0, _first_at(x, pick), F32(0))


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d is zero (the reference's `d ? 1.0f/d : 0.0f`)."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(blocks, 32) codes -> (blocks, 16) bytes: element j in the low nibble, element j + 16 in the high one."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """(blocks, 32) 5-bit codes -> (blocks, 4) bytes: bit 4 of element k as bit k of a little-endian uint32."""
    weights = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
    qh = ((q.astype(np.uint32) >> 4) & 1) @ weights  # exact: a sum of distinct powers of two
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def _pack(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate([p.astype(np.uint8, copy=False) for p in parts], axis=1)


def _truncated(v: np.ndarray) -> np.ndarray:
    # C's float -> integer conversion rounds toward zero; the values here are small and non-negative
    return v.astype(np.int32)


def q4_0(x: np.ndarray) -> np.ndarray:
    """Q4_0: d = (signed largest-magnitude value) / -8, codes trunc(x/d + 8.5) capped at 15. 18 bytes."""
    d = _abs_extreme(x) / F32(-8)
    q = np.minimum(_truncated(x * _inverse(d)[:, None] + F32(8.5)), 15)
    return _pack(fp16_bytes(d), _nibbles(q))


def q5_0(x: np.ndarray) -> np.ndarray:
    """Q5_0: d = (signed largest-magnitude value) / -16, codes trunc(x/d + 16.5) capped at 31. 22 bytes."""
    d = _abs_extreme(x) / F32(-16)
    q = np.minimum(_truncated(x * _inverse(d)[:, None] + F32(16.5)), 31)
    return _pack(fp16_bytes(d), _fifth_bits(q), _nibbles(q))


def _min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # the first minimum / maximum element, so that a block whose extreme is a zero keeps that zero's sign
    return _first_at(x, x.argmin(axis=1)), _first_at(x, x.argmax(axis=1))


def q4_1(x: np.ndarray) -> np.ndarray:
    """Q4_1: d = (max - min) / 15, offset min, codes trunc((x - min)/d + 0.5) capped at 15. 20 bytes."""
    lo, hi = _min_max(x)
    d = (hi - lo) / F32(15)
    q = np.minimum(_truncated((x - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)), 15)
    return _pack(fp16_bytes(d), fp16_bytes(lo), _nibbles(q))


def q5_1(x: np.ndarray) -> np.ndarray:
    """Q5_1: d = (max - min) / 31, offset min, codes trunc((x - min)/d + 0.5) (no cap). 24 bytes."""
    lo, hi = _min_max(x)
    d = (hi - lo) / F32(31)
    q = _truncated((x - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)) & 0xFF
    return _pack(fp16_bytes(d), fp16_bytes(lo), _fifth_bits(q), _nibbles(q))


def q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0: d = max|x| / 127, codes roundf(x/d) (half away from zero). 34 bytes."""
    d = np.abs(x).max(axis=1) / F32(127)
    scaled = (x * _inverse(d)[:, None]).astype(np.float64)
    # in float64, |v| + 0.5 is exact for a float32 v, so truncating it is exactly C's roundf
    q = np.trunc(scaled + np.copysign(0.5, scaled)).astype(np.int8)
    return _pack(fp16_bytes(d), q.view(np.uint8))
