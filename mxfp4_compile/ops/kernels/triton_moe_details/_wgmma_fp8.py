"""FP8-activation ("W4A8") prefill GEMMs of the "triton" MoE kernel in Gluon, on asynchronous fp8
wgmma (sm90 only).

What the Triton FP8 kernels (_fp8.py) compute, without their two costs: Triton 3.6 sends their
decoded e4m3 tile through shared memory every step (it does not keep the join of the two `prmt`
halves in the wgmma operand layout), and drains the wgmmas before each dequant. Here:
  - each thread loads exactly the words whose 8 codes it feeds to the fp8 wgmma's register A
    operand (k_width 4: columns 4c..4c+3 and 16+4c..16+4c+3 of a 32-code chunk for rows g and
    g+8, layout_fp8.py) and decodes each word's two halves as two int32 elements
    (layout_fp8.DEQUANT_HALF_ASM), in the operand's register order: the tile is the A operand
    as it is (no shared-memory round trip, no byte shuffle);
  - the block scales are folded into the e4m3 exponent relative to the row's largest scale of
    the step (layout_fp8.py: exact for offsets down to D_MIN, smaller blocks flushed to zero);
  - step i's wgmma runs asynchronously into a partial sum of its own (use_acc=False) while step
    i+1's tile is decoded; then the partial sum is multiplied by the step's power of two into
    the fp32 accumulator. That FMA is the promotion: no fp8 accumulation runs longer than one
    128-code step (4 wgmma k-steps; Hopper's fp8 MMA adds in reduced precision inside a chain);
  - the pipeline, grid, part-filled-block copies (HALF) and epilogues are _wgmma's, with the
    e4m3 activation tile copied in 16-byte pieces and each activation row's scale applied to
    the accumulator before the epilogue.
Inputs: _wgmma's launch arguments plus rs_ptr, the activation rows' fp32 scales (GEMM1: per
token [T]; GEMM2: per sorted row [M]); x_ptr / a_ptr hold e4m3 rows Kp wide (zeros past K);
w_ptr the FP8 layout's int32 words [E, N/16, K/64, 16, 8], s_ptr raw e8m0 bytes. GPU only:
tests/ops/kernels/test_triton_moe_wgmma_fp8.py compiles these for sm90 here and checks the
machine code, test_triton_moe_fp8.py runs the decode PTX on host ints against the layout's
model, and test_triton_moe_fp8_cuda.py checks results on the H100 (against the plain-torch
emulation and the Triton FP8 kernels).

Shape legend (one program): BN weight rows (G = BN/16 groups of 16, warp w holds group w), BM
sorted rows (tokens), BK = 128 codes per step (NB = 2 blocks of 64 codes, 4 chunks of 32).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from . import layout_fp8
from ._fp8 import _D_MAX, _D_MIN, _LUT_BASE0, _LUT_BASE1, _LUT_STEP0, _LUT_STEP1
from ._mma2 import _gemm1_epilogue, _gemm2_epilogue, _issue, _x_layout
from ._pdl import _pdl_enter
from ._wgmma import _acc_layout, _program, _ring, _ring_buffers, _ring_start, _rows

_DEQUANT_HALF_ASM = gl.constexpr(layout_fp8.DEQUANT_HALF_ASM)
_XV = gl.constexpr(16)  # e4m3 activations per 16-byte copy


@gluon.constexpr_function
def _tile_layout(NW):
    """[G, nb, half, g, cb, s, c, j] over NW warps: row 16G + 8half + g, column 64nb + 32cb +
    16s + 4c + j of a step's tile (word c of chunk 2nb + cb holds both halves s: layout_fp8.py).
    Registers in the order of the fp8 wgmma A operand (j, half, s, cb, nb: `order`), so that
    the decoded words are its registers as they are."""
    return gl.BlockedLayout([1, 1, 1, 1, 1, 1, 1, 4], [1, 1, 1, 8, 1, 1, 4, 1],
                            [NW, 1, 1, 1, 1, 1, 1, 1], [7, 2, 5, 4, 1, 6, 3, 0])


@gluon.jit
def _decode_fp8(w_stage, s_stage, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr):
    """One stage's words and scale bytes -> (dec [G, nb, half, g, cb, s, c] int32: the 4 e4m3
    bytes (j) of each word's half s, each block's values times 2**(its scale - the row's
    largest scale of the step + 6); mult [BN] fp32: 2**(that largest - 133), NaN where a scale
    byte is NaN (255)). Thread (g, c) of warp G decodes, for rows 16G+g and 16G+g+8 and every
    32-code chunk, word c of the chunk: its 8 codes are that thread's A-operand bytes.
    The tile stays int32 words until _operand: an fp8 tensor carried across the K loop's back
    edge is carried byte by byte (unpacked and packed again every step: sm90 SASS)."""
    G: gl.constexpr = BN // 16
    NB: gl.constexpr = BK // 64
    L7: gl.constexpr = gl.SliceLayout(7, _tile_layout(gl.num_warps()))
    words = gl.expand_dims(w_stage.reshape([G, NB, 2, 8, 2, 4]).load(gl.SliceLayout(5, L7)), 5)
    SC: gl.constexpr = gl.SliceLayout(5, gl.SliceLayout(5, L7))
    sc = s_stage.reshape([G, NB, 2, 8, 2]).load(SC).to(gl.int32)  # [G, nb, half, g, cb]
    ref = gl.max(gl.max(sc, axis=4), axis=1)  # [G, half, g]: the row's largest of the step
    # a block's table: LUT_BASE + d * LUT_STEP with offset d = sc - ref + D_MAX (layout_fp8.py),
    # as sc * LUT_STEP + (the row's part): one multiply-add per block, its immediate the step
    # (in int32 arithmetic modulo 2**32, as the table's own formula)
    r = gl.expand_dims(gl.expand_dims(_D_MAX - ref, 1), 4)
    ok = sc - gl.expand_dims(gl.expand_dims(ref, 1), 4) >= _D_MIN - _D_MAX  # (else: flushed)
    lo = gl.where(ok, sc * _LUT_STEP0 + (_LUT_BASE0 + r * _LUT_STEP0), 0)
    hi = gl.where(ok, sc * _LUT_STEP1 + (_LUT_BASE1 + r * _LUT_STEP1), 0)
    lo = gl.expand_dims(gl.expand_dims(lo, 5), 5)
    hi = gl.expand_dims(gl.expand_dims(hi, 5), 5)
    S1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(
        0, gl.SliceLayout(0, gl.SliceLayout(6, L7))))))
    s = gl.arange(0, 2, layout=S1)
    for _ in gl.static_range(5):
        s = gl.expand_dims(s, 0)
    s = gl.expand_dims(s, 6)  # [1, 1, 1, 1, 1, 2, 1]
    # (the operands broadcast to [G, nb, half, g, cb, s, c]: one word, two halves)
    dec = gl.inline_asm_elementwise(
        _DEQUANT_HALF_ASM, "=r,r,r,r,r,r", [words, lo, hi, 16 * s, 4 * s], dtype=gl.int32,
        is_pure=True, pack=1)
    # the multiplier's exponent field ref - 6; below 1 the subnormal 2**(ref - 133)
    e = ref - _D_MAX
    bits = gl.where(e >= 1, e << 23, 1 << (gl.maximum(ref, 0) + 16))
    mult = gl.where(ref == 255, float("nan"), bits.to(gl.float32, bitcast=True))
    return dec, gl.convert_layout(gl.reshape(mult, (BN,)),
                                  gl.SliceLayout(1, _acc_layout(gl.num_warps(), BM, 32)))


@gluon.jit
def _operand(dec, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr):
    """_decode_fp8's words -> the [BN, BK] e4m3 tile in the fp8 wgmma A-operand layout: each
    word is one of its registers (the same bits, now 4 fp8 elements)."""
    L8: gl.constexpr = _tile_layout(gl.num_warps())
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(
        0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L8))))))))
    for _ in gl.static_range(7):
        j = gl.expand_dims(j, 0)
    # (the word repeated over its 4 bytes j; with pack 4 one instance gets all four: $1..$4)
    w, j = gl.broadcast(gl.expand_dims(dec, 7), j)
    t = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r,r,r", [w], dtype=gl.float8e4nv,
                                  is_pure=True, pack=4)
    t = gl.reshape(gl.permute(t, (0, 2, 3, 1, 4, 5, 6, 7)), (BN, BK))
    return gl.convert_layout(t, gl.DotOperandLayout(0, _acc_layout(gl.num_warps(), BM, 32), 4))


@gluon.jit
def _step(state, i, n_steps, x_cur, w_cur, s_cur, w_nx, s_nx, w_fill, s_fill, x_fill, w_base,
          s_base, x_rows, xmask, K_ACT: gl.constexpr, Kp: gl.constexpr, stride_wn: gl.constexpr,
          stride_sn: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
          MASK_K: gl.constexpr, AHEAD: gl.constexpr, KS: gl.constexpr, XV: gl.constexpr,
          X_OFFS: gl.constexpr):
    """K step i (a `_wgmma._ring` step; state = (acc, part, a_cur, m_cur); w_cur, s_cur and KS
    unused): wgmma i (a_cur, the activation stage x_cur) into its own partial sum while step
    i+1's tile is decoded (stage w_nx, s_nx) and step i+AHEAD's copies are issued into the
    stage wgmma i-1 read (*_fill); then the promotion acc += part * m_cur. -> (acc, part, step
    i+1's operand and multiplier)."""
    acc, part, a_cur, m_cur = state
    part = warpgroup_mma(_operand(a_cur, BN, BM, BK), x_cur.permute((1, 0)), part,
                         use_acc=False, is_async=True)
    cp.wait_group(AHEAD - 2)  # this thread's copies of step i+1 landed
    gl.thread_barrier()  # everyone's; and every warpgroup retired wgmma i-1 (its stage is free)
    a_nx, m_nx = _decode_fp8(w_nx, s_nx, BN, BM, BK)  # (past the end: unused)
    if i + AHEAD < n_steps:
        _issue((i + AHEAD) * BK, w_fill, s_fill, x_fill, w_base, s_base, x_rows, xmask, K_ACT,
               Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, XV, X_OFFS)
    else:
        cp.commit_group()  # an empty group keeps wait_group's count in step
    # wgmma i retires inside this step (_wgmma._step says why: the A registers)
    part = warpgroup_mma_wait(0, deps=[part])
    acc = acc + part * gl.expand_dims(m_cur, 1)
    return acc, part, a_nx, m_nx


@gluon.jit
def _k_loop(w_base, s_base, x_rows, xmask, K_ACT: gl.constexpr, n_steps: gl.constexpr,
            Kp: gl.constexpr, stride_wn: gl.constexpr, stride_sn: gl.constexpr,
            BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, MASK_K: gl.constexpr):
    """acc [BN, BM] fp32 (wgmma layout) = W[rows] @ act[x_rows].T over the whole K, before the
    activation rows' scales: _step on _wgmma's 4-stage ring (_wgmma._ring)."""
    NW: gl.constexpr = gl.num_warps()
    ACC: gl.constexpr = _acc_layout(NW, BM, 32)
    x_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.float8e4nv)
    ws, ss, xs = _ring_buffers(BN, BM, BK, x_l, gl.float8e4nv)
    # the activation rows as (base, int32 offsets): half the registers of 64-bit row pointers
    XR: gl.constexpr = gl.SliceLayout(1, _x_layout(NW, BK, _XV))
    x_rows = (x_rows[0], gl.convert_layout(x_rows[1], XR))
    xmask = gl.convert_layout(xmask, XR)
    _ring_start(ws, ss, xs, w_base, s_base, x_rows, xmask, K_ACT, n_steps, Kp, stride_wn,
                stride_sn, BN, BM, BK, MASK_K, _XV, True)
    a, m = _decode_fp8(ws[0], ss[0], BN, BM, BK)
    acc = gl.zeros([BN, BM], gl.float32, ACC)
    part = gl.zeros([BN, BM], gl.float32, ACC)
    acc, part, a, m = _ring(_step, (acc, part, a, m), n_steps, ws, ss, xs, w_base, s_base,
                            x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K,
                            BK, _XV, True)
    return acc


