"""Decode GEMMs of the "triton" MoE kernel written in Gluon, on mma.sync (sm80+). (About 400
lines: both GEMMs share the pipeline below; split, they would import each other's layouts.)

Why a second implementation of the decode tiles: at T <= 64 the GEMMs stream the weights once
and are limited by the instructions each K step issues, not by the grid or the layout (a plain
reader streams the same grid near the floor: benchmarks/notes/op.md, session 6). The Triton
kernels issue ~295 instructions per 64 x 128 step, ~100 of them wgmma fences, descriptors,
warpgroup waits and a shared-memory round trip of the scale bytes that Triton's layout choice
forces; these issue 183 (16-row blocks) or 170 (8-row blocks; sm90 SASS,
tests/ops/kernels/test_triton_moe_mma2.py). Every layout is explicit:
  - words and scale bytes go from shared memory straight into the registers of the threads
    whose A fragment they decode to (the fragment a thread holds for mma.m16n8k16, which is
    what `prepare`'s word order was built for: layout.py, _dequant._assemble); the words and
    the activation tile by ldmatrix;
  - the MMA is mma.sync: no fences, descriptors or warpgroup waits, and nothing in flight
    across steps (no register race to drain, _dequant._wgmma_drain);
  - words, scales and the activation tile come through one cp.async pipeline of 3 stages, each
    its own buffers, the K loop unrolled by 3 (one barrier per step).
Same inputs, outputs and semantics as _gemm1._gemm1_kernel / _gemm2._gemm2_kernel with SWAP
(weight rows on the MMA's M side), BN = 64, 4 warps, unpaired tiles, bf16 activations; K steps
that reach past K (gpt-oss K = 2880, split chunks) are masked. The activation and the
programmatic launch come from _gemm1 and _pdl. Twins of Triton code kept on purpose: _block_info
is written again here (Gluon's arange needs an explicit layout, which the Triton helper does not
give), the kernels' argument lists match the Triton kernels' (one launch spec shape), and _k_loop
spells the 3- and 4-stage loops out (every stage's buffers a static choice). GPU only: Gluon has
no interpreter, so CPU CI runs the Triton kernels and compiles these for sm90 and sm80; the H100
checks their results (tests/ops/kernels/test_triton_moe_cuda.py, benchmarks/gpu_check.py).
Never run on Ampere.

Shape legend (one program): BN weight rows (G = BN/16 groups of 16, one per warp), BM sorted
rows (tokens), BK codes per step = NB 64-code blocks (2 NB 32-code chunks).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from . import layout
from ._gemm1 import _activation
from ._pdl import _pdl_enter, _pdl_trigger, _pdl_wait

_DEQUANT_ASM = gl.constexpr(layout.DEQUANT_ASM)
_ACC_SCALE = gl.constexpr(2.0 ** layout.ACC_SHIFT)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _block_info(es_ptr, pid_m, E, BM: gl.constexpr, EB: gl.constexpr):
    """_blocks._block_info with explicit layouts: block pid_m -> (expert, first sorted row,
    end row, blocks)."""
    L: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    offs = gl.arange(0, EB, layout=L)
    lo = gl.load(es_ptr + offs, mask=offs < E, other=0)
    hi = gl.load(es_ptr + offs + 1, mask=offs < E, other=0)
    nb = (hi - lo + BM - 1) // BM
    cb = gl.associative_scan(nb, 0, _add)  # inclusive block count
    total = gl.sum(nb, axis=0)
    e = gl.sum((cb <= pid_m).to(gl.int32), axis=0)
    sel = offs == e
    blk0 = gl.sum(gl.where(sel, cb - nb, 0), axis=0)
    row0 = gl.sum(gl.where(sel, lo, 0), axis=0) + (pid_m - blk0) * BM
    row1 = gl.sum(gl.where(sel, hi, 0), axis=0)
    return e, row0, row1, total


@gluon.jit
def _direct_info(ids_ptr, emap_ptr, pid_m, E, n_map, M, HAS_MAP: gl.constexpr):
    """DIRECT (one token, so k distinct experts): block pid_m is assignment pid_m alone, its
    expert read from the top-k ids (the route kernel's launch is saved) -> (expert, first row,
    end row, blocks); an expert not on this rank (or out of range) counts no blocks, so the
    program has no rows, as _route._local_ids makes it for the route kernel."""
    raw = gl.load(ids_ptr + pid_m)  # (ranges tested before narrowing: _route._local_ids)
    if HAS_MAP:
        in_map = (raw >= 0) & (raw < n_map)
        e = gl.where(in_map, gl.load(emap_ptr + gl.where(in_map, raw, 0)).to(gl.int32), -1)
    else:
        e = gl.where((raw >= 0) & (raw < E), raw, -1).to(gl.int32)
    live = (e >= 0) & (e < E)
    return gl.where(live, e, 0), pid_m, pid_m + 1, gl.where(live, M, 0)


@gluon.jit
def _program(es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, E, n_map, M, N: gl.constexpr,
             stride_we: gl.constexpr, stride_wn: gl.constexpr, stride_se: gl.constexpr,
             stride_sn: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, EB: gl.constexpr,
             DIRECT: gl.constexpr, HAS_MAP: gl.constexpr):
    """program_id(0) -> (whether it has rows, sorted rows [BM] and their mask, expert (int64),
    first weight row, the tile's words and scales): weight tiles of one row block side by side
    (as the Triton kernels' _blocks._grid_position), N weight rows in BN-row tiles. DIRECT: row r
    is assignment r (_direct_info)."""
    N_TILES: gl.constexpr = (N + BN - 1) // BN
    pid = gl.program_id(0)
    if DIRECT:
        e, row0, row1, total = _direct_info(ids_ptr, emap_ptr, pid // N_TILES, E, n_map, M,
                                            HAS_MAP)
    else:
        e, row0, row1, total = _block_info(es_ptr, pid // N_TILES, E, BM, EB)
    rows = row0 + gl.arange(0, BM, layout=gl.BlockedLayout([1], [32], [gl.num_warps()], [0]))
    e64 = e.to(gl.int64)
    n0 = (pid % N_TILES) * BN
    w_base = w_ptr + e64 * stride_we + (n0 // 16) * (16 * stride_wn)
    s_base = s_ptr + e64 * stride_se + (n0 // 16) * (16 * stride_sn)
    return pid // N_TILES < total, rows, rows < row1, e64, n0, w_base, s_base


@gluon.constexpr_function
def _x_layout(NW, BK, V=8):
    """Copy layout of the [BM, BK] activation tile over NW warps: pieces of V elements (16 bytes:
    8 bf16, 16 e4m3), a row's BK/V side by side."""
    return gl.BlockedLayout([1, V], [32 * V // BK, BK // V], [NW, 1], [1, 0])


@gluon.jit
def _issue(k0, w_buf, s_buf, x_buf, w_base, s_base, x_rows, xmask,
           K_ACT: gl.constexpr, Kp: gl.constexpr, stride_wn: gl.constexpr, stride_sn: gl.constexpr,
           BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, MASK_K: gl.constexpr,
           XV: gl.constexpr = 8, X_OFFS: gl.constexpr = False):
    """cp.async of one K step (codes k0 .. k0+BK) into one stage's buffers: the weight words
    [G, NB, 16, 8] and scale bytes [G, NB, 32] of the BN-row tile (as `prepare` tiles them: per
    16-row group and 64-code block, 16 rows x 8 words, then 16 rows x 2 bytes) and the
    activation tile [BM, BK]. MASK_K: steps may run past Kp (a tail or a split chunk's end);
    in a step that does, the blocks and columns past Kp are zero-filled, and decode to zero. XV:
    activation elements per copy (_x_layout). X_OFFS: x_rows is (base pointer, int32 element
    offsets of the rows), not the rows' pointers (half the registers live across the loop)."""
    G: gl.constexpr = BN // 16
    NB: gl.constexpr = BK // 64
    NW: gl.constexpr = gl.num_warps()  # G = NW here; _wgmma's 256-row tiles give a warp 2 groups
    WL: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 16, 2], [NW, 1, 1, 1], [3, 2, 1, 0])
    g = gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, WL))))
    b = gl.arange(0, NB, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, WL))))
    r = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, WL))))
    w = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, WL))))
    g4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(g, 1), 2), 3)
    b4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(b, 0), 2), 3)
    r4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 0), 1), 3)
    w4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(w, 0), 1), 2)
    woff = g4 * (16 * stride_wn) + (k0 // 64 + b4) * 128 + r4 * 8 + w4
    SL: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, NB, 32 // NB], [NW, 1, 1], [2, 1, 0])
    sg = gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, SL)))
    sb = gl.arange(0, NB, layout=gl.SliceLayout(0, gl.SliceLayout(2, SL)))
    sj = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, SL)))
    sg3 = gl.expand_dims(gl.expand_dims(sg, 1), 2)
    sb3 = gl.expand_dims(gl.expand_dims(sb, 0), 2)
    sj3 = gl.expand_dims(gl.expand_dims(sj, 0), 1)
    soff = sg3 * (16 * stride_sn) + (k0 // 64 + sb3) * 32 + sj3
    XL: gl.constexpr = _x_layout(NW, BK, XV)
    xk = k0 + gl.arange(0, BK, layout=gl.SliceLayout(0, XL))
    if X_OFFS:
        xptr = x_rows[0] + (gl.expand_dims(x_rows[1], 1) + gl.expand_dims(xk, 0))
    else:
        xptr = gl.expand_dims(x_rows, 1) + gl.expand_dims(xk, 0)
    if MASK_K and k0 + BK > Kp:  # (uniform branch: only the steps that reach past Kp)
        cp.async_copy_global_to_shared(w_buf, w_base + woff,
                                       mask=(k0 + 64 * b4 + 0 * woff) < Kp)
        cp.async_copy_global_to_shared(s_buf, s_base + soff,
                                       mask=(k0 + 64 * sb3 + 0 * soff) < Kp)
        cp.async_copy_global_to_shared(
            x_buf, xptr, mask=gl.expand_dims(xmask, 1) & gl.expand_dims(xk < K_ACT, 0))
    else:
        cp.async_copy_global_to_shared(w_buf, w_base + woff)
        cp.async_copy_global_to_shared(s_buf, s_base + soff)
        if K_ACT < Kp:  # x's columns past K_ACT (K padding): zeros
            cp.async_copy_global_to_shared(
                x_buf, xptr, mask=gl.expand_dims(xmask, 1) & gl.expand_dims(xk < K_ACT, 0))
        else:
            cp.async_copy_global_to_shared(
                x_buf, xptr, mask=gl.expand_dims(xmask, 1) & gl.expand_dims(xk >= 0, 0))
    cp.commit_group()


@gluon.jit
def _decode_tile(w_stage, s_stage, BN: gl.constexpr, BK: gl.constexpr, CB: gl.constexpr = -1):
    """One stage's words and scale bytes -> the [BN, BK] bf16 tile (times 2**-ACC_SHIFT) in the
    mma.sync A-operand layout. Thread (g, c) of warp G holds, for rows 16G+g and 16G+g+8 and
    every 32-code chunk, word c of the chunk (its 8 codes are that thread's fragment elements:
    layout.py) and the chunk's scale byte. CB = 0 or 1 (a 64-code stage, BK = 32): only that
    32-code chunk (_wgmma's half steps)."""
    G: gl.constexpr = BN // 16
    NB: gl.constexpr = (BK + 63) // 64
    # [G, nb, half, g, cb, c]: row 16G + 8half + g, 32-code chunk 2nb + cb, word c of it
    W6: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 1, 1], [1, 1, 1, 8, 1, 4],
                                        [gl.num_warps(), 1, 1, 1, 1, 1], [5, 4, 3, 2, 1, 0])
    w6 = w_stage.reshape([G, NB, 2, 8, 2, 4])
    s5 = s_stage.reshape([G, NB, 2, 8, 2])
    if CB >= 0:
        w6 = w6.slice(CB, 1, dim=4)
        s5 = s5.slice(CB, 1, dim=4)
    words = w6.load(W6)
    sc = s5.load(gl.SliceLayout(5, W6))
    m = gl.expand_dims(sc.to(gl.int32) * 0x00800080, 5)  # bf16x2 multiplier (_dequant._dequant)
    # (the PTX's third operand orders the Triton path's dequant after a drain: unused here)
    e0, e1, e2, e3, e4, e5, e6, e7 = gl.inline_asm_elementwise(
        _DEQUANT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, m, words], dtype=(gl.bfloat16,) * 8,
        is_pure=True, pack=1)
    q0 = gl.join(gl.join(e0, e1), gl.join(e2, e3))  # [..., lo, h]  (s = 0)
    q1 = gl.join(gl.join(e4, e5), gl.join(e6, e7))  # (s = 1)
    t = gl.join(q0, q1)  # [G, nb, half, g, cb, c, lo, h, s]
    # rows (G, half, g); K = 64nb + 32cb + 16s + 8h + 2c + lo
    t = gl.permute(t, (0, 2, 3, 1, 4, 8, 7, 5, 6))
    return gl.reshape(t, (BN, BK))


