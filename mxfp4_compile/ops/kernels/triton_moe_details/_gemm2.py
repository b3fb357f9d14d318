"""GEMM2 of the "triton" MoE kernel: y[assign(r)] = a[r] @ W2[e].T + b2[e], scattered to the
(token, slot) row; y [SPLIT, M, H] (float32 partial sums when K is split, else the hidden dtype
or float32 as the launch policy's `y_hidden_dtype` says).
"""
import triton
import triton.language as tl

from ._blocks import _merged, _program_block
from ._dequant import _tiled_rows
from ._fp8 import _k_loop_fp8, _scale_rows
from ._k_loop import _acc_rows, _acc_zeros, _k_loop, _k_loop_merged
from ._pdl import _pdl_enter


@triton.jit
def _gemm2_kernel(a_ptr, sorted_ptr, es_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
                  E, M, w_desc, w_desc_t, rs_ptr,
                  stride_we: tl.constexpr, stride_wn: tl.constexpr, stride_se: tl.constexpr,
                  stride_sn: tl.constexpr, stride_be: tl.constexpr,
                  H: tl.constexpr, Ip: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, EB: tl.constexpr, EVEN_K: tl.constexpr,
                  EVEN_N: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr,
                  SYNC: tl.constexpr, SPLIT: tl.constexpr, K_CHUNK: tl.constexpr,
                  PAIR: tl.constexpr, TAIL: tl.constexpr, HALF: tl.constexpr,
                  PDL: tl.constexpr, TMA: tl.constexpr = False, EXTRA: tl.constexpr = 0,
                  FP8: tl.constexpr = False):
    """w_ptr: int32 words [E, Hp, Ip/8] (with TMA, w_desc / w_desc_t: their descriptors for a
    whole / the TAIL step); s_ptr: uint8 [E, Hp, Ip/32]. SPLIT > 1: program_id(1) takes K_CHUNK
    of the K range and writes its partial sum (bias in chunk 0 only) to y_ptr [SPLIT, M, H];
    _finalize_kernel adds the chunks in order. PAIR: two BN-row weight
    tiles per program, HALF: part-filled blocks on BM/2 rows, EXTRA: merged last rows, as in
    _gemm1_kernel. FP8 (_fp8.py): a_ptr holds e4m3 rows [M, Ip] with one fp32 scale per row at
    rs_ptr [M]; w_ptr is the words' bytes, s_ptr raw e8m0 bytes."""
    _pdl_enter(PDL)
    pid_n, e, row0, row1, live = _program_block(es_ptr, E, H, BM, BN, EB, PAIR, EXTRA)
    if not live:
        return
    if _merged(row0, row1, BM, EXTRA):
        _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                     stride_we, stride_wn, stride_se, stride_sn, stride_be, H, Ip, HAS_BIAS,
                     BM, BN, BK, EVEN_K, EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL,
                     w_desc, w_desc_t, TMA, EXTRA, rs_ptr, FP8)
    elif HALF >= 2 and row1 - row0 <= BM // 4:
        _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                     stride_we, stride_wn, stride_se, stride_sn, stride_be, H, Ip, HAS_BIAS,
                     BM // 4, BN, BK, EVEN_K, EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR,
                     TAIL, w_desc, w_desc_t, TMA, 0, rs_ptr, FP8)
    elif HALF and row1 - row0 <= BM // 2:
        _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                     stride_we, stride_wn, stride_se, stride_sn, stride_be, H, Ip, HAS_BIAS,
                     BM // 2, BN, BK, EVEN_K, EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR,
                     TAIL, w_desc, w_desc_t, TMA, 0, rs_ptr, FP8)
    else:
        _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                     stride_we, stride_wn, stride_se, stride_sn, stride_be, H, Ip, HAS_BIAS,
                     BM, BN, BK, EVEN_K, EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL,
                     w_desc, w_desc_t, TMA, 0, rs_ptr, FP8)


