"""The FP8-activation ("W4A8") layout of the "triton" kernel: where `prepare` puts each e2m1 code's
bits inside a 32-bit word, and the PTX that turns a word into 8 e4m3 bytes with the block scale
folded in. Pure Python (no triton): triton_moe.prepare packs with it, _fp8.py decodes.

An sm90 fp8 wgmma reads its register A operand as 4 consecutive K bytes per 32-bit register
(k_width 4): one thread holds columns 4c..4c+3 and 16+4c..16+4c+3 of each 32-column chunk. Word
c of a 32-code chunk therefore holds exactly those 8 codes, A_j = column 4c+j and B_j = column
16+4c+j (j = 0..3):

    bits 4j .. 4j+2       magnitude of A_j      bit 8j+7   sign of A_j
    bits 16+4j .. 18+4j   magnitude of B_j      bit 8j+3   sign of B_j

so the 4 magnitudes of each half are the 4 nibble selectors of one `prmt` (bit 3 of each
nibble, a sign, is masked off: it would select prmt's sign-replicate mode) and the signs land on
each output byte's bit 7 with no shift (A) or one shift by 4 (B).

The block scale: a K step's e8m0 bytes s of one weight row have a largest value ref; a block's
offset d = s - ref + 6 <= 6. `prmt` looks the magnitudes up in an 8-byte table holding e4m3(v *
2**d) for the 8 e2m1 magnitudes v, built per (row, block) as LUT_BASE + d * LUT_STEP (adding d
to each nonzero entry's exponent field): exact for d in [D_MIN, 6] (largest |v * 2**d| = 6 * 64
= 384 <= 448, smallest nonzero 0.5 * 2**-5 still a normal e4m3). A block more than 11 binades
below its step's largest (d < D_MIN) is flushed to zero: its values are below 2**-11 of the
row's largest in that step. The MMA's partial sum of the step is then multiplied by
2**(ref - 6 - 127) in fp32, and by the row's activation scale at the end.
"""
from __future__ import annotations

D_MIN = -5        # smallest block offset decoded exactly (c = 1 -> e4m3 exponent field 1)
D_MAX = 6         # largest offset: 6 * 2**6 = 384 <= 448 (e4m3's largest finite value)
# e4m3 bytes of the e2m1 magnitudes 0, 0.5, 1, 1.5 (LUT_BASE[0]) and 2, 3, 4, 6 (LUT_BASE[1])
# at d = 0; adding d * LUT_STEP moves each nonzero entry's exponent by d (entry 0 stays 0)
LUT_BASE = (0x3C383000, 0x4C484440)
LUT_STEP = (0x08080800, 0x08080808)
SIGN_MASK = 0x80808080
SELECT_MASK = 0x7777


def word_bits(j: int, half: int) -> tuple[int, int]:
    """(lowest magnitude bit, sign bit) of code j (0..3) of half 0 (A: column 4c+j) or 1 (B:
    column 16+4c+j) in a word."""
    return (4 * j + 16 * half, 8 * j + (7 if half == 0 else 3))


_ALL = sorted([word_bits(j, h)[0] + i for j in range(4) for h in range(2) for i in range(3)]
              + [word_bits(j, h)[1] for j in range(4) for h in range(2)])
assert _ALL == list(range(32)), "every bit of a word used once"


def lut(d: int) -> tuple[int, int]:
    """The two prmt table registers of a block with offset d (zeros below D_MIN: flushed)."""
    if d < D_MIN:
        return 0, 0
    return tuple((b + d * s) & 0xFFFFFFFF for b, s in zip(LUT_BASE, LUT_STEP))


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode) on host ints: byte i of the result is byte sel[4i+2:4i] of
    {b, a} (a bytes 0-3, b bytes 4-7), or that byte's sign replicated when sel bit 4i+3 is set."""
    src = (a | (b << 32)).to_bytes(8, "little")
    out = 0
    for i in range(4):
        n = (sel >> (4 * i)) & 0xF
        byte = src[n & 7]
        if n & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def decode_word(word: int, d: int) -> tuple[int, int]:
    """(A, B): the two registers of 4 e4m3 bytes each that DEQUANT_ASM builds from `word` for a
    block of offset d: the host-side model of the PTX, for tests."""
    lo, hi = lut(d)
    return tuple(_prmt(lo, hi, (word >> (16 * h)) & SELECT_MASK)
                 | ((word << (4 * h)) & SIGN_MASK & 0xFFFFFFFF) for h in (0, 1))


# $0, $1: the registers of half A and half B (4 e4m3 each); $2: the word (its 4 bytes,
# packed); $3 (..$6): the table's low register, $7 (..$10): its high one (each repeated for the
# 4 packed elements); $11..: an ordering token (unused).
DEQUANT_ASM = "\n".join([
    "{",
    ".reg .b32 s, t, u;",
    f"and.b32 s, $2, {SELECT_MASK:#x};",
    "prmt.b32 t, $3, $7, s;",
    f"and.b32 u, $2, {SIGN_MASK:#010x};",
    "or.b32 $0, t, u;",
    "shr.b32 s, $2, 16;",
    f"and.b32 s, s, {SELECT_MASK:#x};",
    "prmt.b32 t, $3, $7, s;",
    "shl.b32 u, $2, 4;",
    f"and.b32 u, u, {SIGN_MASK:#010x};",
    "or.b32 $1, t, u;",
    "}",
])

# One half of DEQUANT_ASM (Gluon, _wgmma_fp8.py: each half is its own int32 element there, so
# the two halves of a word land in the A operand's registers with no byte shuffle). $0: the 4
# e4m3 bytes of half s; $1: the word; $2, $3: the table's registers; $4: 16 s, the selector
# nibbles' shift; $5: 4 s, the signs' shift.
DEQUANT_HALF_ASM = "\n".join([
    "{",
    ".reg .b32 s, t, u;",
    "shr.b32 s, $1, $4;",
    f"and.b32 s, s, {SELECT_MASK:#x};",
    "prmt.b32 t, $2, $3, s;",
    "shl.b32 u, $1, $5;",
    f"and.b32 u, u, {SIGN_MASK:#010x};",
    "or.b32 $0, t, u;",
    "}",
])