@gluon.jit
def _step(acc, i, n_steps, k_lo, r_w, r_s, r_x, w_w, w_s, w_x, w_base, s_base, x_rows, xmask,
          K_ACT: gl.constexpr, Kp: gl.constexpr, stride_wn: gl.constexpr,
          stride_sn: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
          MASK_K: gl.constexpr, AHEAD: gl.constexpr):
    """K step i: its copies (buffers r_*) are waited for, step i+AHEAD's are issued into w_*
    (AHEAD = stages - 1), then acc += the decoded weight tile @ the activation tile.T."""
    MMA: gl.constexpr = _mma_layout(BN)
    cp.wait_group(AHEAD - 1)
    gl.thread_barrier()  # every thread's copies of step i landed; step i-1's reads are done
    if i + AHEAD < n_steps:
        _issue(k_lo + (i + AHEAD) * BK, w_w, w_s, w_x, w_base, s_base, x_rows, xmask, K_ACT, Kp,
               stride_wn, stride_sn, BN, BM, BK, MASK_K)
    else:
        cp.commit_group()  # an empty group keeps wait_group's count in step
    a = gl.convert_layout(_decode_tile(r_w, r_s, BN, BK), gl.DotOperandLayout(0, MMA, 2))
    b = r_x.permute((1, 0)).load(gl.DotOperandLayout(1, MMA, 2))
    return mma_v2(a, b, acc)


