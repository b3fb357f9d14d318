"""Prefill GEMMs of the "triton" MoE kernel written in Gluon, on asynchronous wgmma (sm90 only).

Why a third implementation: at prefill the Triton kernels (_gemm1, _gemm2) are held back by how
Triton 3.6 runs a dot whose A operand comes from registers. It splits the dot into K=16 slices,
each behind its own fence, and ptxas waits for each slice's wgmma before it writes the next
slice's dequantized values; the next step's dequant then waits for the whole step's wgmmas
(_dequant._wgmma_drain). The tensor cores idle while the words are decoded. Here the pipeline is
explicit:
  - wgmma i is issued asynchronously, step i+1's weight tile is decoded (the same words, scale
    bytes and decoder as _mma2: a warp's 16-row groups of the A fragment), then wgmma i is
    waited for in the same step. ptxas sees the decode inside the wgmma's pipeline stage and
    gives it other registers than the ones wgmma i reads; a wgmma left in flight across the
    loop's back edge is not tracked, and its A registers get overwritten (the race
    _dequant._wgmma_drain describes; tests/ops/kernels/test_triton_moe_wgmma.py checks the SASS);
  - words, scales and the activation tile come through a cp.async ring of 4 stages. Step i
    issues the copies for step i+3 into the stage wgmma i-1 read, after the barrier every warp
    reaches only once its wgmma i-1 has retired. As in Triton's own cp.async pipelines, no
    proxy fence sits between the copies and wgmma (fence_async_shared adds a MEMBAR.ALL.CTA
    and a second barrier to every step: sm90 SASS).
Policy `wgmma_wide` runs 128 rows x 256 weight rows per program instead of the table's tile:
each activation tile read from L2 then feeds twice the weight rows.
Same inputs, outputs and launch arguments as _mma2's kernels, with SWAP (weight rows on the MMA's
M side), 8 warps (two warpgroups), bf16 activations, whole-K programs (no split), and HALF:
blocks of at most BM/2 (BM/4) rows run a copy of the body for BM/2 (BM/4) rows. GPU only (no
interpreter): CPU CI compiles these for sm90 (tests/ops/kernels/test_triton_moe_wgmma.py); the
H100 checks their results (test_triton_moe_cuda.py, benchmarks/gpu_check.py).

Shape legend (one program): BN weight rows (G = BN/16 groups of 16; warp w holds groups w,
w + 8, ...), BM sorted rows (tokens), BK codes per step (NB = BK/64 blocks of 64 codes).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from ._mma2 import (_ACC_SCALE, _block_info, _decode_tile, _gemm1_epilogue, _gemm2_epilogue,
                    _issue, _stage_buffers, _x_layout)
from ._pdl import _pdl_enter


@gluon.constexpr_function
def _acc_layout(NW, BM, IK=16):
    """The wgmma accumulator layout of a [BN, BM] tile over NW warps: warp w holds rows
    16w + 16 NW r (r = 0, 1, ...): the row groups _decode_tile gives it. IK: the instruction's
    K (16 bf16, 32 e4m3)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                     instr_shape=[16, BM, IK])


