"""The 256-weight K-quant block quantizers (Q4_K, Q5_K, Q6_K), giving llama.cpp's reference bytes exactly.

Each kernel takes `x` of shape (superblocks, 256), float32, and returns (superblocks, bytes) uint8.

The reference fits each 32- (or 16-) weight sub-block by a small search: try ~20 candidate scales, keep the
one with the least weighted squared error. Everything is vectorized across sub-blocks; Python loops only run
over the search steps. The sub-blocks are laid out position-major, (32, S), for two reasons: each position is
one contiguous row, and `np.add.reduce(..., axis=0)` then adds row after row, i.e. in exactly the
sequential order of the reference's `for (i...) sum += ...` loops (a reduction along the last axis would use
pairwise summation and round differently). The search steps use `np.rint` (equal to the reference's
`nearest_int` in its bounded range there); the unbounded final steps use the exact emulation.
"""

from __future__ import annotations

import numpy as np

from llamatune.artifacts.quant_blocks import F32, fp16_bytes, fp16_round, nearest_int

GROUP_MAX_EPS = F32(1e-15)  # below this largest magnitude the reference treats a Q6_K sub-block as all zero


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """(n, S) -> (S,): a[0] + a[1] + ... + a[n-1] in that order, in float32, as the reference's loops do."""
    return np.add.reduce(a, axis=0)


def _position_major(x: np.ndarray, width: int) -> np.ndarray:
    """(superblocks, 256) -> (width, superblocks * 256/width): sub-blocks as columns, positions as rows."""
    return np.ascontiguousarray(x.reshape(-1, width).T)


class _Work:
    """Scratch arrays for one search, allocated once per chunk so the search steps run in place."""

    def __init__(self, shape: tuple[int, int]):
        self.a = np.empty(shape, F32)
        self.b = np.empty(shape, F32)
        self.c = np.empty(shape, F32)


def _codes(x: np.ndarray, shift: np.ndarray, iscale: np.ndarray, lo: float, hi: float, out: np.ndarray) -> np.ndarray:
    """out = clip(rint(iscale * (x - shift)), lo, hi): x (n, S), shift and iscale (S,)."""
    np.subtract(x, shift, out=out)
    np.multiply(out, iscale, out=out)
    np.rint(out, out=out)
    return np.clip(out, F32(lo), F32(hi), out=out)


def _fit_error(x, w, l, scale, offset, ws: _Work) -> np.ndarray:
    """(S,) sum of w * (scale*l + offset - x)**2 over each column, in the reference's order of operations."""
    diff = np.multiply(l, scale, out=ws.b)
    np.add(diff, offset, out=diff)
    np.subtract(diff, x, out=diff)
    np.multiply(diff, diff, out=diff)
    np.multiply(diff, w, out=diff)
    return _seq_sum(diff)


def _fit_scale_min(x, w, nmax: int, rmin: float, nstep: int):
    """llama.cpp's `make_qkx2_quants` (rdelta 0.1, squared error) for every column of x (n, S).

    Returns (scale (S,), the_min (S,), codes (n, S) float32). A step that improves the fit replaces the offset
    `lo`, and, as in the reference, later steps measure from that new offset.
    """
    ws = _Work(x.shape)
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    flat = hi == lo
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(np.multiply(w, x, out=ws.a))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        l = _codes(x, lo, iscale, 0, nmax, ws.a)
        best = _fit_error(x, w, l, scale, lo, ws)
        best_iscale, best_shift = iscale, lo
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(0.1) * F32(step) + F32(nmax)) / (hi - lo)  # (S,)
            l = _codes(x, lo, iscale, 0, nmax, ws.a)
            wl = np.multiply(w, l, out=ws.b)
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(np.multiply(wl, l, out=ws.c))
            sum_xl = _seq_sum(np.multiply(wl, x, out=ws.c))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0  # an offset above zero is clamped to 0 and the scale refitted alone
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, F32(0), this_min)
            err = _fit_error(x, w, l, this_scale, this_min, ws)
            better = (det > 0) & (err < best)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            best_iscale = np.where(better, iscale, best_iscale)
            best_shift = np.where(better, lo, best_shift)  # the offset these codes were measured from
            lo = np.where(better, this_min, lo)
        codes = _codes(x, best_shift, best_iscale, 0, nmax, np.empty_like(x))
    codes[:, flat] = 0  # a constant sub-block: codes 0, scale 0, and its (clamped) value as the min
    return np.where(flat, F32(0), scale), -lo, codes


def _positive_max(v: np.ndarray) -> np.ndarray:
    # (blocks, k) -> (blocks,): the reference's running max from +0 with a strict '>'
    m = v.max(axis=1)
    return np.where(m > 0, m, F32(0))