@gluon.constexpr_function
def _mma_layout(BN):
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[BN // 16, 1],
                                     instr_shape=[16, 8])


@gluon.jit
def _stage_buffers(BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, x_l: gl.constexpr,
                   XT: gl.constexpr = gl.bfloat16):
    """One pipeline stage's shared memory: words [G, NB, 16, 8], scale bytes [G, NB, 32] (as
    _issue copies them) and the [BM, BK] activation tile of dtype XT in layout x_l (also
    _wgmma's and _wgmma_fp8's)."""
    G: gl.constexpr = BN // 16
    NB: gl.constexpr = BK // 64
    w = gl.allocate_shared_memory(gl.int32, [G, NB, 16, 8],
                                  gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    s = gl.allocate_shared_memory(gl.uint8, [G, NB, 32],
                                  gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    x = gl.allocate_shared_memory(XT, [BM, BK], x_l)
    return w, s, x


@gluon.jit
def _k_loop(w_base, s_base, x_rows, xmask, K_ACT: gl.constexpr, n_steps: gl.constexpr, k_lo,
            Kp: gl.constexpr, stride_wn: gl.constexpr, stride_sn: gl.constexpr,
            BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, MASK_K: gl.constexpr,
            NS: gl.constexpr):
    """acc [BN, BM] fp32 (mma layout) = W[rows] @ act[x_rows].T over n_steps steps from k_lo.
    NS (3 or 4) pipeline stages, each its own shared-memory buffers, the loop unrolled by NS so
    that every stage is a static choice: with one multi-stage buffer indexed per step the
    compiler cannot tell a stage being filled from the one being read and puts a second
    barrier between them (sm90 SASS: 2 BAR per step, now 1)."""
    gl.static_assert(NS == 3 or NS == 4)
    x_l: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    w0, s0, x0 = _stage_buffers(BN, BM, BK, x_l)
    w1, s1, x1 = _stage_buffers(BN, BM, BK, x_l)
    w2, s2, x2 = _stage_buffers(BN, BM, BK, x_l)
    # the activation rows in the copy layout once (a layout change goes through shared memory)
    x_rows = gl.convert_layout(x_rows, gl.SliceLayout(1, _x_layout(gl.num_warps(), BK)))
    xmask = gl.convert_layout(xmask, gl.SliceLayout(1, _x_layout(gl.num_warps(), BK)))
    # the first NS - 1 steps' copies (empty groups past n_steps keep wait_group's count)
    _issue(k_lo, w0, s0, x0, w_base, s_base, x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn,
           BN, BM, BK, MASK_K)
    if n_steps > 1:
        _issue(k_lo + BK, w1, s1, x1, w_base, s_base, x_rows, xmask, K_ACT, Kp, stride_wn,
               stride_sn, BN, BM, BK, MASK_K)
    else:
        cp.commit_group()
    acc = gl.zeros([BN, BM], gl.float32, _mma_layout(BN))
    if NS == 3:
        for j in range(n_steps // 3):
            i = 3 * j
            acc = _step(acc, i, n_steps, k_lo, w0, s0, x0, w2, s2, x2, w_base, s_base, x_rows,
                        xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 2)
            acc = _step(acc, i + 1, n_steps, k_lo, w1, s1, x1, w0, s0, x0, w_base, s_base,
                        x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 2)
            acc = _step(acc, i + 2, n_steps, k_lo, w2, s2, x2, w1, s1, x1, w_base, s_base,
                        x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 2)
        if n_steps % 3 > 0:
            acc = _step(acc, n_steps - n_steps % 3, n_steps, k_lo, w0, s0, x0, w2, s2, x2,
                        w_base, s_base, x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM,
                        BK, MASK_K, 2)
        if n_steps % 3 > 1:
            acc = _step(acc, n_steps - 1, n_steps, k_lo, w1, s1, x1, w0, s0, x0, w_base, s_base,
                        x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 2)
    else:
        w3, s3, x3 = _stage_buffers(BN, BM, BK, x_l)
        if n_steps > 2:
            _issue(k_lo + 2 * BK, w2, s2, x2, w_base, s_base, x_rows, xmask, K_ACT, Kp,
                   stride_wn, stride_sn, BN, BM, BK, MASK_K)
        else:
            cp.commit_group()
        for j in range(n_steps // 4):
            i = 4 * j
            acc = _step(acc, i, n_steps, k_lo, w0, s0, x0, w3, s3, x3, w_base, s_base, x_rows,
                        xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 3)
            acc = _step(acc, i + 1, n_steps, k_lo, w1, s1, x1, w0, s0, x0, w_base, s_base,
                        x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 3)
            acc = _step(acc, i + 2, n_steps, k_lo, w2, s2, x2, w1, s1, x1, w_base, s_base,
                        x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 3)
            acc = _step(acc, i + 3, n_steps, k_lo, w3, s3, x3, w2, s2, x2, w_base, s_base,
                        x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 3)
        if n_steps % 4 > 0:
            acc = _step(acc, n_steps - n_steps % 4, n_steps, k_lo, w0, s0, x0, w3, s3, x3,
                        w_base, s_base, x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM,
                        BK, MASK_K, 3)
        if n_steps % 4 > 1:
            acc = _step(acc, n_steps - n_steps % 4 + 1, n_steps, k_lo, w1, s1, x1, w0, s0, x0,
                        w_base, s_base, x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM,
                        BK, MASK_K, 3)
        if n_steps % 4 > 2:
            acc = _step(acc, n_steps - 1, n_steps, k_lo, w2, s2, x2, w1, s1, x1, w_base, s_base,
                        x_rows, xmask, K_ACT, Kp, stride_wn, stride_sn, BN, BM, BK, MASK_K, 3)
    return acc * _ACC_SCALE


@gluon.jit
def _gemm1_kernel(x_ptr, sorted_ptr, es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, b_ptr, a_ptr,
                  p_ptr, E, n_map, k_top, alpha, limit, p_rows,
                  stride_xt: gl.constexpr, stride_we: gl.constexpr, stride_wn: gl.constexpr,
                  stride_se: gl.constexpr, stride_sn: gl.constexpr, stride_be: gl.constexpr,
                  H: gl.constexpr, Hp: gl.constexpr, Ip: gl.constexpr, ACT: gl.constexpr,
                  HAS_BIAS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  EB: gl.constexpr, SPLIT: gl.constexpr, K_CHUNK: gl.constexpr,
                  MASK_K: gl.constexpr, DIRECT: gl.constexpr, HAS_MAP: gl.constexpr,
                  LATE_TRIGGER: gl.constexpr, PDL: gl.constexpr, NS: gl.constexpr = 3):
    """_gemm1._gemm1_kernel for the decode tiles (see the module docstring); DIRECT: rows are
    assignments (_direct_info), no route kernel before it. LATE_TRIGGER: GEMM2 may launch once
    every program is past its K loop, not at once (launches.moe_launches)."""
    _pdl_wait(PDL)
    if not LATE_TRIGGER:
        _pdl_trigger(PDL)
    valid, rows, rmask, e64, w0, w_base, s_base = _program(
        es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, E, n_map, p_rows, 2 * Ip, stride_we, stride_wn,
        stride_se, stride_sn, BM, BN, EB, DIRECT, HAS_MAP)
    if valid:
        if DIRECT:
            tok = rows // k_top
        else:
            tok = gl.load(sorted_ptr + rows, mask=rmask, other=0) // k_top
        # this program's K chunk (program_id(1)), steps past Hp are masked (MASK_K)
        STEPS: gl.constexpr = (K_CHUNK + BK - 1) // BK if SPLIT > 1 else (Hp + BK - 1) // BK
        acc = _k_loop(w_base, s_base, x_ptr + tok.to(gl.int64) * stride_xt, rmask, H, STEPS,
                      gl.program_id(1) * K_CHUNK, Hp, stride_wn, stride_sn, BN, BM, BK, MASK_K,
                      NS)
        if LATE_TRIGGER:
            _pdl_trigger(PDL)
        _gemm1_epilogue(acc, rows, rmask, e64, w0, b_ptr, a_ptr, p_ptr, p_rows, alpha, limit,
                        stride_be, Ip, ACT, HAS_BIAS, BM, BN, SPLIT)


@gluon.jit
def _gemm1_epilogue(acc, rows, rmask, e64, w0, b_ptr, a_ptr, p_ptr, p_rows, alpha, limit,
                    stride_be: gl.constexpr, Ip: gl.constexpr, ACT: gl.constexpr,
                    HAS_BIAS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                    SPLIT: gl.constexpr):
    """GEMM1's outputs from acc [BN, BM] fp32 (any layout) of weight rows w0 .. w0+BN and
    sorted rows `rows` (rmask): bias, gate/up pairing, activation -> a [M, Ip] bf16, or with
    split K the chunk's raw sums -> p [SPLIT, 2, p_rows, Ip] (also _wgmma's GEMM1)."""
    # a plain layout: [G, half, i, BM], tile row 16G + 8half + i = gate (half 0) or up (half 1)
    # of intermediate column 8G + i (`prepare`'s paired row order)
    G: gl.constexpr = BN // 16
    NW: gl.constexpr = gl.num_warps()
    EL: gl.constexpr = gl.BlockedLayout([1, 2, 1, 1], [1, 1, 8, 4], [NW, 1, 1, 1], [1, 3, 2, 0])
    acc = gl.convert_layout(gl.reshape(acc, (G, 2, 8, BM)), EL)
    if HAS_BIAS:
        bo = w0 + gl.arange(0, BN, layout=gl.BlockedLayout([1], [32], [NW], [0]))
        bias = gl.load(b_ptr + e64 * stride_be + bo, mask=bo < 2 * Ip, other=0.0)
        if SPLIT > 1:
            bias = gl.where(gl.program_id(1) == 0, bias, 0.0)
        bias = gl.convert_layout(gl.reshape(bias, (G, 2, 8, 1)), EL)
        acc = acc + bias
    gate, up = gl.split(gl.permute(acc, (0, 2, 3, 1)))  # [G, i, BM] each
    OL: gl.constexpr = gl.SliceLayout(3, gl.BlockedLayout([1, 1, 1, 2], [1, 8, 4, 1],
                                                          [NW, 1, 1, 1], [3, 1, 2, 0]))
    gate = gl.convert_layout(gate, OL)
    up = gl.convert_layout(up, OL)
    col = w0 // 2 + gl.expand_dims(gl.expand_dims(
        gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, OL))), 1), 2) * 8 \
        + gl.expand_dims(gl.expand_dims(
            gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, OL))), 0), 2)
    r3 = gl.expand_dims(gl.expand_dims(gl.convert_layout(
        rows, gl.SliceLayout(0, gl.SliceLayout(1, OL))), 0), 1)
    m3 = gl.expand_dims(gl.expand_dims(gl.convert_layout(
        rmask, gl.SliceLayout(0, gl.SliceLayout(1, OL))), 0), 1) & (col < Ip)
    if SPLIT > 1:
        p = p_ptr + ((gl.program_id(1) * 2 * p_rows + r3).to(gl.int64) * Ip + col)
        gl.store(p, gate, mask=m3)
        gl.store(p + p_rows * Ip, up, mask=m3)
    else:
        act = _activation(gate, up, alpha, limit, ACT)
        gl.store(a_ptr + r3.to(gl.int64) * Ip + col, act.to(gl.bfloat16), mask=m3)


