"""Triton kernels of the "triton" MXFP4 MoE backend.

Shape legend: T tokens, k top-k, M = T*k (token, slot) assignments, E local experts,
H hidden (Hp padded), I intermediate (Ip padded), EB = next_pow2(E + 1) (bucket E collects
assignments whose expert is not on this rank).

Pipeline (all on the GPU, no host sync, fixed-size buffers):
  _route_kernel   ids [T, k] -> expert_start [E+1] (row offsets of each expert's run in sorted
                  order; expert_start[E] = number of valid assignments), sorted_assign [M]
                  (assignment index t*k+s, grouped by expert, stable).
  _gemm1_kernel   a[r] = act(x[tok(r)] @ W13[e].T + b13[e]) for sorted rows r: token gather,
                  MXFP4 dequant in registers, bias and activation fused. a [M, Ip] bf16.
  _gemm2_kernel   y[assign(r)] = a[r] @ W2[e].T + b2[e]: scatter to the (token, slot) row.
                  y [M, H] fp32.
  _finalize_kernel  out[t] = sum_s w[t,s] * y[t*k+s] in slot order (deterministic), or the
                  [T, k, H] rows with zeros for experts not on this rank.
GEMM programs find their (expert, row range) from expert_start alone: with BM rows per block,
expert e owns ceil(count_e / BM) consecutive blocks; the grid is sized for the worst case
min(M, M // BM + E) blocks and surplus programs exit at once.
"""
import triton
import triton.language as tl


@triton.jit
def _local_ids(ids_ptr, emap_ptr, offs, mask, E, HAS_MAP: tl.constexpr):
    """Expert id per assignment -> local expert in [0, E), or E when not on this rank."""
    ids = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    if HAS_MAP:
        ids = tl.load(emap_ptr + ids, mask=mask, other=-1).to(tl.int32)
    ids = tl.where((ids >= 0) & (ids < E) & mask, ids, E)
    return ids