def _six_bit(v: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """nearest_int(inv * v) stored into a uint8 (wrapping) and capped at 63, as the reference does."""
    return np.minimum(nearest_int(inv[:, None] * v) & 0xFF, 63)


def _scale_min_codes(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K / Q5_K core, x (nb, 256) -> (d, dmin (nb, 2) bytes, scales (nb, 12) bytes, codes (nb, 256))."""
    nb = x.shape[0]
    sub = _position_major(x, 32)  # (32, nb*8)
    av = np.sqrt(_seq_sum(sub * sub) / F32(32))
    w = av + np.abs(sub)  # the reference's importance weights without an imatrix
    scale, the_min, search_codes = _fit_scale_min(sub, w, nmax, rmin, nstep)
    scales, mins = scale.reshape(nb, 8), the_min.reshape(nb, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    with np.errstate(divide="ignore"):
        ls = _six_bit(scales, np.where(max_scale > 0, F32(63) / max_scale, F32(0)))
        lm = _six_bit(mins, np.where(max_min > 0, F32(63) / max_min, F32(0)))
    d16, dmin16 = max_scale / F32(63), max_min / F32(63)
    d = fp16_round(d16)[:, None] * ls.astype(F32)  # (nb, 8) effective sub-block scales
    dm = fp16_round(dmin16)[:, None] * lm.astype(F32)
    xb = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        final = np.clip(nearest_int((xb + dm[..., None]) / d[..., None]), 0, nmax)
    # where a sub-block's scale rounds to zero the reference keeps the codes its search produced
    codes = np.where((d == 0)[..., None], search_codes.T.reshape(nb, 8, 32), final).astype(np.uint8)
    packed_scales = np.concatenate([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
    ], axis=1).astype(np.uint8)
    return np.concatenate([fp16_bytes(d16), fp16_bytes(dmin16)], axis=1), packed_scales, codes.reshape(nb, 256)


def _low_nibbles(codes: np.ndarray) -> np.ndarray:
    # (nb, 256) -> (nb, 128): per 64-weight group, weight l low nibble, weight l + 32 high nibble
    g = codes.reshape(-1, 4, 2, 32)
    return ((g[:, :, 0] & 0xF) | ((g[:, :, 1] & 0xF) << 4)).reshape(-1, 128)


def q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit codes. 144 bytes per 256 weights."""
    dd, scales, codes = _scale_min_codes(x, 15, -1.0, 20)
    return np.concatenate([dd, scales, _low_nibbles(codes)], axis=1)


def q5_k(x: np.ndarray) -> np.ndarray:
    """Q5_K: as Q4_K with 5-bit codes; bit 4 of weight 32*s + j is bit s of qh[j]. 176 bytes per 256 weights."""
    dd, scales, codes = _scale_min_codes(x, 31, -0.5, 15)
    high = (codes.reshape(-1, 8, 32) >> 4) & 1
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([dd, scales, qh, _low_nibbles(codes)], axis=1)


def _fit_symmetric(x: np.ndarray):
    """llama.cpp's `make_qx_quants` with nmax 32 and weights x**2, for every column of x (16, S).

    Returns (scale (S,), codes (16, S) int32 in 0..63, 0 for an all-zero column as in the reference).
    """
    ws = _Work(x.shape)
    ax = np.abs(x)
    pick = ax.argmax(axis=0)[None]
    amax, peak = np.take_along_axis(ax, pick, 0)[0], np.take_along_axis(x, pick, 0)[0]
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def sums(iscale):
        l = np.clip(np.rint(np.multiply(x, iscale, out=ws.a), out=ws.a), F32(-32), F32(31), out=ws.a)
        sumlx = _seq_sum(np.multiply(wx, l, out=ws.b))
        suml2 = _seq_sum(np.multiply(np.multiply(w, l, out=ws.c), l, out=ws.c))
        return sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        best_iscale = F32(-32) / peak
        sumlx, suml2 = sums(best_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = -(F32(32) + F32(0.1) * F32(step)) / peak
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
            best_iscale = np.where(better, iscale, best_iscale)
        codes = np.clip(np.rint(x * best_iscale), -32, 31).astype(np.int32) + 32
    codes[:, zero] = 0
    return np.where(zero, F32(0), scale), codes


def q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16 with signed 8-bit scales, 6-bit codes. 210 bytes per 256 weights."""
    nb = x.shape[0]
    scale, search_codes = _fit_symmetric(_position_major(x, 16))
    scales = scale.reshape(nb, 16)
    pick = np.abs(scales).argmax(axis=1)[:, None]  # first largest |scale|, keeping its sign
    max_scale = np.take_along_axis(scales, pick, 1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS  # the reference writes an all-zero block
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / max_scale
        d16 = F32(1) / iscale
        qscale = np.minimum(nearest_int(iscale[:, None] * scales), 127)  # (nb, 16), in -128..127
        d = fp16_round(d16)[:, None] * qscale.astype(F32)
        xb = x.reshape(nb, 16, 16)
        final = np.clip(nearest_int(xb / d[..., None]), -32, 31) + 32
    codes = np.where((d == 0)[..., None], search_codes.T.reshape(nb, 16, 16), final).astype(np.uint8)
    q = codes.reshape(nb, 2, 4, 32)  # halves of 128, quarters of 32
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((q >> 4) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    out = np.concatenate([ql, qh.reshape(nb, 64), qscale.astype(np.int8).view(np.uint8),
                          fp16_bytes(d16)], axis=1)
    out[empty] = 0
    return out