@gluon.jit
def _step(state, i, n_steps, x_cur, w_cur, s_cur, w_nx, s_nx, w_fill, s_fill, x_fill, w_base,
          s_base, x_rows, xmask, K_ACT: gl.constexpr, Kp: gl.constexpr, stride_wn: gl.constexpr,
          stride_sn: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
          MASK_K: gl.constexpr, AHEAD: gl.constexpr, KS: gl.constexpr, XV: gl.constexpr,
          X_OFFS: gl.constexpr):
    """K step i (a `_ring` step; state = (acc, a_cur)): wgmma i (a_cur, the activation stage
    x_cur) runs while step i+1's tile is decoded (stage w_nx, s_nx) and step i+AHEAD's copies
    are issued into the stage wgmma i-1 read (*_fill). KS = 32: the step's two 32-code halves
    are two wgmmas, each running while the next half is decoded (half the A registers: the
    256-row tiles). -> (acc after wgmma i, the next tile or half decoded)."""
    acc, a_cur = state
    A_OP: gl.constexpr = gl.DotOperandLayout(0, _acc_layout(gl.num_warps(), BM), 2)
    if KS == 32:  # first half: decode the second half of this stage meanwhile
        acc = warpgroup_mma(a_cur, x_cur.slice(0, 32, dim=1).permute((1, 0)), acc,
                            is_async=True)
        a_cur = gl.convert_layout(_decode_tile(w_cur, s_cur, BN, 32, 1), A_OP)
        acc = warpgroup_mma_wait(0, deps=[acc])
        acc = warpgroup_mma(a_cur, x_cur.slice(32, 32, dim=1).permute((1, 0)), acc,
                            is_async=True)
    else:
        acc = warpgroup_mma(a_cur, x_cur.permute((1, 0)), acc, is_async=True)
    cp.wait_group(AHEAD - 2)  # this thread's copies of step i+1 landed
    gl.thread_barrier()  # everyone's; and every warpgroup retired wgmma i-1 (its stage is free)
    # step i+1's tile (its first half when KS = 32; past the end: unused)
    a_nx = gl.convert_layout(_decode_tile(w_nx, s_nx, BN, KS, 0 if KS == 32 else -1), A_OP)
    if i + AHEAD < n_steps:
        _issue((i + AHEAD) * BK, w_fill, s_fill, x_fill, w_base, s_base, x_rows, xmask, K_ACT,
               Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, XV, X_OFFS)
    else:
        cp.commit_group()  # an empty group keeps wait_group's count in step
    # wgmma i retires inside this step: the decode above wrote other registers than a_cur's
    # while it ran (ptxas sees both in one wgmma pipeline stage), and no wgmma is in flight
    # across the loop's back edge, where ptxas does not track its operand registers
    acc = warpgroup_mma_wait(0, deps=[acc])
    return acc, a_nx


@gluon.jit
def _ring_buffers(BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, x_l: gl.constexpr,
                  XT: gl.constexpr = gl.bfloat16):
    """The ring's 4 stages (_mma2._stage_buffers, each its own allocation) -> (words, scales,
    activation tiles), each a tuple of the 4 stages'."""
    w0, s0, x0 = _stage_buffers(BN, BM, BK, x_l, XT)
    w1, s1, x1 = _stage_buffers(BN, BM, BK, x_l, XT)
    w2, s2, x2 = _stage_buffers(BN, BM, BK, x_l, XT)
    w3, s3, x3 = _stage_buffers(BN, BM, BK, x_l, XT)
    return (w0, w1, w2, w3), (s0, s1, s2, s3), (x0, x1, x2, x3)


@gluon.jit
def _ring_start(ws, ss, xs, w_base, s_base, x_rows, xmask, K_ACT: gl.constexpr,
                n_steps: gl.constexpr, Kp: gl.constexpr, stride_wn: gl.constexpr,
                stride_sn: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                MASK_K: gl.constexpr, XV: gl.constexpr, X_OFFS: gl.constexpr):
    """The copies of steps 0-2 into stages 0-2 of the ring (ws, ss, xs: 4 stages; empty groups
    past n_steps keep wait_group's count); returns when step 0's have landed for every warp."""
    _issue(0, ws[0], ss[0], xs[0], w_base, s_base, x_rows, xmask, K_ACT, Kp, stride_wn,
           stride_sn, BN, BM, BK, MASK_K, XV, X_OFFS)
    if n_steps > 1:
        _issue(BK, ws[1], ss[1], xs[1], w_base, s_base, x_rows, xmask, K_ACT, Kp, stride_wn,
               stride_sn, BN, BM, BK, MASK_K, XV, X_OFFS)
    else:
        cp.commit_group()
    if n_steps > 2:
        _issue(2 * BK, ws[2], ss[2], xs[2], w_base, s_base, x_rows, xmask, K_ACT, Kp,
               stride_wn, stride_sn, BN, BM, BK, MASK_K, XV, X_OFFS)
    else:
        cp.commit_group()
    cp.wait_group(2)
    gl.thread_barrier()


@gluon.jit
def _four_steps(STEP: gl.constexpr, state, i, n_steps, ws, ss, xs, w_base, s_base, x_rows,
                xmask, K_ACT: gl.constexpr, Kp: gl.constexpr, stride_wn: gl.constexpr,
                stride_sn: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                MASK_K: gl.constexpr, R: gl.constexpr, KS: gl.constexpr, XV: gl.constexpr,
                X_OFFS: gl.constexpr):
    """Steps i .. i+3 (i = R mod 4: step i uses stage i % 4)."""
    for q in gl.static_range(4):
        state = STEP(state, i + q, n_steps, xs[(R + q) % 4], ws[(R + q) % 4], ss[(R + q) % 4],
                     ws[(R + q + 1) % 4], ss[(R + q + 1) % 4], ws[(R + q + 3) % 4],
                     ss[(R + q + 3) % 4], xs[(R + q + 3) % 4], w_base, s_base, x_rows, xmask,
                     K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 3, KS, XV, X_OFFS)
    return state