@triton.jit
def _route_kernel(ids_ptr, emap_ptr, counts_ptr, es_ptr, sorted_ptr, M, E, n_chunks,
                  HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, EB: tl.constexpr,
                  PHASE: tl.constexpr):
    """PHASE 0: per-chunk expert counts -> counts [n_chunks, EB].
    PHASE 1: scatter each assignment to its sorted position (chunk bases from counts).
    PHASE 2: one program does both (n_chunks == 1: the decode case, one launch)."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < M
    loc = _local_ids(ids_ptr, emap_ptr, offs, mask, E, HAS_MAP)  # [CHUNK]
    buckets = tl.arange(0, EB)
    onehot = (loc[:, None] == buckets[None, :]).to(tl.int32) * mask[:, None].to(tl.int32)
    if PHASE == 0:
        cnt = tl.sum(onehot, axis=0)  # [EB]
        tl.store(counts_ptr + c * EB + buckets, cnt)
    else:
        if PHASE == 2:
            total = tl.sum(onehot, axis=0)
            base = tl.zeros([EB], dtype=tl.int32)
        else:
            total = tl.zeros([EB], dtype=tl.int32)
            base = tl.zeros([EB], dtype=tl.int32)
            cc = 0
            while cc < n_chunks:  # a while loop: n_chunks varies with T, no recompiles
                row = tl.load(counts_ptr + cc * EB + buckets)
                total += row
                base += tl.where(cc < c, row, 0)
                cc += 1
        start = tl.cumsum(total, axis=0) - total  # exclusive: first sorted row of each bucket
        if c == 0:
            tl.store(es_ptr + buckets, start, mask=buckets <= E)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # [CHUNK] rank in chunk
        pos = tl.sum(onehot * (start + base)[None, :], axis=1) + rank
        tl.store(sorted_ptr + pos, offs, mask=mask)


@triton.jit
def _block_info(es_ptr, pid_m, E, BM: tl.constexpr, EB: tl.constexpr):
    """Block pid_m -> (expert, first sorted row, end row, number of blocks in use)."""
    offs = tl.arange(0, EB)
    lo = tl.load(es_ptr + offs, mask=offs < E, other=0)
    hi = tl.load(es_ptr + offs + 1, mask=offs < E, other=0)
    nb = (hi - lo + BM - 1) // BM
    cb = tl.cumsum(nb, axis=0)  # inclusive block count
    total = tl.sum(nb, axis=0)
    e = tl.sum((cb <= pid_m).to(tl.int32), axis=0)
    sel = offs == e
    blk0 = tl.sum(tl.where(sel, cb - nb, 0), axis=0)
    row0 = tl.sum(tl.where(sel, lo, 0), axis=0) + (pid_m - blk0) * BM
    row1 = tl.sum(tl.where(sel, hi, 0), axis=0)
    return e, row0, row1, total


@triton.jit
def _dequant(packed, scales, R: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    """packed uint8 [R, BK/2] (low nibble = even k), scales e8m0 [R, BK/32] -> bf16 [R, BK].

    e2m1 -> bf16 by bit arithmetic: magnitude m = e1 e0 m0; for m >= 2 the bf16 pattern is
    (m << 6) + (126 << 7) (exponent e - 1 + 127, mantissa bit m0); m == 1 is 0.5 (126 << 7);
    m == 0 is zero. The scale byte s is the bf16 exponent field of 2**(s - 127), so the product
    is exact; 0xFF becomes NaN. UPCAST (interpreter: its bf16 arithmetic is wrong) multiplies
    in fp32 and returns fp32."""
    codes = tl.join(packed & 0xF, packed >> 4).reshape(R, BK).to(tl.int16)
    mag = codes & 7
    bits = tl.where(mag >= 2, (mag << 6) + 16128, tl.where(mag == 1, 16128, 0))
    bits = bits | ((codes & 8) << 12)
    vals = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    s = scales.to(tl.int16)
    sbits = tl.where(s == 255, 0x7FC0, s << 7).to(tl.int16)
    sv = sbits.to(tl.bfloat16, bitcast=True)
    if UPCAST:
        vals = vals.to(tl.float32)
        sv = sv.to(tl.float32)
    w = vals.reshape(R, BK // 32, 32) * sv[:, :, None]
    return w.reshape(R, BK)


@triton.jit
def _mma(acc, x, w, UPCAST: tl.constexpr):
    """acc [BM, BN] += x [BM, BK] @ w[BN, BK].T (fp32 operands under the interpreter, whose
    bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _gemm1_kernel(x_ptr, sorted_ptr, es_ptr, w_ptr, s_ptr, b_ptr, a_ptr,
                  E, k_top, n_blocks, stride_xt,
                  stride_we, stride_wn, stride_se, stride_sn, stride_be,
                  alpha, limit, H: tl.constexpr, Hp: tl.constexpr, Ip: tl.constexpr,
                  ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, EB: tl.constexpr,
                  EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % n_blocks
    pid_n = pid // n_blocks
    e, row0, row1, total = _block_info(es_ptr, pid_m, E, BM, EB)
    if pid_m >= total:
        return
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row1
    tok = tl.load(sorted_ptr + rows, mask=rmask, other=0) // k_top  # [BM]
    offs_n = pid_n * BN + tl.arange(0, BN)  # intermediate columns
    if EVEN_N:
        nmask = offs_n < BN * (pid_n + 1)
    else:
        nmask = offs_n < Ip
    if ACT == 0:  # swiglu_oai: rows interleaved (2j gate, 2j+1 up)
        g_rows = 2 * offs_n
        u_rows = 2 * offs_n + 1
    else:  # silu_glu: [gate; up] concatenated
        g_rows = offs_n
        u_rows = Ip + offs_n
    e64 = e.to(tl.int64)
    wg_ptrs = w_ptr + e64 * stride_we + g_rows[:, None] * stride_wn
    wu_ptrs = w_ptr + e64 * stride_we + u_rows[:, None] * stride_wn
    sg_ptrs = s_ptr + e64 * stride_se + g_rows[:, None] * stride_sn
    su_ptrs = s_ptr + e64 * stride_se + u_rows[:, None] * stride_sn
    x_ptrs = x_ptr + tok[:, None].to(tl.int64) * stride_xt
    kb = tl.arange(0, BK // 2)
    ks = tl.arange(0, BK // 32)
    kx = tl.arange(0, BK)
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, Hp, BK):
        xk = k0 + kx
        x = tl.load(x_ptrs + xk[None, :], mask=(xk < H)[None, :], other=0.0).to(tl.bfloat16)
        if EVEN_K:
            wg = tl.load(wg_ptrs + (k0 // 2 + kb)[None, :], mask=nmask[:, None], other=0)
            wu = tl.load(wu_ptrs + (k0 // 2 + kb)[None, :], mask=nmask[:, None], other=0)
            sg = tl.load(sg_ptrs + (k0 // 32 + ks)[None, :], mask=nmask[:, None], other=0)
            su = tl.load(su_ptrs + (k0 // 32 + ks)[None, :], mask=nmask[:, None], other=0)
        else:
            mb = nmask[:, None] & ((k0 + 2 * kb) < Hp)[None, :]
            ms = nmask[:, None] & ((k0 + 32 * ks) < Hp)[None, :]
            wg = tl.load(wg_ptrs + (k0 // 2 + kb)[None, :], mask=mb, other=0)
            wu = tl.load(wu_ptrs + (k0 // 2 + kb)[None, :], mask=mb, other=0)
            sg = tl.load(sg_ptrs + (k0 // 32 + ks)[None, :], mask=ms, other=0)
            su = tl.load(su_ptrs + (k0 // 32 + ks)[None, :], mask=ms, other=0)
        acc_g = _mma(acc_g, x, _dequant(wg, sg, BN, BK, UPCAST), UPCAST)
        acc_u = _mma(acc_u, x, _dequant(wu, su, BN, BK, UPCAST), UPCAST)
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + e64 * stride_be + g_rows, mask=nmask, other=0.0)[None, :]
        acc_u += tl.load(b_ptr + e64 * stride_be + u_rows, mask=nmask, other=0.0)[None, :]
    if ACT == 0:
        gate = tl.minimum(acc_g, limit)
        up = tl.minimum(tl.maximum(acc_u, -limit), limit)
        act = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    else:
        act = acc_g * tl.sigmoid(acc_g) * acc_u
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * Ip + offs_n[None, :]
    tl.store(a_ptrs, act.to(tl.bfloat16), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _gemm2_kernel(a_ptr, sorted_ptr, es_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
                  E, n_blocks,
                  stride_we, stride_wn, stride_se, stride_sn, stride_be,
                  H: tl.constexpr, Ip: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, EB: tl.constexpr, EVEN_K: tl.constexpr,
                  EVEN_N: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % n_blocks
    pid_n = pid // n_blocks
    e, row0, row1, total = _block_info(es_ptr, pid_m, E, BM, EB)
    if pid_m >= total:
        return
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row1
    assign = tl.load(sorted_ptr + rows, mask=rmask, other=0)
    offs_n = pid_n * BN + tl.arange(0, BN)  # hidden columns
    if EVEN_N:
        nmask = offs_n < BN * (pid_n + 1)
    else:
        nmask = offs_n < H
    e64 = e.to(tl.int64)
    w_ptrs = w_ptr + e64 * stride_we + offs_n[:, None] * stride_wn
    s_ptrs = s_ptr + e64 * stride_se + offs_n[:, None] * stride_sn
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * Ip
    kb = tl.arange(0, BK // 2)
    ks = tl.arange(0, BK // 32)
    kx = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, Ip, BK):
        if EVEN_K:
            a = tl.load(a_ptrs + (k0 + kx)[None, :])
            w = tl.load(w_ptrs + (k0 // 2 + kb)[None, :], mask=nmask[:, None], other=0)
            s = tl.load(s_ptrs + (k0 // 32 + ks)[None, :], mask=nmask[:, None], other=0)
        else:
            a = tl.load(a_ptrs + (k0 + kx)[None, :], mask=((k0 + kx) < Ip)[None, :], other=0.0)
            w = tl.load(w_ptrs + (k0 // 2 + kb)[None, :],
                        mask=nmask[:, None] & ((k0 + 2 * kb) < Ip)[None, :], other=0)
            s = tl.load(s_ptrs + (k0 // 32 + ks)[None, :],
                        mask=nmask[:, None] & ((k0 + 32 * ks) < Ip)[None, :], other=0)
        acc = _mma(acc, a, _dequant(w, s, BN, BK, UPCAST), UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e64 * stride_be + offs_n, mask=nmask, other=0.0)[None, :]
    y_ptrs = y_ptr + assign[:, None].to(tl.int64) * H + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=rmask[:, None] & (offs_n < H)[None, :])


@triton.jit
def _finalize_kernel(y_ptr, ids_ptr, emap_ptr, tw_ptr, out_ptr, E, H: tl.constexpr,
                     k_top: tl.constexpr,
                     HAS_MAP: tl.constexpr, COMBINE: tl.constexpr, BH: tl.constexpr):
    """out[t] = sum_s w[t, s] * y[t*k + s] in slot order; or out[t, s] = y[t*k + s] (zero for
    experts not on this rank). Rows of y for such experts were never written: mask, not scale."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = offs < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for s in range(0, k_top):
        a = t * k_top + s
        loc = tl.load(ids_ptr + a).to(tl.int32)
        if HAS_MAP:
            loc = tl.load(emap_ptr + loc).to(tl.int32)
        valid = (loc >= 0) & (loc < E)
        y = tl.load(y_ptr + a.to(tl.int64) * H + offs, mask=hmask & valid, other=0.0)
        if COMBINE:
            acc += tl.where(valid, tl.load(tw_ptr + a).to(tl.float32), 0.0) * y
        else:
            tl.store(out_ptr + a.to(tl.int64) * H + offs, y.to(out_ptr.dtype.element_ty), mask=hmask)
    if COMBINE:
        tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=hmask)