@gluon.jit
def _gemm2_kernel(a_ptr, sorted_ptr, es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, b_ptr, y_ptr, E,
                  n_map, M,
                  stride_we: gl.constexpr, stride_wn: gl.constexpr, stride_se: gl.constexpr,
                  stride_sn: gl.constexpr, stride_be: gl.constexpr, H: gl.constexpr,
                  Ip: gl.constexpr, HAS_BIAS: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, BK: gl.constexpr, EB: gl.constexpr, SPLIT: gl.constexpr,
                  K_CHUNK: gl.constexpr, MASK_K: gl.constexpr, DIRECT: gl.constexpr,
                  HAS_MAP: gl.constexpr, PDL: gl.constexpr, NS: gl.constexpr = 3):
    """_gemm2._gemm2_kernel for the decode tiles (see the module docstring); DIRECT as in
    _gemm1_kernel."""
    _pdl_enter(PDL)
    valid, rows, rmask, e64, n0, w_base, s_base = _program(
        es_ptr, ids_ptr, emap_ptr, w_ptr, s_ptr, E, n_map, M, H, stride_we, stride_wn, stride_se,
        stride_sn, BM, BN, EB, DIRECT, HAS_MAP)
    if valid:
        STEPS: gl.constexpr = (K_CHUNK + BK - 1) // BK if SPLIT > 1 else (Ip + BK - 1) // BK
        acc = _k_loop(w_base, s_base, a_ptr + rows.to(gl.int64) * Ip, rmask, Ip, STEPS,
                      gl.program_id(1) * K_CHUNK, Ip, stride_wn, stride_sn, BN, BM, BK, MASK_K,
                      NS)
        _gemm2_epilogue(acc, rows, rmask, e64, n0, sorted_ptr, b_ptr, y_ptr, M, stride_be, H,
                        HAS_BIAS, BN, SPLIT, DIRECT)