@gluon.jit
def _row_scales(acc, rs):
    """acc [BN, BM] times each activation row's scale rs [BM] (loaded before the K loop: the
    row indices are then dead inside it)."""
    return acc * gl.expand_dims(gl.convert_layout(rs, gl.SliceLayout(0, acc.type.layout)), 0)


@gluon.jit
def _gemm1_block(x_ptr, sorted_ptr, b_ptr, a_ptr, p_ptr, rs_ptr, row0, row1, e64, n0, w_base,
                 s_base, k_top, alpha, limit, p_rows, stride_xt: gl.constexpr,
                 stride_wn: gl.constexpr, stride_sn: gl.constexpr, stride_be: gl.constexpr,
                 Hp: gl.constexpr, Ip: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
                 BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, MASK_K: gl.constexpr):
    rows, rmask = _rows(row0, row1, BM)
    tok = gl.load(sorted_ptr + rows, mask=rmask, other=0) // k_top
    rs = gl.load(rs_ptr + tok, mask=rmask, other=0.0)
    acc = _k_loop(w_base, s_base, (x_ptr, tok * stride_xt), rmask, Hp,
                  (Hp + BK - 1) // BK, Hp, stride_wn, stride_sn, BN, BM, BK, MASK_K)
    acc = _row_scales(acc, rs)
    _gemm1_epilogue(acc, rows, rmask, e64, n0, b_ptr, a_ptr, p_ptr, p_rows, alpha, limit,
                    stride_be, Ip, ACT, HAS_BIAS, BM, BN, 1)


@gluon.jit
def _gemm1_kernel(x_ptr, sorted_ptr, es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, b_ptr, a_ptr,
                  p_ptr, E, n_map, k_top, alpha, limit, p_rows, rs_ptr,
                  stride_xt: gl.constexpr, stride_we: gl.constexpr, stride_wn: gl.constexpr,
                  stride_se: gl.constexpr, stride_sn: gl.constexpr, stride_be: gl.constexpr,
                  H: gl.constexpr, Hp: gl.constexpr, Ip: gl.constexpr, ACT: gl.constexpr,
                  HAS_BIAS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  EB: gl.constexpr, SPLIT: gl.constexpr, K_CHUNK: gl.constexpr,
                  MASK_K: gl.constexpr, DIRECT: gl.constexpr, HAS_MAP: gl.constexpr,
                  LATE_TRIGGER: gl.constexpr, PDL: gl.constexpr, NS: gl.constexpr = 4,
                  HALF: gl.constexpr = 0):
    """_wgmma._gemm1_kernel on e4m3 rows x [T, Hp] (stride_xt = Hp) with scales rs [T]: a =
    act(rs[tok] * (xq[tok] @ W13[e].T) + b13[e]) in bf16."""
    gl.static_assert(SPLIT == 1 and not DIRECT and not LATE_TRIGGER and NS == 4 and BK == 128)
    _pdl_enter(PDL)
    valid, row0, row1, e64, n0, w_base, s_base = _program(
        es_ptr, w_ptr, s_ptr, E, 2 * Ip, stride_we, stride_wn, stride_se, stride_sn, BM, BN, EB)
    if valid:
        if HALF >= 2 and row1 - row0 <= BM // 4:
            _gemm1_block(x_ptr, sorted_ptr, b_ptr, a_ptr, p_ptr, rs_ptr, row0, row1, e64, n0,
                         w_base, s_base, k_top, alpha, limit, p_rows, stride_xt, stride_wn,
                         stride_sn, stride_be, Hp, Ip, ACT, HAS_BIAS, BM // 4, BN, BK, MASK_K)
        elif HALF >= 1 and row1 - row0 <= BM // 2:
            _gemm1_block(x_ptr, sorted_ptr, b_ptr, a_ptr, p_ptr, rs_ptr, row0, row1, e64, n0,
                         w_base, s_base, k_top, alpha, limit, p_rows, stride_xt, stride_wn,
                         stride_sn, stride_be, Hp, Ip, ACT, HAS_BIAS, BM // 2, BN, BK, MASK_K)
        else:
            _gemm1_block(x_ptr, sorted_ptr, b_ptr, a_ptr, p_ptr, rs_ptr, row0, row1, e64, n0,
                         w_base, s_base, k_top, alpha, limit, p_rows, stride_xt, stride_wn,
                         stride_sn, stride_be, Hp, Ip, ACT, HAS_BIAS, BM, BN, BK, MASK_K)


@gluon.jit
def _gemm2_block(a_ptr, sorted_ptr, b_ptr, y_ptr, rs_ptr, M, row0, row1, e64, n0, w_base,
                 s_base, stride_wn: gl.constexpr, stride_sn: gl.constexpr,
                 stride_be: gl.constexpr, H: gl.constexpr, Ip: gl.constexpr,
                 HAS_BIAS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                 MASK_K: gl.constexpr):
    rows, rmask = _rows(row0, row1, BM)
    rs = gl.load(rs_ptr + rows, mask=rmask, other=0.0)
    acc = _k_loop(w_base, s_base, (a_ptr, rows * Ip), rmask, Ip,
                  (Ip + BK - 1) // BK, Ip, stride_wn, stride_sn, BN, BM, BK, MASK_K)
    acc = _row_scales(acc, rs)
    _gemm2_epilogue(acc, rows, rmask, e64, n0, sorted_ptr, b_ptr, y_ptr, M, stride_be, H,
                    HAS_BIAS, BN, 1, False)


@gluon.jit
def _gemm2_kernel(a_ptr, sorted_ptr, es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, b_ptr, y_ptr, E,
                  n_map, M, rs_ptr,
                  stride_we: gl.constexpr, stride_wn: gl.constexpr, stride_se: gl.constexpr,
                  stride_sn: gl.constexpr, stride_be: gl.constexpr, H: gl.constexpr,
                  Ip: gl.constexpr, HAS_BIAS: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, BK: gl.constexpr, EB: gl.constexpr, SPLIT: gl.constexpr,
                  K_CHUNK: gl.constexpr, MASK_K: gl.constexpr, DIRECT: gl.constexpr,
                  HAS_MAP: gl.constexpr, PDL: gl.constexpr, NS: gl.constexpr = 4,
                  HALF: gl.constexpr = 0):
    """_wgmma._gemm2_kernel on e4m3 rows a [M, Ip] with scales rs [M]: y[assignment] =
    rs[row] * (aq[row] @ W2[e].T) + b2[e] in y's dtype."""
    gl.static_assert(SPLIT == 1 and not DIRECT and NS == 4 and BK == 128)
    _pdl_enter(PDL)
    valid, row0, row1, e64, n0, w_base, s_base = _program(
        es_ptr, w_ptr, s_ptr, E, H, stride_we, stride_wn, stride_se, stride_sn, BM, BN, EB)
    if valid:
        if HALF >= 2 and row1 - row0 <= BM // 4:
            _gemm2_block(a_ptr, sorted_ptr, b_ptr, y_ptr, rs_ptr, M, row0, row1, e64, n0, w_base,
                         s_base, stride_wn, stride_sn, stride_be, H, Ip, HAS_BIAS, BM // 4, BN,
                         BK, MASK_K)
        elif HALF >= 1 and row1 - row0 <= BM // 2:
            _gemm2_block(a_ptr, sorted_ptr, b_ptr, y_ptr, rs_ptr, M, row0, row1, e64, n0, w_base,
                         s_base, stride_wn, stride_sn, stride_be, H, Ip, HAS_BIAS, BM // 2, BN,
                         BK, MASK_K)
        else:
            _gemm2_block(a_ptr, sorted_ptr, b_ptr, y_ptr, rs_ptr, M, row0, row1, e64, n0, w_base,
                         s_base, stride_wn, stride_sn, stride_be, H, Ip, HAS_BIAS, BM, BN, BK,
                         MASK_K)
