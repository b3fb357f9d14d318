"""The K loops of both Triton GEMMs: per step, load the activation tile and the weight tile,
drain wgmma (sm90), dequantize, MMA. Shape legend: BM sorted rows (tokens), BN weight rows,
BK codes per step.
"""
import triton
import triton.language as tl

from ._dequant import ACC_SCALE, _dequant, _load_scales, _load_words, _load_words_tma


@triton.jit
def _acc_zeros(BN: tl.constexpr, BM: tl.constexpr, SWAP: tl.constexpr):
    """A zero accumulator for BN weight rows x BM sorted rows, as _mma keeps it."""
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    return acc


@triton.jit
def _acc_rows(acc, offs_w, wmask, e64, b_ptr, stride_be, HAS_BIAS: tl.constexpr,
              UPCAST: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr,
              FP8: tl.constexpr = False):
    """A finished accumulator as [BM, BN] fp32 values: sorted rows first, the bf16 dequant's
    2**-ACC_SHIFT undone (GPU path; the FP8 path's steps are scaled already), and the bias of
    weight rows `offs_w` (wmask) of expert e64 added (in K chunk 0 only, when K is split)."""
    if SWAP:
        acc = tl.trans(acc)
    if not UPCAST and not FP8:
        acc = acc * ACC_SCALE
    if HAS_BIAS:
        b = tl.load(b_ptr + e64 * stride_be + offs_w, mask=wmask, other=0.0)
        if SPLIT > 1:
            b = tl.where(tl.program_id(1) == 0, b, 0.0)
        acc += b[None, :]
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
