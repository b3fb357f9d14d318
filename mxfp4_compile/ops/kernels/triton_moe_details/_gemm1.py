"""GEMM1 of the "triton" MoE kernel: a[r] = act(x[tok(r)] @ W13[e].T + b13[e]) for the expert-
sorted rows r: token gather, MXFP4 dequant in registers, bias and activation fused; a [M, Ip]
bf16. Split K (decode): partial sums to p [SPLIT, 2, M, Ip], then _act_kernel -> a.
Shape legend: M = T*k assignments, E local experts, H hidden (Hp padded), Ip padded
intermediate.
"""
import triton
import triton.language as tl

from ._blocks import _gather_rows, _merged, _program_block
from ._dequant import _tiled_rows
from ._fp8 import _k_loop_fp8, _scale_rows
from ._k_loop import _acc_rows, _acc_zeros, _k_loop, _k_loop_merged
from ._pdl import _pdl_enter


@triton.jit
def _gemm1_kernel(x_ptr, sorted_ptr, es_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr,
                  E, k_top, alpha, limit, p_rows, w_desc, w_desc_t, rs_ptr,
                  stride_xt: tl.constexpr, stride_we: tl.constexpr, stride_wn: tl.constexpr,
                  stride_se: tl.constexpr, stride_sn: tl.constexpr, stride_be: tl.constexpr,
                  H: tl.constexpr, Hp: tl.constexpr, Ip: tl.constexpr,
                  ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, EB: tl.constexpr,
                  EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
                  SWAP: tl.constexpr, SYNC: tl.constexpr, SPLIT: tl.constexpr,
                  K_CHUNK: tl.constexpr, PAIR: tl.constexpr, TAIL: tl.constexpr,
                  HALF: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr = False,
                  EXTRA: tl.constexpr = 0, FP8: tl.constexpr = False):
    """w_ptr: int32 words [E, 2Ip, Hp/8] (with TMA, w_desc / w_desc_t: their descriptors for a
    whole / the TAIL step, _load_words_tma); s_ptr: uint8 [E, 2Ip, Hp/32]; rows in `prepare`'s
    paired order (16-row groups: 8 gate rows, then the 8 up rows of the same columns). One
    program: BM sorted rows x BN weight rows = BN/2 intermediate columns, one MMA per K step;
    PAIR: two such tiles side by side (the next BN rows too), sharing the activation tile and
    the loop's bookkeeping (fewer instructions per weight byte at decode).
    SPLIT > 1 (decode: too few programs to keep the SMs busy): program_id(1) takes K_CHUNK of
    the K range and stores its partial gate/up sums (bias in chunk 0 only) to
    p_ptr [SPLIT, 2, p_rows, Ip] fp32; _act_kernel adds the chunks in order and activates.
    HALF: a block holding at most BM/2 rows (an expert's last, part-filled block) runs a copy of
    the body compiled for BM/2 rows: half the MMA work for the same weight tiles; HALF = 2 also
    a copy for BM/4 rows, for blocks of at most BM/4.
    EXTRA > 0: an expert's last block of at most EXTRA rows merges into the block before it
    (_block_info), whose copy of the body multiplies each dequantized weight tile with all its
    rows (_k_loop_merged): the tile is dequantized once for them, not twice.
    FP8 (_fp8.py): x_ptr holds e4m3 rows [T, Hp] (stride_xt = Hp) with one fp32 scale per
    token at rs_ptr [T]; w_ptr is the words' bytes (layout_fp8.py), s_ptr raw e8m0 bytes."""
    _pdl_enter(PDL)
    pid_n, e, row0, row1, live = _program_block(es_ptr, E, 2 * Ip, BM, BN, EB, PAIR, EXTRA)
    if not live:
        return
    if _merged(row0, row1, BM, EXTRA):
        _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                     k_top, alpha, limit, p_rows, stride_xt, stride_we, stride_wn, stride_se,
                     stride_sn, stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM, BN, BK, EVEN_K,
                     EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL, w_desc, w_desc_t,
                     TMA, EXTRA, rs_ptr, FP8)
    elif HALF >= 2 and row1 - row0 <= BM // 4:
        _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                     k_top, alpha, limit, p_rows, stride_xt, stride_we, stride_wn, stride_se,
                     stride_sn, stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM // 4, BN, BK, EVEN_K,
                     EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL, w_desc, w_desc_t,
                     TMA, 0, rs_ptr, FP8)
    elif HALF and row1 - row0 <= BM // 2:
        _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                     k_top, alpha, limit, p_rows, stride_xt, stride_we, stride_wn, stride_se,
                     stride_sn, stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM // 2, BN, BK, EVEN_K,
                     EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL, w_desc, w_desc_t,
                     TMA, 0, rs_ptr, FP8)
    else:
        _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                     k_top, alpha, limit, p_rows, stride_xt, stride_we, stride_wn, stride_se,
                     stride_sn, stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM, BN, BK, EVEN_K,
                     EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL, w_desc, w_desc_t,
                     TMA, 0, rs_ptr, FP8)


