"""The Triton kernel of ops/topk_softmax.py (imported only where triton is)."""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_INT_MIN = tl.constexpr(-2147483648)
_INT_MAX = tl.constexpr(2147483647)


@triton.jit
def _topk_softmax_kernel(x_ptr, w_ptr, ids_ptr, T, E, stride_t, K: tl.constexpr,
                         KB: tl.constexpr, EB: tl.constexpr, BT: tl.constexpr,
                         SOFTMAX_FIRST: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    """BT rows of logits [T, E] per program -> weights [T, K] (f32 math, stored in w_ptr's dtype:
    one rounding), ids [T, K] int64.
    Selection runs on int32 keys ordered like the floats (negative floats' magnitude bits
    flipped): a NaN becomes the largest key, and a taken or padded column the smallest
    (INT_MIN, below -inf's key), so no column is taken twice even in a row of -inf.
    PDL (sm90+): it waits for the kernel before it (a no-op unless launched with launch_pdl,
    topk_softmax.PDL_LAUNCH), then lets the next kernel launch at once (the MoE's first kernel
    is a programmatic dependent launch: its programs become resident and wait for this grid)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EB)
    live = (rows < T)[:, None] & (cols < E)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=live,
                other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ _INT_MAX)
    key = tl.where(x != x, _INT_MAX, key)
    key = tl.where(live, key, _INT_MIN)
    kcol = tl.arange(0, KB)
    first = tl.max(key, axis=1)  # the row's largest key: softmax subtracts its logit
    top = tl.full([BT, KB], _INT_MIN, tl.int32)  # keys of the picks, in order
    for j in tl.static_range(K):
        best = tl.max(key, axis=1)
        idx = tl.min(tl.where(key == best[:, None], cols[None, :], EB), axis=1)
        tl.store(ids_ptr + rows.to(tl.int64) * K + j, idx.to(tl.int64), mask=rows < T)
        top = tl.where(kcol[None, :] == j, best[:, None], top)
        key = tl.where(cols[None, :] == idx[:, None], _INT_MIN, key)
    # keys back to floats: the picks' logits (a NaN comes back as NaN)
    v = tl.where(top >= 0, top, top ^ _INT_MAX).to(tl.float32, bitcast=True)
    vmax = tl.where(first >= 0, first, first ^ _INT_MAX).to(tl.float32, bitcast=True)
    ev = tl.where(kcol[None, :] < K, tl.exp(v - vmax[:, None]), 0.0)
    if SOFTMAX_FIRST and not RENORM:
        den = tl.sum(tl.where(live, tl.exp(x - vmax[:, None]), 0.0), axis=1)
    else:
        den = tl.sum(ev, axis=1)
    w = ev / den[:, None]
    tl.store(w_ptr + rows.to(tl.int64)[:, None] * K + kcol[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & (kcol < K)[None, :])
