"""FP8 activations ("W4A8", sm90): the GEMMs' inputs as e4m3 with one scale per row, the MXFP4
weights decoded to e4m3 in registers with the block scale folded in (layout_fp8.py), fp8 wgmma,
and each K step's fp32 partial sum multiplied by the step's power of two into an fp32
accumulator (the promotion: Hopper's fp8 MMA accumulates K in reduced precision inside one
instruction chain, so nothing longer than one BK step accumulates there).
Shape legend: R weight rows of a tile, BM activation rows, BK codes per K step, K_IN the input's
valid columns, KP its padded width.
"""
import triton
import triton.language as tl

from . import layout_fp8
from ...moe_torch import E4M3_MAX as _E4M3_MAX
from ._dequant import _block_scales, _e2m1_f32, _tiled_cols, _wgmma_drain
from ._pdl import _pdl_enter

E4M3_MAX = tl.constexpr(_E4M3_MAX)  # the emulation's, so both divide by the same
_D_MIN = tl.constexpr(layout_fp8.D_MIN)
_D_MAX = tl.constexpr(layout_fp8.D_MAX)
_LUT_BASE0 = tl.constexpr(layout_fp8.LUT_BASE[0])
_LUT_BASE1 = tl.constexpr(layout_fp8.LUT_BASE[1])
_LUT_STEP0 = tl.constexpr(layout_fp8.LUT_STEP[0])
_LUT_STEP1 = tl.constexpr(layout_fp8.LUT_STEP[1])
_DEQUANT_ASM = tl.constexpr(layout_fp8.DEQUANT_ASM)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, n_rows, K_IN: tl.constexpr, KP: tl.constexpr,
                       stride_x: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                       UPCAST: tl.constexpr, PDL: tl.constexpr):
    """Per-row e4m3: x [n_rows, K_IN] (stride_x) -> q [n_rows, KP] e4m3 (zeros past K_IN), s
    [n_rows] fp32 with x ~= q * s: s = amax(|x|) / 448 (1 for an all-zero row), q = x / s
    rounded to nearest (IEEE division, as the torch emulation). A row holding inf or NaN gets
    s = inf or NaN: its outputs are non-finite, as the reference's."""
    _pdl_enter(PDL)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < n_rows
    rows = r.to(tl.int64)
    amax = tl.zeros([BR], dtype=tl.float32)
    for k0 in range(0, K_IN, BK):
        c = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_x + c[None, :],
                    mask=rmask[:, None] & (c < K_IN)[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    # (a NaN anywhere: tl.maximum drops NaN operands, so test for them separately)
    s = tl.where(amax > 0, amax / E4M3_MAX, 1.0)
    nan = tl.zeros([BR], dtype=tl.int32)
    for k0 in range(0, KP, BK):
        c = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_x + c[None, :],
                    mask=rmask[:, None] & (c < K_IN)[None, :], other=0.0).to(tl.float32)
        nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=1))
        q = tl.math.div_rn(x, s[:, None])
        if UPCAST:
            q = _round_e4m3(q)  # the interpreter's own conversion mis-rounds some values
        tl.store(q_ptr + rows[:, None] * KP + c[None, :], q.to(tl.float8e4nv),
                 mask=rmask[:, None] & (c < KP)[None, :])
    s = tl.where(nan > 0, float("nan"), s)
    tl.store(s_ptr + r, s, mask=rmask)


