"""Weight tiles: loading the prepared words and scale bytes (cp.async-able pointer loads or
TMA), and decoding them to bf16 in registers, in the layout wgmma reads its A operand from.
"""
import triton
import triton.language as tl

from ....formats import E8M0_NAN
from . import layout

# e2m1 -> bf16 on the GPU, 8 elements per 32-bit word: `prepare` places each code's bits as
# layout.py says, and layout.DEQUANT_ASM turns a word into 4 bf16 pairs that are exactly
# value * 2**-126, with one rotate and one or two masks each, then one bf16x2 FMA by
# 2**(s - 1 - ACC_SHIFT) (s = the e8m0 byte) scales two elements; the accumulator is multiplied
# by 2**ACC_SHIFT at the end. `prepare` stores each scale byte offset by layout.STORED_SCALE_OFFSET,
# b = s + 127 - 1 - ACC_SHIFT = s + 62 (the multiplier's bf16 exponent field): one integer
# multiply, b * 0x00800080, then builds the bf16x2 multiplier. Exact for s = 66..192 (|w| from
# about 2**-61 to 2**66): `prepare` refuses larger scales; smaller ones flush toward zero
# (absolute error < 2**-60). s = 255 (NaN) becomes b = 255, an infinite multiplier, and
# `prepare` zeroes that block's codes: 0 * inf = NaN for the whole block, as the format says.
ACC_SHIFT = tl.constexpr(layout.ACC_SHIFT)
ACC_SCALE = tl.constexpr(2.0 ** layout.ACC_SHIFT)
_STORED_SCALE_OFFSET = tl.constexpr(layout.STORED_SCALE_OFFSET)
_DEQUANT_ASM = tl.constexpr(layout.DEQUANT_ASM)
_E8M0_NAN = tl.constexpr(E8M0_NAN)
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
        sv = tl.where(b == _E8M0_NAN, float("nan"),
                      ((b - _STORED_SCALE_OFFSET) << 23).to(tl.float32, bitcast=True))
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
def _e2m1_f32(words, mag_at, sign_at):
    """fp32 value of the e2m1 code whose magnitude bits start at bit `mag_at` of each word and
    whose sign is bit `sign_at` (layout.py, layout_fp8.py; interpreter paths; the bit positions
    are constants or tensors that broadcast with the words)."""
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
    """_load_words through the tensor memory accelerator (sm90; planner.use_tma): w_desc views
    the prepared words as [E N/16, K/64, 16, 8] (16-row group, 64-code block, row, word), with
    a [BN/16, BK/64, 16, 8] box (BK: a whole step, or the tail step through a second
    descriptor); rg is the tile's first row group (its expert's rows: one tile
    never crosses an expert when BN divides N; past N a tile reads the next expert's rows, whose
    products land in masked-off outputs, or zeros past the last). Past K the copy fills zeros,
    so split chunks' steps past K add nothing, as the masked loads do."""
    blk = w_desc.load([rg, k0 // 64, 0, 0])  # [BN/16, BK/64, 16, 8]
    return tl.reshape(tl.permute(blk, (0, 2, 1, 3)), (BN, BK // 8))


@triton.jit
def _block_scales(s_ptrs, k0, rmask, Kp: tl.constexpr, BK: tl.constexpr):
    """The scale bytes of the [R, BK] tile at k0 (a multiple of 64), one per 32-block: [R, BK/32]
    uint8, zero past Kp (s_ptrs [R, 1] from _tiled_rows)."""
    ks = tl.arange(0, BK // 32)
    km = rmask[:, None] & ((k0 + 32 * ks) < Kp)[None, :]
    return tl.load(s_ptrs + _tiled_cols(k0, BK // 32, 2)[None, :], mask=km, other=0)


@triton.jit
def _load_scales(s_ptrs, k0, rmask, Kp: tl.constexpr, BK: tl.constexpr):
    """The e8m0 byte of each word of the [R, BK] tile at k0, as [R, BK/8] uint8 (zero past Kp):
    one byte per 32-block is loaded and repeated 4 times in registers (a 16-byte vector of words
    is one 32-block), so there is one load per 32 codes, not per word. Byte loads cannot go
    through cp.async, so the K loops fetch these one step ahead by hand."""
    s = _block_scales(s_ptrs, k0, rmask, Kp, BK)  # [R, BK/32]
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
    (benchmarks/notes/op.md, v5). One wait per K step: the token is a scalar."""
    return tl.inline_asm_elementwise("wgmma.wait_group.sync.aligned 0;\n mov.b32 $0, 0;", "=r,r",
                                     [tl.full([], 0, tl.int32)], dtype=tl.int32, is_pure=False,
                                     pack=1)
