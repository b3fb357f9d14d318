"""The combine: out[t] = sum_s w[t, s] * sum_c y[c, t*k + s] in slot and K-chunk order
(deterministic), or the uncombined [T, k, H] rows with zeros for experts not on this rank.
"""
import triton
import triton.language as tl

from ._pdl import _pdl_enter
from ._route import _local_ids


@triton.jit
def _finalize_kernel(y_ptr, ids_ptr, emap_ptr, tw_ptr, out_ptr, E, n_map, M, H: tl.constexpr,
                     k_top: tl.constexpr, HAS_MAP: tl.constexpr, COMBINE: tl.constexpr,
                     BH: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
    """out[t] = sum_s w[t, s] * y[t*k + s] in slot order; or out[t, s] = y[t*k + s] (zero for
    experts not on this rank, ids out of range included: _route._local_ids). Rows of y for
    such experts were never written: mask, not scale."""
    _pdl_enter(PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = offs < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for s in range(0, k_top):
        a = t * k_top + s
        valid = _local_ids(ids_ptr, emap_ptr, a, True, E, n_map, HAS_MAP) < E  # (E: elsewhere)
        y = tl.zeros([BH], dtype=tl.float32)
        for c in tl.static_range(SPLIT):  # GEMM2's K chunks, in order
            y += tl.load(y_ptr + (c * M + a).to(tl.int64) * H + offs, mask=tl.where(valid, hmask, False),
                         other=0.0).to(tl.float32)  # where, not &: Triton 3.9's interpreter
        if COMBINE:
            acc += tl.where(valid, tl.load(tw_ptr + a).to(tl.float32), 0.0) * y
        else:
            tl.store(out_ptr + a.to(tl.int64) * H + offs, y.to(out_ptr.dtype.element_ty),
                     mask=hmask)
    if COMBINE:
        tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=hmask)