@gluon.jit
def _ring(STEP: gl.constexpr, state, n_steps: gl.constexpr, ws, ss, xs, w_base, s_base, x_rows,
          xmask, K_ACT: gl.constexpr, Kp: gl.constexpr, stride_wn: gl.constexpr,
          stride_sn: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
          MASK_K: gl.constexpr, KS: gl.constexpr, XV: gl.constexpr, X_OFFS: gl.constexpr):
    """The K loop over a 4-stage ring that _ring_start filled: STEP (this module's _step, or
    _wgmma_fp8's) for steps 0 .. n_steps-1, step i on stage i % 4, unrolled by 4 so that every
    stage is a static choice (one barrier per step; _mma2._k_loop says why). `state` is the
    tuple STEP carries from step to step (accumulator, decoded tile, ...). -> the last state."""
    # the n_steps % 4 odd steps run first (with them after the loop, Triton 3.6's
    # ConvertTritonGPUToLLVM fails an assertion)
    R: gl.constexpr = n_steps % 4
    for q in gl.static_range(R):
        state = STEP(state, q, n_steps, xs[q], ws[q], ss[q], ws[(q + 1) % 4], ss[(q + 1) % 4],
                     ws[(q + 3) % 4], ss[(q + 3) % 4], xs[(q + 3) % 4], w_base, s_base, x_rows,
                     xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 3, KS, XV,
                     X_OFFS)
    if n_steps // 4 == 1:  # (a loop that runs once fails the same assertion: no loop then)
        state = _four_steps(STEP, state, R, n_steps, ws, ss, xs, w_base, s_base, x_rows, xmask,
                            K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, R, KS, XV,
                            X_OFFS)
    else:
        for j in range(n_steps // 4):
            state = _four_steps(STEP, state, R + 4 * j, n_steps, ws, ss, xs, w_base, s_base,
                                x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK,
                                MASK_K, R, KS, XV, X_OFFS)
    cp.wait_group(0)  # (the empty groups)
    return state


@gluon.jit
def _k_loop(w_base, s_base, x_rows, xmask, K_ACT: gl.constexpr, n_steps: gl.constexpr,
            Kp: gl.constexpr, stride_wn: gl.constexpr, stride_sn: gl.constexpr,
            BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, MASK_K: gl.constexpr):
    """acc [BN, BM] fp32 (wgmma layout) = W[rows] @ act[x_rows].T over the whole K: _step on
    the 4-stage ring (_ring)."""
    NW: gl.constexpr = gl.num_warps()
    ACC: gl.constexpr = _acc_layout(NW, BM)
    # the activation tiles in the swizzled layout wgmma reads its B operand from
    x_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16)
    ws, ss, xs = _ring_buffers(BN, BM, BK, x_l)
    x_rows = gl.convert_layout(x_rows, gl.SliceLayout(1, _x_layout(NW, BK)))
    xmask = gl.convert_layout(xmask, gl.SliceLayout(1, _x_layout(NW, BK)))
    _ring_start(ws, ss, xs, w_base, s_base, x_rows, xmask, K_ACT, n_steps, Kp, stride_wn,
                stride_sn, BN, BM, BK, MASK_K, 8, False)
    # 256 weight rows: wgmma and the decode beside it take 32 codes at a time (two A register
    # sets of 64 codes do not fit beside the accumulator: ptxas then waits before each decode)
    KS: gl.constexpr = 32 if BN == 256 else BK
    a = gl.convert_layout(_decode_tile(ws[0], ss[0], BN, KS, 0 if KS == 32 else -1),
                          gl.DotOperandLayout(0, ACC, 2))
    acc = gl.zeros([BN, BM], gl.float32, ACC)
    acc, a = _ring(_step, (acc, a), n_steps, ws, ss, xs, w_base, s_base, x_rows, xmask, K_ACT,
                   Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, KS, 8, False)
    return acc * _ACC_SCALE