@gluon.jit
def _gemm2_epilogue(acc, rows, rmask, e64, n0, sorted_ptr, b_ptr, y_ptr, M,
                    stride_be: gl.constexpr, H: gl.constexpr, HAS_BIAS: gl.constexpr,
                    BN: gl.constexpr, SPLIT: gl.constexpr, DIRECT: gl.constexpr):
    """GEMM2's outputs from acc [BN, BM] fp32 (any layout) of hidden columns n0 .. n0+BN and
    sorted rows `rows` (rmask): bias -> y[assignment] (y's dtype), chunk s of split K at
    y[s] (also _wgmma's GEMM2)."""
    OL: gl.constexpr = gl.BlockedLayout([1, 1], [8, 4], [gl.num_warps(), 1], [0, 1])
    acc = gl.convert_layout(acc, OL)
    cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, OL))
    if HAS_BIAS:
        bias = gl.load(b_ptr + e64 * stride_be + cols, mask=cols < H, other=0.0)
        if SPLIT > 1:
            bias = gl.where(gl.program_id(1) == 0, bias, 0.0)
        acc = acc + gl.expand_dims(bias, 1)
    r = gl.convert_layout(rows, gl.SliceLayout(0, OL))
    rm = gl.convert_layout(rmask, gl.SliceLayout(0, OL))
    if DIRECT:
        assign = r
    else:
        assign = gl.load(sorted_ptr + r, mask=rm, other=0)
    if SPLIT > 1:
        assign += gl.program_id(1) * M
    ptrs = y_ptr + gl.expand_dims(assign.to(gl.int64) * H, 0) + gl.expand_dims(cols, 1)
    gl.store(ptrs, acc.to(y_ptr.dtype.element_ty),
             mask=gl.expand_dims(rm, 0) & gl.expand_dims(cols < H, 1))