@triton.jit
def _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                 stride_we: tl.constexpr, stride_wn: tl.constexpr, stride_se: tl.constexpr,
                 stride_sn: tl.constexpr, stride_be: tl.constexpr, H: tl.constexpr,
                 Ip: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                 UPCAST: tl.constexpr, SWAP: tl.constexpr, SYNC: tl.constexpr,
                 SPLIT: tl.constexpr, K_CHUNK: tl.constexpr, PAIR: tl.constexpr,
                 TAIL: tl.constexpr, w_desc, w_desc_t, TMA: tl.constexpr,
                 EXTRA: tl.constexpr, rs_ptr, FP8: tl.constexpr):
    """GEMM2 of one block: sorted rows row0 .. row0+BM (those below row1) of expert e, and
    with EXTRA the next EXTRA rows (those below row1) too."""
    n0 = pid_n * (2 if PAIR else 1) * BN  # first hidden column of the (first) tile
    offs_n = n0 + tl.arange(0, BN)
    if EVEN_N:
        nmask = offs_n < H + BN
    else:
        nmask = offs_n < H
    e64 = e.to(tl.int64)
    w_ptrs = w_ptr + e64 * stride_we + _tiled_rows(offs_n, stride_wn, 8)[:, None]
    s_ptrs = s_ptr + e64 * stride_se + _tiled_rows(offs_n, stride_sn, 2)[:, None]
    if EXTRA > 0:  # a merged block: BM / EXTRA + 1 groups of EXTRA rows (_k_loop_merged)
        tl.static_assert(not PAIR and TAIL == 0 and not TMA and not FP8)
        r = row0 + tl.arange(0, EXTRA)
        a_rows = a_ptr + r.to(tl.int64) * Ip
        a0, a1, a2, a3, a4 = _k_loop_merged(a_rows, a_rows + EXTRA * Ip, a_rows + 2 * EXTRA * Ip,
                                            a_rows + 3 * EXTRA * Ip, a_rows + 4 * EXTRA * Ip, r,
                                            row1, Ip, w_ptrs, s_ptrs, nmask, Ip, K_CHUNK, BN, BK,
                                            EXTRA, BM // EXTRA + 1, EVEN_K, UPCAST, SWAP, SYNC)
        _gemm2_rows_store(a0, n0, nmask, sorted_ptr, r, row1, M, e64, b_ptr, stride_be, y_ptr,
                          H, BN, HAS_BIAS, UPCAST, SWAP, SPLIT)
        _gemm2_rows_store(a1, n0, nmask, sorted_ptr, r + EXTRA, row1, M, e64, b_ptr, stride_be,
                          y_ptr, H, BN, HAS_BIAS, UPCAST, SWAP, SPLIT)
        _gemm2_rows_store(a2, n0, nmask, sorted_ptr, r + 2 * EXTRA, row1, M, e64, b_ptr,
                          stride_be, y_ptr, H, BN, HAS_BIAS, UPCAST, SWAP, SPLIT)
        if BM == 4 * EXTRA:
            _gemm2_rows_store(a3, n0, nmask, sorted_ptr, r + 3 * EXTRA, row1, M, e64, b_ptr,
                              stride_be, y_ptr, H, BN, HAS_BIAS, UPCAST, SWAP, SPLIT)
            _gemm2_rows_store(a4, n0, nmask, sorted_ptr, r + 4 * EXTRA, row1, M, e64, b_ptr,
                              stride_be, y_ptr, H, BN, HAS_BIAS, UPCAST, SWAP, SPLIT)
    elif FP8:
        tl.static_assert(not PAIR and not TMA)
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row1
        w_bytes = w_ptr + 4 * (e64 * stride_we + _tiled_rows(offs_n, stride_wn, 8))[:, None]
        acc = _k_loop_fp8(_acc_zeros(BN, BM, SWAP), a_ptr + rows.to(tl.int64) * Ip, rmask,
                          w_bytes, s_ptrs, nmask, Ip, K_CHUNK, BN, BK, EVEN_K, UPCAST, SWAP,
                          SYNC, TAIL, SPLIT)
        acc = _scale_rows(acc, tl.load(rs_ptr + rows, mask=rmask, other=0.0), SWAP)
        _gemm2_rows_store(acc, n0, nmask, sorted_ptr, rows, row1, M, e64, b_ptr, stride_be,
                          y_ptr, H, BN, HAS_BIAS, UPCAST, SWAP, SPLIT, True)
    else:
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row1
        acc = _acc_zeros(BN, BM, SWAP)
        nmask2 = (offs_n + BN) < (H + BN if EVEN_N else H)  # PAIR: the next BN hidden columns
        acc, acc2 = _k_loop(acc, acc, a_ptr + rows.to(tl.int64) * Ip, rmask, Ip, w_ptrs, s_ptrs,
                            nmask, nmask2, stride_wn, stride_sn, Ip, K_CHUNK, BN, BK, EVEN_K,
                            UPCAST, SWAP, SYNC, PAIR, TAIL, SPLIT, w_desc, w_desc_t,
                            (e * (stride_we // stride_wn) + n0) // 16, TMA)
        _gemm2_rows_store(acc, n0, nmask, sorted_ptr, rows, row1, M, e64, b_ptr, stride_be,
                          y_ptr, H, BN, HAS_BIAS, UPCAST, SWAP, SPLIT)
        if PAIR:
            _gemm2_rows_store(acc2, n0 + BN, nmask2, sorted_ptr, rows, row1, M, e64, b_ptr,
                              stride_be, y_ptr, H, BN, HAS_BIAS, UPCAST, SWAP, SPLIT)


@triton.jit
def _gemm2_rows_store(acc, n0, nmask, sorted_ptr, rows, row1, M, e64, b_ptr, stride_be, y_ptr,
                      H: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                      UPCAST: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr,
                      FP8: tl.constexpr = False):
    """_gemm2_store for sorted rows `rows` (those below row1): their y rows are the rows'
    assignments (in K chunk program_id(1)'s slab of y when K is split)."""
    rmask = rows < row1
    assign = tl.load(sorted_ptr + rows, mask=rmask, other=0)
    if SPLIT > 1:
        assign += tl.program_id(1) * M
    _gemm2_store(acc, n0, nmask, assign, rmask, e64, b_ptr, stride_be, y_ptr, H, BN, HAS_BIAS,
                 UPCAST, SWAP, SPLIT, FP8)


@triton.jit
def _gemm2_store(acc, n0, nmask, assign, rmask, e64, b_ptr, stride_be, y_ptr, H: tl.constexpr,
                 BN: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                 SWAP: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr = False):
    """GEMM2 epilogue of the tile of hidden columns n0 .. n0+BN: bias, scatter to y rows."""
    offs_n = n0 + tl.arange(0, BN)
    acc = _acc_rows(acc, offs_n, nmask, e64, b_ptr, stride_be, HAS_BIAS, UPCAST, SWAP, SPLIT, FP8)
    if UPCAST and y_ptr.dtype.element_ty == tl.bfloat16:
        acc = _round_bf16(acc)  # the interpreter's own rounding to bf16 is not the GPU's
    y_ptrs = y_ptr + assign[:, None].to(tl.int64) * H + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & (offs_n < H)[None, :])


@triton.jit
def _round_bf16(v):
    """float32 v rounded to the nearest bf16 value (ties to even), as float32: bit arithmetic
    for the interpreter, whose float32 -> bf16 conversion differs from the GPU's and torch's."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)