@gluon.jit
def _program(es_ptr, w_ptr, s_ptr, E, N: gl.constexpr, stride_we: gl.constexpr,
             stride_wn: gl.constexpr, stride_se: gl.constexpr, stride_sn: gl.constexpr,
             BM: gl.constexpr, BN: gl.constexpr, EB: gl.constexpr):
    """program_id(0) -> (whether its row block is in use, first sorted row, end row, expert
    (int64), first weight row, the tile's words and scales): weight tiles of one row block side
    by side (ledger: `N_FIRST`)."""
    N_TILES: gl.constexpr = (N + BN - 1) // BN
    pid = gl.program_id(0)
    e, row0, row1, total = _block_info(es_ptr, pid // N_TILES, E, BM, EB)
    e64 = e.to(gl.int64)
    n0 = (pid % N_TILES) * BN
    w_base = w_ptr + e64 * stride_we + (n0 // 16) * (16 * stride_wn)
    s_base = s_ptr + e64 * stride_se + (n0 // 16) * (16 * stride_sn)
    return pid // N_TILES < total, row0, row1, e64, n0, w_base, s_base


@gluon.jit
def _rows(row0, row1, BM: gl.constexpr):
    rows = row0 + gl.arange(0, BM, layout=gl.BlockedLayout([1], [32], [gl.num_warps()], [0]))
    return rows, rows < row1


@gluon.jit
def _gemm1_block(x_ptr, sorted_ptr, b_ptr, a_ptr, p_ptr, row0, row1, e64, n0, w_base, s_base,
                 k_top, alpha, limit, p_rows, stride_xt: gl.constexpr, stride_wn: gl.constexpr,
                 stride_sn: gl.constexpr, stride_be: gl.constexpr, H: gl.constexpr,
                 Hp: gl.constexpr, Ip: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
                 BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, MASK_K: gl.constexpr,
                 NS: gl.constexpr):
    rows, rmask = _rows(row0, row1, BM)
    tok = gl.load(sorted_ptr + rows, mask=rmask, other=0) // k_top
    acc = _k_loop(w_base, s_base, x_ptr + tok.to(gl.int64) * stride_xt, rmask, H,
                  (Hp + BK - 1) // BK, Hp, stride_wn, stride_sn, BN, BM, BK, MASK_K)
    _gemm1_epilogue(acc, rows, rmask, e64, n0, b_ptr, a_ptr, p_ptr, p_rows, alpha, limit,
                    stride_be, Ip, ACT, HAS_BIAS, BM, BN, 1)


@gluon.jit
def _gemm1_kernel(x_ptr, sorted_ptr, es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, b_ptr, a_ptr,
                  p_ptr, E, n_map, k_top, alpha, limit, p_rows,
                  stride_xt: gl.constexpr, stride_we: gl.constexpr, stride_wn: gl.constexpr,
                  stride_se: gl.constexpr, stride_sn: gl.constexpr, stride_be: gl.constexpr,
                  H: gl.constexpr, Hp: gl.constexpr, Ip: gl.constexpr, ACT: gl.constexpr,
                  HAS_BIAS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  EB: gl.constexpr, SPLIT: gl.constexpr, K_CHUNK: gl.constexpr,
                  MASK_K: gl.constexpr, DIRECT: gl.constexpr, HAS_MAP: gl.constexpr,
                  LATE_TRIGGER: gl.constexpr, PDL: gl.constexpr, NS: gl.constexpr = 4,
                  HALF: gl.constexpr = 0):
    """_gemm1._gemm1_kernel at prefill tiles (see the module docstring): a = act(x[tok] @
    W13[e].T + b13[e]) for the expert-sorted rows; ids_ptr, emap_ptr, n_map, p_ptr and K_CHUNK
    are unused (the launch arguments of _mma2's kernels)."""
    gl.static_assert(SPLIT == 1 and not DIRECT and not LATE_TRIGGER and NS == 4)
    _pdl_enter(PDL)
    valid, row0, row1, e64, n0, w_base, s_base = _program(
        es_ptr, w_ptr, s_ptr, E, 2 * Ip, stride_we, stride_wn, stride_se, stride_sn, BM, BN, EB)
    if valid:
        if HALF >= 2 and row1 - row0 <= BM // 4:
            _gemm1_block(x_ptr, sorted_ptr, b_ptr, a_ptr, p_ptr, row0, row1, e64, n0, w_base,
                         s_base, k_top, alpha, limit, p_rows, stride_xt, stride_wn, stride_sn,
                         stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM // 4, BN, BK, MASK_K, NS)
        elif HALF >= 1 and row1 - row0 <= BM // 2:
            _gemm1_block(x_ptr, sorted_ptr, b_ptr, a_ptr, p_ptr, row0, row1, e64, n0, w_base,
                         s_base, k_top, alpha, limit, p_rows, stride_xt, stride_wn, stride_sn,
                         stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM // 2, BN, BK, MASK_K, NS)
        else:
            _gemm1_block(x_ptr, sorted_ptr, b_ptr, a_ptr, p_ptr, row0, row1, e64, n0, w_base,
                         s_base, k_top, alpha, limit, p_rows, stride_xt, stride_wn, stride_sn,
                         stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM, BN, BK, MASK_K, NS)


@gluon.jit
def _gemm2_block(a_ptr, sorted_ptr, b_ptr, y_ptr, M, row0, row1, e64, n0, w_base, s_base,
                 stride_wn: gl.constexpr, stride_sn: gl.constexpr, stride_be: gl.constexpr,
                 H: gl.constexpr, Ip: gl.constexpr, HAS_BIAS: gl.constexpr, BM: gl.constexpr,
                 BN: gl.constexpr, BK: gl.constexpr, MASK_K: gl.constexpr, NS: gl.constexpr):
    rows, rmask = _rows(row0, row1, BM)
    acc = _k_loop(w_base, s_base, a_ptr + rows.to(gl.int64) * Ip, rmask, Ip,
                  (Ip + BK - 1) // BK, Ip, stride_wn, stride_sn, BN, BM, BK, MASK_K)
    _gemm2_epilogue(acc, rows, rmask, e64, n0, sorted_ptr, b_ptr, y_ptr, M, stride_be, H,
                    HAS_BIAS, BN, 1, False)


@gluon.jit
def _gemm2_kernel(a_ptr, sorted_ptr, es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, b_ptr, y_ptr, E,
                  n_map, M,
                  stride_we: gl.constexpr, stride_wn: gl.constexpr, stride_se: gl.constexpr,
                  stride_sn: gl.constexpr, stride_be: gl.constexpr, H: gl.constexpr,
                  Ip: gl.constexpr, HAS_BIAS: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, BK: gl.constexpr, EB: gl.constexpr, SPLIT: gl.constexpr,
                  K_CHUNK: gl.constexpr, MASK_K: gl.constexpr, DIRECT: gl.constexpr,
                  HAS_MAP: gl.constexpr, PDL: gl.constexpr, NS: gl.constexpr = 4,
                  HALF: gl.constexpr = 0):
    """_gemm2._gemm2_kernel at prefill tiles: y[assignment] = a[row] @ W2[e].T + b2[e] in y's
    dtype (see _gemm1_kernel for the unused arguments)."""
    gl.static_assert(SPLIT == 1 and not DIRECT and NS == 4)
    _pdl_enter(PDL)
    valid, row0, row1, e64, n0, w_base, s_base = _program(
        es_ptr, w_ptr, s_ptr, E, H, stride_we, stride_wn, stride_se, stride_sn, BM, BN, EB)
    if valid:
        if HALF >= 2 and row1 - row0 <= BM // 4:
            _gemm2_block(a_ptr, sorted_ptr, b_ptr, y_ptr, M, row0, row1, e64, n0, w_base, s_base,
                         stride_wn, stride_sn, stride_be, H, Ip, HAS_BIAS, BM // 4, BN, BK,
                         MASK_K, NS)
        elif HALF >= 1 and row1 - row0 <= BM // 2:
            _gemm2_block(a_ptr, sorted_ptr, b_ptr, y_ptr, M, row0, row1, e64, n0, w_base, s_base,
                         stride_wn, stride_sn, stride_be, H, Ip, HAS_BIAS, BM // 2, BN, BK,
                         MASK_K, NS)
        else:
            _gemm2_block(a_ptr, sorted_ptr, b_ptr, y_ptr, M, row0, row1, e64, n0, w_base, s_base,
                         stride_wn, stride_sn, stride_be, H, Ip, HAS_BIAS, BM, BN, BK, MASK_K,
                         NS)
