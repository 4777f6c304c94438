"""Offsets and masks the gated delta-rule scans share (fnlm.kernels.deltanet's fused scans and
fnlm.kernels.deltanet_split's loops): inlined @triton.jit helpers, no kernel of their own."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def program_tiles(iv, dk, dv, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """For value block `iv`: the chunk, key and value offsets (rc, rk, rv), the key and value
    masks (mk, mv), and the offsets and mask of this program's [BK, BV] slice of a [dk, dv]
    state."""
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk, mv = rk < dk, rv < dv
    return rc, rk, rv, mk, mv, rk[:, None] * dv + rv[None, :], mk[:, None] & mv[None, :]


@triton.jit
def chunk_tiles(chunk, rc, rk, rv, dk, dv, C: tl.constexpr):
    """Offsets of chunk `chunk`'s [C, BK] key tiles and [C, BV] value tiles."""
    kmat = chunk * C * dk + rc[:, None] * dk + rk[None, :]
    vmat = chunk * C * dv + rc[:, None] * dv + rv[None, :]
    return kmat, vmat
