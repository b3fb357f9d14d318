"""Triton kernels of the "triton" MXFP4 MoE kernel.

Shape legend: T tokens, k top-k, M = T*k (token, slot) assignments, E local experts,
H hidden (Hp padded), I intermediate (Ip padded), EB = next_pow2(E + 1) (bucket E collects
assignments whose expert is not on this rank).

Pipeline (all on the GPU, no host sync, fixed-size buffers):
  _route_kernel   ids [T, k] -> expert_start [E+1] (row offsets of each expert's run in sorted
                  order; expert_start[E] = number of valid assignments), sorted_assign [M]
                  (assignment index t*k+s, grouped by expert, stable).
  _gemm1_kernel   a[r] = act(x[tok(r)] @ W13[e].T + b13[e]) for sorted rows r: token gather,
                  MXFP4 dequant in registers, bias and activation fused. a [M, Ip] bf16.
                  (Split K: partial sums to p [SPLIT, 2, M, Ip], then _act_kernel -> a.)
  _gemm2_kernel   y[assign(r)] = a[r] @ W2[e].T + b2[e]: scatter to the (token, slot) row.
                  y [SPLIT, M, H] fp32 (SPLIT = 1 but at decode sizes).
  _finalize_kernel  out[t] = sum_s w[t,s] * sum_c y[c, t*k+s] in slot and chunk order
                  (deterministic), or the [T, k, H] rows with zeros for experts not on this rank.
GEMM programs find their (expert, row range) from expert_start alone: with BM rows per block,
expert e owns ceil(count_e / BM) consecutive blocks; the grid is sized for the worst case
min(M, M // BM + E) blocks and surplus programs exit at once.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import layout


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """Programmatic dependent launch (sm90+). A kernel launched with launch_pdl may have
    programs resident while the previous kernel in the stream still runs: each waits for it
    (its writes then visible) before any read or write, then lets the next kernel launch.
    Every program waits before it triggers, so a kernel's dependents launch only after
    everything before it in the stream has completed. Without launch_pdl both are no-ops."""
    _pdl_wait(PDL)
    _pdl_trigger(PDL)


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def _pdl_trigger(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()


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
                  PHASE: tl.constexpr, SORT: tl.constexpr, PDL: tl.constexpr,
                  SCANNED: tl.constexpr = False):
    """PHASE 0: per-chunk expert counts -> counts [n_chunks (+ 1), EB] (its first n_chunks rows).
    PHASE 1: scatter each assignment to its sorted position; its chunk's base per bucket is the
    sum of the earlier chunks' rows of counts, or with SCANNED (_route_scan_kernel ran between
    the phases) counts row c itself, and the totals its row n_chunks.
    PHASE 2: one program does both (n_chunks == 1, one launch). With SORT (small M: up to
    triton_moe._ROUTE_SORT_MAX) a histogram and a sort of (bucket, index) keys, which is the
    stable order itself (assignments past M sort last: bucket E, the largest indices)."""
    _pdl_enter(PDL)
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < M
    loc = _local_ids(ids_ptr, emap_ptr, offs, mask, E, HAS_MAP)  # [CHUNK]
    buckets = tl.arange(0, EB)
    if SORT:
        total = tl.histogram(loc, EB)  # (past M: counted in bucket E, which no start includes)
        tl.store(es_ptr + buckets, tl.cumsum(total, axis=0) - total, mask=buckets <= E)
        srt = tl.sort(loc * CHUNK + offs)
        tl.store(sorted_ptr + offs, srt % CHUNK, mask=mask)
    else:
        onehot = (loc[:, None] == buckets[None, :]).to(tl.int32) * mask[:, None].to(tl.int32)
        if PHASE == 0:
            tl.store(counts_ptr + c * EB + buckets, tl.sum(onehot, axis=0))
        else:
            if PHASE == 2:
                total = tl.sum(onehot, axis=0)
                base = tl.zeros([EB], dtype=tl.int32)
            elif SCANNED:
                total = tl.load(counts_ptr + n_chunks * EB + buckets)
                base = tl.load(counts_ptr + c * EB + buckets)
            else:
                total = tl.zeros([EB], dtype=tl.int32)
                base = tl.zeros([EB], dtype=tl.int32)
                cc = 0
                while cc < n_chunks:  # a while loop: n_chunks varies with T, no recompiles
                    row = tl.load(counts_ptr + cc * EB + buckets)
                    total += row
                    base += tl.where(cc < c, row, 0)
                    cc += 1
            start = tl.cumsum(total, axis=0) - total  # exclusive: first sorted row of a bucket
            if c == 0:
                tl.store(es_ptr + buckets, start, mask=buckets <= E)
            rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # [CHUNK] rank
            pos = tl.sum(onehot * (start + base)[None, :], axis=1) + rank
            tl.store(sorted_ptr + pos, offs, mask=mask)


@triton.jit
def _route_scan_kernel(counts_ptr, n_chunks, EB: tl.constexpr, BE: tl.constexpr,
                       RS: tl.constexpr, PDL: tl.constexpr):
    """Chunked routing, between the route kernel's phases 0 and 1: counts [n_chunks + 1, EB]
    (rows: per-chunk bucket counts) -> in place, row c = the counts of the chunks before c (an
    exclusive scan down each bucket's column) and row n_chunks = the totals. Program j scans
    buckets j BE .. (j+1) BE, RS chunks at a time (phase 1 once summed every earlier chunk's row
    in each of its programs; triton_moe._ROUTE_SCAN_CHUNKS says when this launch pays)."""
    _pdl_enter(PDL)
    cols = tl.program_id(0) * BE + tl.arange(0, BE)
    carry = tl.zeros([BE], dtype=tl.int32)
    r0 = 0
    while r0 < n_chunks:  # n_chunks varies with T (a while loop: the interpreter runs it too)
        rr = r0 + tl.arange(0, RS)
        ptrs = counts_ptr + rr[:, None] * EB + cols[None, :]
        m = (rr < n_chunks)[:, None]
        rows = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(rows, axis=0) - rows + carry[None, :], mask=m)
        carry += tl.sum(rows, axis=0)
        r0 += RS
    tl.store(counts_ptr + n_chunks * EB + cols, carry)


@triton.jit
def _block_info(es_ptr, pid_m, E, BM: tl.constexpr, EB: tl.constexpr, EXTRA: tl.constexpr = 0,
                MERGED_FIRST: tl.constexpr = False):
    """Block pid_m -> (expert, first sorted row, end row, number of blocks in use). EXTRA > 0:
    an expert's last block of at most EXTRA rows merges into the block before it, which then
    holds BM < rows <= BM + EXTRA (`_merged`); MERGED_FIRST: the experts with such a (longer)
    block get the first block numbers (configs.MERGED_FIRST)."""
    offs = tl.arange(0, EB)
    lo = tl.load(es_ptr + offs, mask=offs < E, other=0)
    hi = tl.load(es_ptr + offs + 1, mask=offs < E, other=0)
    nb = (hi - lo + BM - 1) // BM
    if EXTRA > 0:
        merged = (nb >= 2) & (hi - lo - (nb - 1) * BM <= EXTRA)
        nb -= merged.to(tl.int32)
    total = tl.sum(nb, axis=0)
    if MERGED_FIRST and EXTRA > 0:
        nb_m = tl.where(merged, nb, 0)
        cb = tl.where(merged, tl.cumsum(nb_m, axis=0),
                      tl.sum(nb_m, axis=0) + tl.cumsum(nb - nb_m, axis=0))
        sel = (cb - nb <= pid_m) & (pid_m < cb)
        e = tl.sum(tl.where(sel, offs, 0), axis=0)
    else:
        cb = tl.cumsum(nb, axis=0)  # inclusive block count
        e = tl.sum((cb <= pid_m).to(tl.int32), axis=0)
        sel = offs == e
    blk0 = tl.sum(tl.where(sel, cb - nb, 0), axis=0)
    row0 = tl.sum(tl.where(sel, lo, 0), axis=0) + (pid_m - blk0) * BM
    row1 = tl.sum(tl.where(sel, hi, 0), axis=0)
    return e, row0, row1, total


@triton.jit
def _merged(row0, row1, BM: tl.constexpr, EXTRA: tl.constexpr):
    """Whether a block from _block_info holds an expert's merged last rows (BM + <= EXTRA rows;
    an earlier block of that expert sees more than BM + EXTRA rows up to row1)."""
    return (EXTRA > 0) & (row1 - row0 > BM) & (row1 - row0 <= BM + EXTRA)


# e2m1 -> bf16 on the GPU, 8 elements per 32-bit word: `prepare` places each code's bits as
# layout.py says, and layout.DEQUANT_ASM turns a word into 4 bf16 pairs that are exactly
# value * 2**-126, with one rotate and one or two masks each, then one bf16x2 FMA by
# 2**(s - 1 - ACC_SHIFT) (s = the e8m0 byte) scales two elements; the accumulator is multiplied
# by 2**ACC_SHIFT at the end. `prepare` stores each scale biased, b = s + 127 - 1 - ACC_SHIFT
# = s + 62 (the multiplier's bf16 exponent field): one integer multiply, b * 0x00800080, then
# builds the bf16x2 multiplier. Exact for s = 66..192 (|w| from about 2**-61 to 2**66):
# `prepare` refuses larger scales; smaller ones flush toward zero (absolute error < 2**-60).
# s = 255 (NaN) becomes b = 255, an infinite multiplier, and `prepare` zeroes that block's codes:
# 0 * inf = NaN for the whole block, as the format says.
ACC_SHIFT = tl.constexpr(layout.ACC_SHIFT)
ACC_SCALE = tl.constexpr(2.0 ** layout.ACC_SHIFT)
_SCALE_BIAS = tl.constexpr(layout.SCALE_BIAS)
_DEQUANT_ASM = tl.constexpr(layout.DEQUANT_ASM)
_MAG_AT = tl.constexpr(layout.MAG_AT)
_SIGN_AT = tl.constexpr(layout.SIGN_AT)


@triton.jit
def _assemble(e0, e1, e2, e3, e4, e5, e6, e7, R: tl.constexpr, BK: tl.constexpr):
    """Eight [R, BK/8] tensors (element t of every word) -> the [R, BK] tile in logical K order.
    `prepare` stores word c of each 32-code chunk with element t = 4s + 2h + lo holding column
    16s + 8h + 2c + lo: the fragment a thread holds for a 64x16 wgmma A operand (bf16 pairs at
    columns 2c, 2c+8 of each 16-column half). Built this way, the joins, permute and reshape
    below only relabel registers: the tile never goes through shared memory on its way to the
    tensor cores (checked in the sm90 SASS: no STS/LDSM of the dequantized tile)."""
    q0 = tl.join(tl.join(e0, e1), tl.join(e2, e3))  # [R, BK/8, lo, h]  (s = 0)
    q1 = tl.join(tl.join(e4, e5), tl.join(e6, e7))  # (s = 1)
    x = tl.reshape(tl.join(q0, q1), (R, BK // 32, 4, 2, 2, 2))  # [R, chunk, c, lo, h, s]
    return tl.reshape(tl.permute(x, (0, 1, 5, 4, 2, 3)), (R, BK))  # K = 32chunk+16s+8h+2c+lo


@triton.jit
def _dequant(words, scales, R: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
             SYNC: tl.constexpr):
    """words int32 [R, BK/8] (8 codes each, `prepare`'s order), scales uint8 [R, BK/8] (the
    biased scale byte of each word's 32-block) -> [R, BK]: bf16 * 2**-ACC_SHIFT on the GPU
    (inline PTX); under the interpreter (UPCAST) exact fp32 values, by plain bit arithmetic."""
    if UPCAST:
        b = scales.to(tl.int32)
        sv = tl.where(b == 255, float("nan"),
                      ((b - _SCALE_BIAS) << 23).to(tl.float32, bitcast=True))
        c0 = _e2m1_f32(words, _MAG_AT[0], _SIGN_AT[0])
        c1 = _e2m1_f32(words, _MAG_AT[1], _SIGN_AT[1])
        c2 = _e2m1_f32(words, _MAG_AT[2], _SIGN_AT[2])
        c3 = _e2m1_f32(words, _MAG_AT[3], _SIGN_AT[3])
        c4 = _e2m1_f32(words, _MAG_AT[4], _SIGN_AT[4])
        c5 = _e2m1_f32(words, _MAG_AT[5], _SIGN_AT[5])
        c6 = _e2m1_f32(words, _MAG_AT[6], _SIGN_AT[6])
        c7 = _e2m1_f32(words, _MAG_AT[7], _SIGN_AT[7])
        w = _assemble(c0 * sv, c1 * sv, c2 * sv, c3 * sv, c4 * sv, c5 * sv, c6 * sv, c7 * sv, R, BK)
    else:  # (no early return: Triton would still emit the code after a constexpr-if return)
        m = scales.to(tl.int32) * 0x00800080  # bf16x2 multiplier 2**(s - 1 - ACC_SHIFT), twice
        if SYNC:
            token = _wgmma_drain()
        else:
            token = 0
        # `token` is an unused operand: it only orders the dequant after the drain
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            _DEQUANT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, m, token],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        w = _assemble(e0, e1, e2, e3, e4, e5, e6, e7, R, BK)
    return w


@triton.jit
def _e2m1_f32(words, mag_at: tl.constexpr, sign_at: tl.constexpr):
    """fp32 value of the e2m1 code whose magnitude bits start at bit `mag_at` of each word and
    whose sign is bit `sign_at` (layout.py; interpreter path)."""
    mag = (words >> mag_at) & 7
    neg = ((words >> sign_at) & 1) != 0
    bits = tl.where(mag >= 2, (mag << 6) + 16128, tl.where(mag == 1, 16128, 0))  # bf16 pattern
    v = (bits << 16).to(tl.float32, bitcast=True)
    return tl.where(neg, -v, v)


@triton.jit
def _tiled_rows(offs, stride: tl.constexpr, W: tl.constexpr):
    """Offset (at column 0) of rows `offs` in an expert's prepared codes or scales, tiled by
    `prepare` (triton_moe._tile_rows): groups of 16 rows (16 x stride units), and inside a group
    each 64-code block holds the 16 rows' W units side by side (W = 8 words, or 2 scale bytes)."""
    return (offs // 16) * (16 * stride) + (offs % 16) * W


@triton.jit
def _tiled_cols(k0, N: tl.constexpr, W: tl.constexpr):
    """Offsets, from a row's _tiled_rows start, of its N units (W per 64-code block) beginning
    at code k0, a multiple of 64: block b of a row group starts at unit 16 W b."""
    j = tl.arange(0, N)
    return (k0 // 64) * (16 * W) + (j // W) * (16 * W) + j % W


@triton.jit
def _load_words(w_ptrs, k0, rmask, Kp: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """One [R, BK] weight tile as int32 words [R, BK/8] (8 codes each); w_ptrs [R, 1] from
    _tiled_rows, k0 a multiple of 64."""
    kw = tl.arange(0, BK // 8)
    off = _tiled_cols(k0, BK // 8, 8)
    if EVEN_K:
        words = tl.load(w_ptrs + off[None, :], mask=rmask[:, None], other=0)
    else:
        km = rmask[:, None] & ((k0 + 8 * kw) < Kp)[None, :]
        words = tl.load(w_ptrs + off[None, :], mask=km, other=0)
    return words


@triton.jit
def _load_words_tma(w_desc, rg, k0, BN: tl.constexpr, BK: tl.constexpr):
    """_load_words through the tensor memory accelerator (sm90; configs.use_tma): w_desc views
    the prepared words as [E N/16, K/64, 16, 8] (16-row group, 64-code block, row, word), with
    a [BN/16, BK/64, 16, 8] box (BK: a whole step, or the tail step through a second
    descriptor); rg is the tile's first row group (its expert's rows: one tile
    never crosses an expert when BN divides N; past N a tile reads the next expert's rows, whose
    products land in masked-off outputs, or zeros past the last). Past K the copy fills zeros,
    so split chunks' steps past K add nothing, as the masked loads do."""
    blk = w_desc.load([rg, k0 // 64, 0, 0])  # [BN/16, BK/64, 16, 8]
    return tl.reshape(tl.permute(blk, (0, 2, 1, 3)), (BN, BK // 8))


@triton.jit
def _load_scales(s_ptrs, k0, rmask, Kp: tl.constexpr, BK: tl.constexpr):
    """The e8m0 byte of each word of the [R, BK] tile at k0, as [R, BK/8] uint8 (zero past Kp):
    one byte per 32-block is loaded and repeated 4 times in registers (a 16-byte vector of words
    is one 32-block), so there is one load per 32 codes, not per word. Byte loads cannot go
    through cp.async, so the K loops fetch these one step ahead by hand."""
    ks = tl.arange(0, BK // 32)
    km = rmask[:, None] & ((k0 + 32 * ks) < Kp)[None, :]
    s = tl.load(s_ptrs + _tiled_cols(k0, BK // 32, 2)[None, :], mask=km, other=0)  # [R, BK/32]
    s = tl.join(s, s)
    s = tl.join(s, s)  # [R, BK/32, 2, 2]
    return s.reshape(s.shape[0], BK // 8)


@triton.jit
def _wgmma_drain():
    """Waits for every wgmma still in flight (sm90 only); returns an int32 0 the dequant takes
    as an operand, so that it cannot be scheduled before the wait. Triton 3.6 pipelines wgmma
    across K steps (up to 3 in flight) even when operand A comes from registers, and ptxas may
    then reuse those registers for the next step's dequantized tile before the MMA has read
    them: on the H100 that gave rel-L2 3.7e-3 with bad rows changing from run to run (BM 128,
    8 warps) and 0.156 on every row (BM 256). Draining first fixed every case and cost < 1%
    (benchmarks/NOTES.md, v5). One wait per K step: the token is a scalar."""
    return tl.inline_asm_elementwise("wgmma.wait_group.sync.aligned 0;\n mov.b32 $0, 0;", "=r,r",
                                     [tl.full([], 0, tl.int32)], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def _grid_position(N: tl.constexpr, n_blocks, BN: tl.constexpr, PAIR: tl.constexpr,
                   N_FIRST: tl.constexpr):
    """program_id(0) -> (row block, weight tile of BN rows, or of 2 BN with PAIR). N_FIRST (tiles
    fastest): the programs running side by side share one row block's activations (read once
    from HBM, then from L2) and stream different weight tiles; row blocks fastest re-read all of
    x from HBM for every weight tile at prefill sizes."""
    pid = tl.program_id(0)
    N_TILES: tl.constexpr = (N + (2 if PAIR else 1) * BN - 1) // ((2 if PAIR else 1) * BN)
    if N_FIRST:
        return pid // N_TILES, pid % N_TILES
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _tile_step(acc, x, w_ptrs, k0, wmask, sc, Kp: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr,
               SYNC: tl.constexpr, w_desc, rg, TMA: tl.constexpr):
    """acc += one K step of one [BN, BK] weight tile (load, drain, dequant, MMA)."""
    if TMA:
        w = _load_words_tma(w_desc, rg, k0, BN, BK)
    else:
        w = _load_words(w_ptrs, k0, wmask, Kp, BK, EVEN_K)
    return _mma(acc, x, _dequant(w, sc, BN, BK, UPCAST, SYNC), UPCAST, SWAP)


@triton.jit
def _load_act(act_ptrs, rmask, k0, K_ACT: tl.constexpr, Kp: tl.constexpr, BK: tl.constexpr,
              EVEN_K: tl.constexpr):
    """The [BM, BK] activation tile at column k0 as bf16 (zero past K_ACT and in masked rows)."""
    xk = k0 + tl.arange(0, BK)
    if EVEN_K and K_ACT == Kp:
        x = tl.load(act_ptrs[:, None] + xk[None, :], mask=rmask[:, None], other=0.0)
    else:
        x = tl.load(act_ptrs[:, None] + xk[None, :],
                    mask=rmask[:, None] & (xk < K_ACT)[None, :], other=0.0)
    return x.to(tl.bfloat16)


@triton.jit
def _k_loop(acc, acc2, act_ptrs, rmask, K_ACT: tl.constexpr, w_ptrs, s_ptrs, wmask, wmask2,
            stride_wn: tl.constexpr, stride_sn: tl.constexpr, Kp: tl.constexpr,
            K_CHUNK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
            UPCAST: tl.constexpr, SWAP: tl.constexpr, SYNC: tl.constexpr, PAIR: tl.constexpr,
            TAIL: tl.constexpr, SPLIT: tl.constexpr, w_desc, w_desc_t, rg, TMA: tl.constexpr):
    """The K loop of both GEMMs over this program's chunk: acc += act @ W.T for the BN weight
    rows at w_ptrs (and acc2 for the next BN rows with PAIR). act_ptrs [BM]: the activation
    rows (x gathered by token, or a), K_ACT of their columns valid; rows past the block's end
    load nothing (at decode that is most of the tile).
    TAIL = 0: the chunk is a fixed step count (pipelining likes constant trip counts); steps
    past Kp load nothing (EVEN_K is False then, and every step is masked).
    TAIL > 0 (unsplit K only): Kp = whole BK steps + one TAIL step (e.g. gpt-oss 2880 = 22 x 128
    + 64): the whole steps run unmasked, then the TAIL step.
    TMA: the weight tiles through w_desc (whole steps) and w_desc_t (the TAIL step), from row
    group rg (_load_words_tma) instead of w_ptrs."""
    tl.static_assert(TAIL == 0 or SPLIT == 1)
    k_lo = tl.program_id(1) * K_CHUNK
    w_ptrs2 = w_ptrs + BN * stride_wn
    s_ptrs2 = s_ptrs + BN * stride_sn
    sc = _load_scales(s_ptrs, k_lo, wmask, Kp, BK)
    if PAIR:
        sc2 = _load_scales(s_ptrs2, k_lo, wmask2, Kp, BK)
    # (constexpr arithmetic inline: the interpreter turns assigned constexprs into tensors)
    for i in range(0, (K_CHUNK if TAIL == 0 else Kp - TAIL) // BK):
        k0 = k_lo + i * BK
        sc_next = _load_scales(s_ptrs, k0 + BK, wmask, Kp, BK)
        if PAIR:
            sc2_next = _load_scales(s_ptrs2, k0 + BK, wmask2, Kp, BK)
        x = _load_act(act_ptrs, rmask, k0, K_ACT, Kp, BK, EVEN_K)
        acc = _tile_step(acc, x, w_ptrs, k0, wmask, sc, Kp, BN, BK, EVEN_K, UPCAST, SWAP, SYNC,
                         w_desc, rg, TMA)
        sc = sc_next
        if PAIR:
            acc2 = _tile_step(acc2, x, w_ptrs2, k0, wmask2, sc2, Kp, BN, BK, EVEN_K, UPCAST, SWAP,
                              SYNC, w_desc, rg + BN // 16, TMA)
            sc2 = sc2_next
    if TAIL > 0:
        x = _load_act(act_ptrs, rmask, Kp - TAIL, K_ACT, Kp, TAIL, True)
        st = _load_scales(s_ptrs, Kp - TAIL, wmask, Kp, TAIL)
        acc = _tile_step(acc, x, w_ptrs, Kp - TAIL, wmask, st, Kp, BN, TAIL, True, UPCAST, SWAP,
                         SYNC, w_desc_t, rg, TMA)
        if PAIR:
            st2 = _load_scales(s_ptrs2, Kp - TAIL, wmask2, Kp, TAIL)
            acc2 = _tile_step(acc2, x, w_ptrs2, Kp - TAIL, wmask2, st2, Kp, BN, TAIL, True,
                              UPCAST, SWAP, SYNC, w_desc_t, rg + BN // 16, TMA)
    return acc, acc2


@triton.jit
def _gather_rows(x_ptr, sorted_ptr, rows, row1, k_top, stride_xt: tl.constexpr):
    """GEMM1's activation row pointers for sorted rows `rows` (those below row1): x[token]."""
    tok = tl.load(sorted_ptr + rows, mask=rows < row1, other=0) // k_top
    return x_ptr + tok.to(tl.int64) * stride_xt


@triton.jit
def _k_loop_merged(p0, p1, p2, p3, p4, r, row1, K_ACT: tl.constexpr, w_ptrs, s_ptrs, wmask,
                   Kp: tl.constexpr, K_CHUNK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   EXTRA: tl.constexpr, NG: tl.constexpr, EVEN_K: tl.constexpr,
                   UPCAST: tl.constexpr, SWAP: tl.constexpr, SYNC: tl.constexpr):
    """_k_loop for a merged block (_block_info, EXTRA > 0): its BM + EXTRA rows as NG = BM /
    EXTRA + 1 groups (3 or 5) of EXTRA rows (group g: sorted rows r + g EXTRA below row1,
    activation rows at p_g), each dequantized weight tile multiplied with every group. MMAs of
    one shape: an MMA of BM rows beside one of EXTRA rows gets two MMA layouts, and Triton 3.6
    then dequantizes the tile twice, once through shared memory (sm90 SASS). Whole steps only
    (the prefill configs: no TAIL, PAIR or TMA). -> five accumulators, [BN, EXTRA] each
    ([EXTRA, BN] unless SWAP); past NG they stay zero."""
    tl.static_assert(NG == 3 or NG == 5)
    a0 = _acc_zeros(BN, EXTRA, SWAP)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    k_lo = tl.program_id(1) * K_CHUNK
    sc = _load_scales(s_ptrs, k_lo, wmask, Kp, BK)
    for i in range(0, K_CHUNK // BK):
        k0 = k_lo + i * BK
        sc_next = _load_scales(s_ptrs, k0 + BK, wmask, Kp, BK)
        x0 = _load_act(p0, r < row1, k0, K_ACT, Kp, BK, EVEN_K)
        x1 = _load_act(p1, r + EXTRA < row1, k0, K_ACT, Kp, BK, EVEN_K)
        x2 = _load_act(p2, r + 2 * EXTRA < row1, k0, K_ACT, Kp, BK, EVEN_K)
        if NG == 5:
            x3 = _load_act(p3, r + 3 * EXTRA < row1, k0, K_ACT, Kp, BK, EVEN_K)
            x4 = _load_act(p4, r + 4 * EXTRA < row1, k0, K_ACT, Kp, BK, EVEN_K)
        w = _dequant(_load_words(w_ptrs, k0, wmask, Kp, BK, EVEN_K), sc, BN, BK, UPCAST, SYNC)
        a0 = _mma(a0, x0, w, UPCAST, SWAP)
        a1 = _mma(a1, x1, w, UPCAST, SWAP)
        a2 = _mma(a2, x2, w, UPCAST, SWAP)
        if NG == 5:
            a3 = _mma(a3, x3, w, UPCAST, SWAP)
            a4 = _mma(a4, x4, w, UPCAST, SWAP)
        sc = sc_next
    return a0, a1, a2, a3, a4


@triton.jit
def _acc_zeros(BN: tl.constexpr, BM: tl.constexpr, SWAP: tl.constexpr):
    """A zero accumulator for BN weight rows x BM sorted rows, as _mma keeps it."""
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    return acc


@triton.jit
def _mma(acc, x, w, UPCAST: tl.constexpr, SWAP: tl.constexpr):
    """acc += x [BM, BK] @ w [BN, BK].T  ([BM, BN]), or with SWAP acc [BN, BM] += w @ x.T (the
    weight rows fill the MMA's M side: small BM wastes less). fp32 operands under the
    interpreter, whose bf16 dot is wrong."""
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    if SWAP:
        acc = tl.dot(w, tl.trans(x), acc)
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _gemm1_kernel(x_ptr, sorted_ptr, es_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr,
                  E, k_top, n_blocks, alpha, limit, p_rows, w_desc, w_desc_t,
                  stride_xt: tl.constexpr, stride_we: tl.constexpr, stride_wn: tl.constexpr,
                  stride_se: tl.constexpr, stride_sn: tl.constexpr, stride_be: tl.constexpr,
                  H: tl.constexpr, Hp: tl.constexpr, Ip: tl.constexpr,
                  ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, EB: tl.constexpr,
                  EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
                  SWAP: tl.constexpr, SYNC: tl.constexpr, SPLIT: tl.constexpr,
                  K_CHUNK: tl.constexpr, N_FIRST: tl.constexpr, PAIR: tl.constexpr,
                  TAIL: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr,
                  TMA: tl.constexpr = False, EXTRA: tl.constexpr = 0,
                  MERGED_FIRST: tl.constexpr = False):
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
    rows (_k_loop_merged): the tile is dequantized once for them, not twice."""
    _pdl_enter(PDL)
    pid_m, pid_n = _grid_position(2 * Ip, n_blocks, BN, PAIR, N_FIRST)
    e, row0, row1, total = _block_info(es_ptr, pid_m, E, BM, EB, EXTRA, MERGED_FIRST)
    if pid_m >= total:
        return
    if _merged(row0, row1, BM, EXTRA):
        _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                     k_top, alpha, limit, p_rows, stride_xt, stride_we, stride_wn, stride_se,
                     stride_sn, stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM, BN, BK, EVEN_K,
                     EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL, w_desc, w_desc_t,
                     TMA, EXTRA)
    elif HALF >= 2 and row1 - row0 <= BM // 4:
        _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                     k_top, alpha, limit, p_rows, stride_xt, stride_we, stride_wn, stride_se,
                     stride_sn, stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM // 4, BN, BK, EVEN_K,
                     EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL, w_desc, w_desc_t,
                     TMA, 0)
    elif HALF and row1 - row0 <= BM // 2:
        _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                     k_top, alpha, limit, p_rows, stride_xt, stride_we, stride_wn, stride_se,
                     stride_sn, stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM // 2, BN, BK, EVEN_K,
                     EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL, w_desc, w_desc_t,
                     TMA, 0)
    else:
        _gemm1_block(x_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, a_ptr, p_ptr, e, row0, row1, pid_n,
                     k_top, alpha, limit, p_rows, stride_xt, stride_we, stride_wn, stride_se,
                     stride_sn, stride_be, H, Hp, Ip, ACT, HAS_BIAS, BM, BN, BK, EVEN_K,
                     EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL, w_desc, w_desc_t,
                     TMA, 0)


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
                 w_desc_t, TMA: tl.constexpr, EXTRA: tl.constexpr):
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
        tl.static_assert(not PAIR and TAIL == 0 and not TMA)
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
                 SWAP: tl.constexpr, SPLIT: tl.constexpr):
    """GEMM1 epilogue of the tile of weight rows w0 .. w0+BN (w0 a multiple of 16): bias, gate/up
    pairing, activation -> a (or the raw chunk sums -> p when K is split)."""
    offs_w = w0 + tl.arange(0, BN)
    if SWAP:
        acc = tl.trans(acc)  # [BM, BN]
    if not UPCAST:
        acc = acc * ACC_SCALE
    if HAS_BIAS:
        b = tl.load(b_ptr + e64 * stride_be + offs_w, mask=wmask, other=0.0)
        if SPLIT > 1:
            b = tl.where(tl.program_id(1) == 0, b, 0.0)
        acc += b[None, :]
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


@triton.jit
def _gemm2_kernel(a_ptr, sorted_ptr, es_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
                  E, n_blocks, M, w_desc, w_desc_t,
                  stride_we: tl.constexpr, stride_wn: tl.constexpr, stride_se: tl.constexpr,
                  stride_sn: tl.constexpr, stride_be: tl.constexpr,
                  H: tl.constexpr, Ip: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, EB: tl.constexpr, EVEN_K: tl.constexpr,
                  EVEN_N: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr,
                  SYNC: tl.constexpr, SPLIT: tl.constexpr, K_CHUNK: tl.constexpr,
                  N_FIRST: tl.constexpr, PAIR: tl.constexpr, TAIL: tl.constexpr,
                  HALF: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr = False,
                  EXTRA: tl.constexpr = 0, MERGED_FIRST: tl.constexpr = False):
    """w_ptr: int32 words [E, Hp, Ip/8] (with TMA, w_desc / w_desc_t: their descriptors for a
    whole / the TAIL step); s_ptr: uint8 [E, Hp, Ip/32]. SPLIT > 1: program_id(1) takes K_CHUNK
    of the K range and writes its partial sum (bias in chunk 0 only) to y_ptr [SPLIT, M, H];
    _finalize_kernel adds the chunks in order. PAIR: two BN-row weight
    tiles per program, HALF: part-filled blocks on BM/2 rows, EXTRA: merged last rows, as in
    _gemm1_kernel."""
    _pdl_enter(PDL)
    pid_m, pid_n = _grid_position(H, n_blocks, BN, PAIR, N_FIRST)
    e, row0, row1, total = _block_info(es_ptr, pid_m, E, BM, EB, EXTRA, MERGED_FIRST)
    if pid_m >= total:
        return
    if _merged(row0, row1, BM, EXTRA):
        _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                     stride_we, stride_wn, stride_se, stride_sn, stride_be, H, Ip, HAS_BIAS,
                     BM, BN, BK, EVEN_K, EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL,
                     w_desc, w_desc_t, TMA, EXTRA)
    elif HALF >= 2 and row1 - row0 <= BM // 4:
        _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                     stride_we, stride_wn, stride_se, stride_sn, stride_be, H, Ip, HAS_BIAS,
                     BM // 4, BN, BK, EVEN_K, EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR,
                     TAIL, w_desc, w_desc_t, TMA, 0)
    elif HALF and row1 - row0 <= BM // 2:
        _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                     stride_we, stride_wn, stride_se, stride_sn, stride_be, H, Ip, HAS_BIAS,
                     BM // 2, BN, BK, EVEN_K, EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR,
                     TAIL, w_desc, w_desc_t, TMA, 0)
    else:
        _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                     stride_we, stride_wn, stride_se, stride_sn, stride_be, H, Ip, HAS_BIAS,
                     BM, BN, BK, EVEN_K, EVEN_N, UPCAST, SWAP, SYNC, SPLIT, K_CHUNK, PAIR, TAIL,
                     w_desc, w_desc_t, TMA, 0)


@triton.jit
def _gemm2_block(a_ptr, sorted_ptr, w_ptr, s_ptr, b_ptr, y_ptr, e, row0, row1, pid_n, M,
                 stride_we: tl.constexpr, stride_wn: tl.constexpr, stride_se: tl.constexpr,
                 stride_sn: tl.constexpr, stride_be: tl.constexpr, H: tl.constexpr,
                 Ip: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                 UPCAST: tl.constexpr, SWAP: tl.constexpr, SYNC: tl.constexpr,
                 SPLIT: tl.constexpr, K_CHUNK: tl.constexpr, PAIR: tl.constexpr,
                 TAIL: tl.constexpr, w_desc, w_desc_t, TMA: tl.constexpr,
                 EXTRA: tl.constexpr):
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
        tl.static_assert(not PAIR and TAIL == 0 and not TMA)
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
                      UPCAST: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr):
    """_gemm2_store for sorted rows `rows` (those below row1): their y rows are the rows'
    assignments (in K chunk program_id(1)'s slab of y when K is split)."""
    rmask = rows < row1
    assign = tl.load(sorted_ptr + rows, mask=rmask, other=0)
    if SPLIT > 1:
        assign += tl.program_id(1) * M
    _gemm2_store(acc, n0, nmask, assign, rmask, e64, b_ptr, stride_be, y_ptr, H, BN, HAS_BIAS,
                 UPCAST, SWAP, SPLIT)


@triton.jit
def _gemm2_store(acc, n0, nmask, assign, rmask, e64, b_ptr, stride_be, y_ptr, H: tl.constexpr,
                 BN: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                 SWAP: tl.constexpr, SPLIT: tl.constexpr):
    """GEMM2 epilogue of the tile of hidden columns n0 .. n0+BN: bias, scatter to y rows."""
    offs_n = n0 + tl.arange(0, BN)
    if SWAP:
        acc = tl.trans(acc)
    if not UPCAST:
        acc = acc * ACC_SCALE
    if HAS_BIAS:
        b = tl.load(b_ptr + e64 * stride_be + offs_n, mask=nmask, other=0.0)
        if SPLIT > 1:
            b = tl.where(tl.program_id(1) == 0, b, 0.0)
        acc += b[None, :]
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


@triton.jit
def _finalize_kernel(y_ptr, ids_ptr, emap_ptr, tw_ptr, out_ptr, E, M, H: tl.constexpr,
                     k_top: tl.constexpr, HAS_MAP: tl.constexpr, COMBINE: tl.constexpr,
                     BH: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
    """out[t] = sum_s w[t, s] * y[t*k + s] in slot order; or out[t, s] = y[t*k + s] (zero for
    experts not on this rank). Rows of y for such experts were never written: mask, not scale."""
    _pdl_enter(PDL)
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
        y = tl.zeros([BH], dtype=tl.float32)
        for c in tl.static_range(SPLIT):  # GEMM2's K chunks, in order
            y += tl.load(y_ptr + (c * M + a).to(tl.int64) * H + offs, mask=hmask & valid,
                         other=0.0).to(tl.float32)
        if COMBINE:
            acc += tl.where(valid, tl.load(tw_ptr + a).to(tl.float32), 0.0) * y
        else:
            tl.store(out_ptr + a.to(tl.int64) * H + offs, y.to(out_ptr.dtype.element_ty), mask=hmask)
    if COMBINE:
        tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=hmask)