@triton.jit
def _round_e4m3(v):
    """float32 v (|v| <= 448) rounded to the nearest e4m3 value (ties to even), as float32: bit
    arithmetic for the interpreter. Normals keep 3 mantissa bits; below 2**-6 the step is 2**-9
    (adding and removing 2**14 rounds there, in float32's own ties-to-even)."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & -1048576
    normal = b.to(tl.float32, bitcast=True)
    a = tl.abs(v)
    sub = (a + 16384.0) - 16384.0
    return tl.where(a < 0.015625, tl.where(v < 0, -sub, sub), normal)


@triton.jit
def _load_codes(w_ptrs, k0, rmask, Kp: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """One [R, BK] weight tile's prepared words as their bytes, [R, BK/2] uint8 (4 per word, 16
    per 32-block: 16-byte vector loads); w_ptrs [R, 1] byte pointers from _tiled_rows."""
    kb = tl.arange(0, BK // 2)
    off = _tiled_cols(k0, BK // 2, 32)
    if EVEN_K:
        codes = tl.load(w_ptrs + off[None, :], mask=rmask[:, None], other=0)
    else:
        # (whole 64-code blocks in or out, Kp and k0 being multiples of 64: the mask is constant
        # over each 32-byte run, so the loads stay 16-byte vectors)
        codes = tl.load(w_ptrs + off[None, :],
                        mask=rmask[:, None] & ((k0 + 64 * (kb // 32)) < Kp)[None, :], other=0)
    return codes


@triton.jit
def _repeat16(t):
    """[R, n] -> [R, 16 n]: each element 16 times in a row (register copies, no data movement)."""
    t = tl.join(t, t)
    t = tl.join(t, t)
    t = tl.join(t, t)
    t = tl.join(t, t)
    return t.reshape(t.shape[0], t.shape[1] * 16)


@triton.jit
def _step_scales(sc):
    """sc [R, BK/32] e8m0 bytes -> (d [R, BK/32] int32, the blocks' offsets from the step's
    largest scale, layout_fp8.py; mult [R] fp32: 2**(ref - 6 - 127), NaN where a block's scale
    is NaN (255: its row's outputs are NaN, as the format says))."""
    s = sc.to(tl.int32)
    ref = tl.max(s, axis=1)
    d = s - ref[:, None] + _D_MAX
    e = ref - _D_MAX  # the multiplier's exponent field; below 1 a subnormal 2**(ref - 133)
    bits = tl.where(e >= 1, e << 23, 1 << (tl.maximum(ref, 0) + 16))
    mult = tl.where(ref == 255, float("nan"), bits.to(tl.float32, bitcast=True))
    return d, mult


@triton.jit
def _dequant_fp8(codes, sc, R: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                 SYNC: tl.constexpr):
    """codes [R, BK/2] uint8 (the words' bytes, layout_fp8.py), sc [R, BK/32] e8m0 bytes ->
    (w [R, BK]: e4m3 e2m1 * 2**d (fp32 of the same values under the interpreter), mult [R] fp32:
    the step's multiplier, _step_scales)."""
    d, mult = _step_scales(sc)
    ok = d >= _D_MIN
    if UPCAST:
        b = codes.to(tl.int32).reshape(R, BK // 8, 4)
        word = tl.sum(b << (8 * tl.arange(0, 4))[None, None, :], axis=2)[:, :, None]  # [R, BK/8, 1]
        j = tl.arange(0, 4)[None, None, :]
        a = _e2m1_f32(word, 4 * j, 8 * j + 7)                   # [R, BK/8, 4]: column 4c + j
        bb = _e2m1_f32(word, 16 + 4 * j, 8 * j + 3)             # column 16 + 4c + j
        w = tl.reshape(tl.permute(tl.reshape(tl.join(a, bb), (R, BK // 32, 4, 4, 2)),
                                  (0, 1, 4, 2, 3)), (R, BK // 32, 32))
        f = tl.where(ok, (tl.maximum(d + 127, 1) << 23).to(tl.float32, bitcast=True), 0.0)
        w = tl.reshape(w * f[:, :, None], (R, BK))
    else:
        lo = tl.where(ok, _LUT_BASE0 + d * _LUT_STEP0, 0)
        hi = tl.where(ok, _LUT_BASE1 + d * _LUT_STEP1, 0)
        if SYNC:
            token = _wgmma_drain()
        else:
            token = 0
        # `token` is an unused operand: it only orders the decode after the drain
        a, bb = tl.inline_asm_elementwise(
            _DEQUANT_ASM, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [codes, _repeat16(lo), _repeat16(hi), token],
            dtype=(tl.float8e4nv, tl.float8e4nv), is_pure=True, pack=4)
        # a, bb [R, BK/2]: element 16 ch + 4c + j of a is column 32 ch + 4c + j, of bb + 16
        # (the tile goes through shared memory on its way to the wgmma operand registers:
        # Triton 3.6 does not keep the join in the operand layout)
        w = tl.join(tl.reshape(a, (R, BK // 32, 16)), tl.reshape(bb, (R, BK // 32, 16)))
        w = tl.reshape(tl.permute(w, (0, 1, 3, 2)), (R, BK))
    return w, mult


@triton.jit
def _load_act_fp8(act_ptrs, rmask, k0, Kp: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """The [BM, BK] tile at column k0 of e4m3 activation rows act_ptrs [BM] (KP = Kp wide)."""
    xk = k0 + tl.arange(0, BK)
    if EVEN_K:
        x = tl.load(act_ptrs[:, None] + xk[None, :], mask=rmask[:, None], other=0.0)
    else:
        x = tl.load(act_ptrs[:, None] + xk[None, :], mask=rmask[:, None] & (xk < Kp)[None, :],
                    other=0.0)
    return x


@triton.jit
def _step_fp8(acc, x, w_ptrs, k0, wmask, sc, Kp: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr,
              SYNC: tl.constexpr):
    """acc += 2**(step scale) * (one K step of x [BM, BK] with the [BN, BK] weight tile)."""
    w, mult = _dequant_fp8(_load_codes(w_ptrs, k0, wmask, Kp, BK, EVEN_K), sc, BN, BK, UPCAST,
                           SYNC)
    if UPCAST:
        x = x.to(tl.float32)
    if SWAP:
        acc += tl.dot(w, tl.trans(x)) * mult[:, None]
    else:
        acc += tl.dot(x, tl.trans(w)) * mult[None, :]
    return acc


@triton.jit
def _k_loop_fp8(acc, act_ptrs, rmask, w_ptrs, s_ptrs, wmask, Kp: tl.constexpr,
                K_CHUNK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                EVEN_K: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr,
                SYNC: tl.constexpr, TAIL: tl.constexpr, SPLIT: tl.constexpr):
    """_k_loop._k_loop for FP8 activations (no PAIR, TMA or merged blocks): acc += act @ W.T
    over this program's K chunk; act_ptrs [BM] e4m3 rows Kp wide, w_ptrs [BN, 1] byte pointers
    of the weight rows (_tiled_rows), s_ptrs their scale bytes."""
    tl.static_assert(TAIL == 0 or SPLIT == 1)
    k_lo = tl.program_id(1) * K_CHUNK
    sc = _block_scales(s_ptrs, k_lo, wmask, Kp, BK)
    for i in range(0, (K_CHUNK if TAIL == 0 else Kp - TAIL) // BK):
        k0 = k_lo + i * BK
        sc_next = _block_scales(s_ptrs, k0 + BK, wmask, Kp, BK)
        x = _load_act_fp8(act_ptrs, rmask, k0, Kp, BK, EVEN_K)
        acc = _step_fp8(acc, x, w_ptrs, k0, wmask, sc, Kp, BN, BK, EVEN_K, UPCAST, SWAP, SYNC)
        sc = sc_next
    if TAIL > 0:
        x = _load_act_fp8(act_ptrs, rmask, Kp - TAIL, Kp, TAIL, True)
        st = _block_scales(s_ptrs, Kp - TAIL, wmask, Kp, TAIL)
        acc = _step_fp8(acc, x, w_ptrs, Kp - TAIL, wmask, st, Kp, BN, TAIL, True, UPCAST, SWAP,
                        SYNC)
    return acc


@triton.jit
def _scale_rows(acc, rs, SWAP: tl.constexpr):
    """acc times each activation row's scale rs [BM] (acc [BN, BM] with SWAP, else [BM, BN])."""
    if SWAP:  # (no early return: Triton would still compile the code after it)
        acc = acc * rs[None, :]
    else:
        acc = acc * rs[:, None]
    return acc