@triton.jit
def _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                 k_top, alpha, limit, p_rows,
                 stride_xt: tl.constexpr, stride_we: tl.constexpr, stride_wn: tl.constexpr,
                 stride_se: tl.constexpr, stride_sn: tl.constexpr, stride_be: tl.constexpr,
                 H: tl.constexpr, Hp: tl.constexpr, Ip: tl.constexpr, ACT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
                 SWAP: tl.constexpr, SYNC: tl.constexpr, SPLIT: tl.constexpr,
                 K_CHUNK: tl.constexpr, PAIR: tl.constexpr, TAIL: tl.constexpr, w_desc,
                 w_desc_t, TMA: tl.constexpr, EXTRA: tl.constexpr, rs_ptr,
                 FP8: tl.constexpr):
    """GEMM1 of one block: sorted rows row0 .. row0+BM (those below row1) of expert e, and
    with EXTRA the next EXTRA rows (those below row1) too."""
    offs_w = pid_n * (2 if PAIR else 1) * BN + tl.arange(0, BN)  # weight rows (gate and up)
    if EVEN_N:
        wmask = offs_w < 2 * Ip + BN  # all true: lets the compiler drop the mask
    else:
        wmask = offs_w < 2 * Ip
    e64 = e.to(tl.int64)
    w_ptrs = w_ptr + e64 * stride_we + _tiled_rows(offs_w, stride_wn, 8)[:, None]
    s_ptrs = s_ptr + e64 * stride_se + _tiled_rows(offs_w, stride_sn, 2)[:, None]
    w0 = pid_n * (2 if PAIR else 1) * BN  # first weight row of the (first) tile
    if EXTRA > 0:  # a merged block: BM / EXTRA + 1 groups of EXTRA rows (_k_loop_merged)
        tl.static_assert(not PAIR and TAIL == 0 and not TMA and not FP8)
        r = row0 + tl.arange(0, EXTRA)
        x0 = _gather_rows(x_ptr, sorted_ptr, r, row1, k_top, stride_xt)
        x1 = _gather_rows(x_ptr, sorted_ptr, r + EXTRA, row1, k_top, stride_xt)
        x2 = _gather_rows(x_ptr, sorted_ptr, r + 2 * EXTRA, row1, k_top, stride_xt)
        x3 = _gather_rows(x_ptr, sorted_ptr, r + 3 * EXTRA, row1, k_top, stride_xt)
        x4 = _gather_rows(x_ptr, sorted_ptr, r + 4 * EXTRA, row1, k_top, stride_xt)
        a0, a1, a2, a3, a4 = _k_loop_merged(x0, x1, x2, x3, x4, r, row1, H, w_ptrs, s_ptrs,
                                            wmask, Hp, K_CHUNK, BN, BK, EXTRA, BM // EXTRA + 1,
                                            EVEN_K, UPCAST, SWAP, SYNC)
        _gemm1_store(a0, w0, wmask, r, r < row1, e64, b_ptr, stride_be, a_ptr, p_ptr, p_rows,
                     alpha, limit, Ip, EXTRA, BN, ACT, HAS_BIAS, UPCAST, SWAP, SPLIT)
        r += EXTRA
        _gemm1_store(a1, w0, wmask, r, r < row1, e64, b_ptr, stride_be, a_ptr, p_ptr, p_rows,
                     alpha, limit, Ip, EXTRA, BN, ACT, HAS_BIAS, UPCAST, SWAP, SPLIT)
        r += EXTRA
        _gemm1_store(a2, w0, wmask, r, r < row1, e64, b_ptr, stride_be, a_ptr, p_ptr, p_rows,
                     alpha, limit, Ip, EXTRA, BN, ACT, HAS_BIAS, UPCAST, SWAP, SPLIT)
        if BM == 4 * EXTRA:
            r += EXTRA
            _gemm1_store(a3, w0, wmask, r, r < row1, e64, b_ptr, stride_be, a_ptr, p_ptr,
                         p_rows, alpha, limit, Ip, EXTRA, BN, ACT, HAS_BIAS, UPCAST, SWAP, SPLIT)
            r += EXTRA
            _gemm1_store(a4, w0, wmask, r, r < row1, e64, b_ptr, stride_be, a_ptr, p_ptr,
                         p_rows, alpha, limit, Ip, EXTRA, BN, ACT, HAS_BIAS, UPCAST, SWAP, SPLIT)
    elif FP8:
        tl.static_assert(not PAIR and not TMA)
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row1
        tok = tl.load(sorted_ptr + rows, mask=rmask, other=0) // k_top
        w_bytes = w_ptr + 4 * (e64 * stride_we + _tiled_rows(offs_w, stride_wn, 8))[:, None]
        acc = _k_loop_fp8(_acc_zeros(BN, BM, SWAP), x_ptr + tok.to(tl.int64) * stride_xt, rmask,
                          w_bytes, s_ptrs, wmask, Hp, K_CHUNK, BN, BK, EVEN_K, UPCAST, SWAP,
                          SYNC, TAIL, SPLIT)
        acc = _scale_rows(acc, tl.load(rs_ptr + tok, mask=rmask, other=0.0), SWAP)
        _gemm1_store(acc, w0, wmask, rows, rmask, e64, b_ptr, stride_be, a_ptr, p_ptr, p_rows,
                     alpha, limit, Ip, BM, BN, ACT, HAS_BIAS, UPCAST, SWAP, SPLIT, True)
    else:
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row1
        acc = _acc_zeros(BN, BM, SWAP)
        wmask2 = (offs_w + BN) < (2 * Ip + BN if EVEN_N else 2 * Ip)  # PAIR: the next BN rows
        acc, acc2 = _k_loop(acc, acc, _gather_rows(x_ptr, sorted_ptr, rows, row1, k_top,
                                                   stride_xt), rmask, H, w_ptrs,
                            s_ptrs, wmask, wmask2, stride_wn, stride_sn, Hp, K_CHUNK, BN, BK,
                            EVEN_K, UPCAST, SWAP, SYNC, PAIR, TAIL, SPLIT, w_desc, w_desc_t,
                            (e * (stride_we // stride_wn) + pid_n * (2 if PAIR else 1) * BN)
                            // 16, TMA)
        _gemm1_store(acc, w0, wmask, rows, rmask, e64, b_ptr, stride_be, a_ptr, p_ptr, p_rows,
                     alpha, limit, Ip, BM, BN, ACT, HAS_BIAS, UPCAST, SWAP, SPLIT)
        if PAIR:
            _gemm1_store(acc2, w0 + BN, wmask2, rows, rmask, e64, b_ptr, stride_be, a_ptr, p_ptr,
                         p_rows, alpha, limit, Ip, BM, BN, ACT, HAS_BIAS, UPCAST, SWAP, SPLIT)


@triton.jit
def _gemm1_store(acc, w0, wmask, rows, rmask, e64, b_ptr, stride_be, a_ptr, p_ptr, p_rows,
                 alpha, limit, Ip: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                 SWAP: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr = False):
    """GEMM1 epilogue of the tile of weight rows w0 .. w0+BN (w0 a multiple of 16): bias, gate/up
    pairing, activation -> a (or the raw chunk sums -> p when K is split)."""
    acc = _acc_rows(acc, w0 + tl.arange(0, BN), wmask, e64, b_ptr, stride_be, HAS_BIAS, UPCAST,
                    SWAP, SPLIT, FP8)  # [BM, BN]
    # [BM, BN] -> gate, up [BM, BN/2]: row 16g + 8u + i of the tile is column 8g + i, u = up
    pair = tl.permute(tl.reshape(acc, (BM, BN // 16, 2, 8)), (0, 1, 3, 2))
    gate, up = tl.split(pair)
    gate = tl.reshape(gate, (BM, BN // 2))
    up = tl.reshape(up, (BM, BN // 2))
    offs_n = w0 // 2 + tl.arange(0, BN // 2)  # intermediate columns
    omask = rmask[:, None] & (offs_n < Ip)[None, :]
    if SPLIT > 1:
        p = p_ptr + ((tl.program_id(1) * 2 * p_rows + rows[:, None]).to(tl.int64) * Ip
                     + offs_n[None, :])
        tl.store(p, gate, mask=omask)
        tl.store(p + p_rows * Ip, up, mask=omask)
    else:
        act = _activation(gate, up, alpha, limit, ACT)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * Ip + offs_n[None, :]
        tl.store(a_ptrs, act.to(tl.bfloat16), mask=omask)


@triton.jit
def _activation(gate, up, alpha, limit, ACT: tl.constexpr):
    if ACT == 0:  # swiglu_oai
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    return gate * tl.sigmoid(gate) * up  # silu_glu


@triton.jit
def _act_kernel(p_ptr, a_ptr, n_rows, alpha, limit, Ip: tl.constexpr, ACT: tl.constexpr,
                SPLIT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr):
    """a[r, j] = act(sum_s gate[s, r, j], sum_s up[s, r, j]) over GEMM1's K chunks, added in
    chunk order (deterministic). p_ptr [SPLIT, 2, n_rows, Ip] fp32 -> a_ptr [>= n_rows, Ip] bf16.
    Rows of assignments not on this rank hold garbage and stay unread downstream."""
    _pdl_enter(PDL)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (r < n_rows)[:, None] & (c < Ip)[None, :]
    offs = r[:, None].to(tl.int64) * Ip + c[None, :]
    gate = tl.zeros([BR, BC], dtype=tl.float32)
    up = tl.zeros([BR, BC], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        gate += tl.load(p_ptr + (2 * s) * n_rows * Ip + offs, mask=m, other=0.0)
        up += tl.load(p_ptr + (2 * s + 1) * n_rows * Ip + offs, mask=m, other=0.0)
    tl.store(a_ptr + offs, _activation(gate, up, alpha, limit, ACT).to(tl.bfloat16), mask=m)
